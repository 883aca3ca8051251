"""A fleet coming online is thousands of presences at once: the registry reads and writes their rows in one
transaction per batch, refuses a bad presence alone, and keeps the last word of a device that spoke twice. On
SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from server_api.db import Job
from server_api.rounds.clients import ClientRegistry
from server_api.rounds.state import SqlJobStore
from shared.protocol.messages import Presence
from tests.server.memory_store import RecordingLink

JOB = "presence-job"


@pytest.fixture
def registry(session_factory: sessionmaker[Session]) -> ClientRegistry:
    with session_factory.begin() as s:
        s.add(Job(id=JOB, config={}))
    return ClientRegistry(JOB, SqlJobStore(JOB, session_factory), RecordingLink())


def count_commits(engine: Engine) -> list[int]:
    commits = [0]
    event.listen(engine, "commit", lambda conn: commits.__setitem__(0, commits[0] + 1))
    return commits


def test_a_burst_of_presences_is_one_read_and_one_write(registry: ClientRegistry, db_engine: Engine) -> None:
    ids = [f"dev-{i:04d}" for i in range(600)]  # more than one chunk of bind parameters
    messages = [(c, Presence("online", 10, 0).to_json()) for c in ids]
    messages += [("dev-0001", Presence("offline").to_json()),  # spoke twice: the last word counts
                 ("dev-0002", b"{not json"), ("dev-0003", b'{"status": "sleeping"}'), ("dev-0004", b""),
                 ("dev-0006", b'{"status": "online", "device": {"os": "x\\u0000"}}')]  # NUL: PostgreSQL refuses
    commits = count_commits(db_engine)
    refused = registry.receive_many(messages)
    assert commits[0] == 2  # the rows of the unknown ids read together, then written together
    assert [c for c, _ in refused] == ["dev-0002", "dev-0003", "dev-0006"]
    assert all(exc.reason for _, exc in refused)
    stored = registry.state.clients_by_id(ids)
    assert set(stored) == set(ids)
    assert stored["dev-0001"].status == "offline" and "dev-0001" not in registry.online
    assert stored["dev-0002"].status == "online" and stored["dev-0599"].num_samples == 10  # a bad one changes nothing
    assert len(registry.online) == 599

    commits[0] = 0
    registry.receive_many([(c, Presence("online", 10, 0).to_json()) for c in ids[2:]])  # unchanged: no write
    assert commits[0] == 0
    registry.receive_many([("dev-0005", Presence("online", 10, 3).to_json())])  # a change is written at once
    assert commits[0] == 1 and registry.state.clients_by_id(["dev-0005"])["dev-0005"].state_version == 3


def test_a_row_the_database_refuses_does_not_keep_the_others_out(registry: ClientRegistry, monkeypatch) -> None:
    write = registry.state.save_clients

    def refusing(records):
        if any(r.client_id == "dev-bad" for r in records):
            raise DataError("INSERT INTO clients ...", {}, Exception("refused by the database"))
        write(records)

    monkeypatch.setattr(registry.state, "save_clients", refusing)
    ids = ["dev-a", "dev-bad", "dev-b"]
    assert registry.receive_many([(c, Presence("online", 10, 0).to_json()) for c in ids]) == []
    assert set(registry.state.clients_by_id(ids)) == {"dev-a", "dev-b"}
    assert "dev-bad" in registry.online  # known to be online; its row is tried again with its next presence
