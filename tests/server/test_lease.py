"""Several server processes on one database: the job lease, its fencing, and the rules that keep an
acknowledged update from being lost or counted twice whichever process accepted it. On SQLite and PostgreSQL
(each `SqlJobStore` below stands for one server process)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server_api.db import Job, JobLease, utcnow
from server_api.rounds.lease import JobLeaseKeeper
from server_api.rounds.state import LeaseLost, RoundClosed, RoundResult, SqlJobStore, UpdateRecord

JOB = "lease-job"


@pytest.fixture
def stores(session_factory: sessionmaker[Session]) -> tuple[SqlJobStore, SqlJobStore]:
    with session_factory.begin() as s:
        s.add(Job(id=JOB, config={}))
    return SqlJobStore(JOB, session_factory), SqlJobStore(JOB, session_factory)


def accepted(round_id: int, client: str, key: str) -> UpdateRecord:
    return UpdateRecord(round_id, client, key, "accepted", 0, 10, [10], {}, payload_sha256="a" * 64,
                        payload_bytes=1)


def expire_lease(factory: sessionmaker[Session]) -> None:
    with factory.begin() as s:
        s.get(JobLease, JOB).expires_at = utcnow() - timedelta(seconds=1)


def test_one_holder_at_a_time_and_takeover_after_expiry(stores, session_factory) -> None:
    a, b = stores
    assert a.acquire_lease("a", 30) and a.acquire_lease("a", 30)  # taken, then renewed
    assert not b.acquire_lease("b", 30)
    expire_lease(session_factory)  # the holder died: nobody renewed it
    assert b.acquire_lease("b", 30)
    assert not a.acquire_lease("a", 30)
    b.release_lease("b")  # a clean stop hands it over at once
    assert a.acquire_lease("a", 30)


def test_concurrent_takeover_of_an_expired_lease_has_one_winner(stores, session_factory) -> None:
    a, _ = stores
    assert a.acquire_lease("first", 30)
    expire_lease(session_factory)
    contenders = [SqlJobStore(JOB, session_factory) for _ in range(6)]
    results: dict[int, bool] = {}
    start = threading.Barrier(len(contenders))

    def contend(index: int) -> None:
        start.wait()
        results[index] = contenders[index].acquire_lease(f"p{index}", 30)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(results.values()) == 1, results
    with session_factory() as s:
        assert s.get(JobLease, JOB).holder == f"p{next(i for i, won in results.items() if won)}"


def test_a_process_that_lost_the_lease_cannot_move_rounds_on(stores, session_factory) -> None:
    a, b = stores
    assert a.acquire_lease("a", 30)
    a.fence = "a"
    round_id = a.create_round(0, 0, ["c1"], utcnow() + timedelta(seconds=60))
    expire_lease(session_factory)
    assert b.acquire_lease("b", 30)
    with pytest.raises(LeaseLost):
        a.set_round_status(round_id, "aggregating")
    with pytest.raises(LeaseLost):
        a.finish_round(round_id, RoundResult("failed", 0, 0, failure_reason="x"))
    with pytest.raises(LeaseLost):
        a.create_round(1, 0, ["c1"], utcnow())
    assert a.unfinished_round(0).status == "open"  # nothing of it was written
    b.fence = "b"
    b.set_round_status(round_id, "aggregating")
    assert a.healthy.is_set()  # a lost lease is not a database fault


def test_updates_are_stored_only_while_their_round_is_open(stores) -> None:
    a, b = stores
    round_id = a.create_round(0, 0, ["c1", "c2", "c3"], utcnow() + timedelta(seconds=60))
    assert b.add_updates([accepted(round_id, "c1", "k1")]) == [True]
    a.set_round_status(round_id, "aggregating")  # the closer froze the round
    with pytest.raises(RoundClosed):
        b.add_updates([accepted(round_id, "c2", "k2")])
    assert a.accepted_clients(round_id) == {"c1"}
    rejected = UpdateRecord(round_id, "c2", "k3", "rejected", reason="late: closed")
    assert b.add_updates([rejected]) == [True]  # a refusal is still recorded


def test_one_accepted_update_per_client_and_round_across_processes(stores) -> None:
    a, b = stores
    round_id = a.create_round(0, 0, ["c1", "c2"], utcnow() + timedelta(seconds=60))
    assert a.add_updates([accepted(round_id, "c1", "k1")]) == [True]
    # the same device's second, different update reached the other process
    assert b.add_updates([accepted(round_id, "c1", "k2"), accepted(round_id, "c2", "k3")]) == [False, True]
    assert b.accepted_clients(round_id) == {"c1", "c2"}
    assert [u.idempotency_key for u in a.accepted_updates(round_id)] == ["k1", "k3"]


def test_keeper_renews_while_held_and_reports_a_lost_lease(stores, session_factory) -> None:
    a, b = stores
    keeper = JobLeaseKeeper(a, "a", ttl_s=1.5)
    assert keeper.take() and keeper.held
    time.sleep(2.5)  # longer than the lease: only renewal keeps it
    assert not b.acquire_lease("b", 30) and not keeper.lost.is_set()
    with session_factory.begin() as s:  # somebody else got it (as if renewals had been too late)
        lease = s.get(JobLease, JOB)
        lease.holder, lease.expires_at = "b", utcnow() + timedelta(seconds=30)
    deadline = time.monotonic() + 5
    while not keeper.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert keeper.lost.is_set() and not keeper.held
    keeper.release()
    with session_factory() as s:
        assert s.get(JobLease, JOB).holder == "b"  # releasing a lost lease leaves the new holder's alone


def test_a_clustered_process_starts_a_job_it_hears_of_before_its_watcher_looks(session_factory, tmp_path,
                                                                                monkeypatch) -> None:
    """A job created through another process's API can open its first round before this process's watcher
    has looked (every JOB_WATCH_S): a message for it waits, the watcher looks at once and starts the job,
    and the message goes to its worker instead of being dropped. Messages for jobs the database does not know
    are dropped (and counted off the backlog) after that look; a one-process server drops them at once."""
    from server_api.db.store import ArtifactStore
    from server_api.rounds import orchestrator as module
    from server_api.rounds.context import ServerContext
    from shared.mqtt import Message
    from tests.server.memory_store import RecordingLink

    with session_factory.begin() as s:
        s.add(Job(id="fresh-job", config={}))
    orchestrator = module.Orchestrator(ServerContext(session_factory, ArtifactStore(tmp_path), RecordingLink(),
                                                     instance="p1"), share_group="servers")

    class Inbox(list):
        put = list.append

    class Started:
        def __init__(self) -> None:
            self.inbox = Inbox()

        def is_alive(self) -> bool:
            return True

    started: dict[str, Started] = {}

    def job_created(job_id: str) -> None:
        started[job_id] = orchestrator.workers[job_id] = Started()  # type: ignore[assignment]

    monkeypatch.setattr(orchestrator, "job_created", job_created)
    monkeypatch.setattr(module, "JOB_WATCH_S", 60.0)  # only a message can wake the watcher in time
    handled: list[str] = []
    messages = [Message(f"fedgen/v1/{job}/clients/d1/update", b"x", False, on_done=lambda j=job: handled.append(j))
                for job in ("fresh-job", "no-such-job")]
    assert orchestrator._hold(messages[0]) and orchestrator._hold(messages[1])
    watcher = threading.Thread(target=orchestrator._watch_jobs, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 5
    while handled != ["no-such-job"] and time.monotonic() < deadline:
        time.sleep(0.02)
    orchestrator._stopping.set()
    watcher.join(5)
    assert list(started) == ["fresh-job"] and started["fresh-job"].inbox == [messages[0]]
    assert handled == ["no-such-job"]  # dropped after the look; the other is its worker's to finish
    single = module.Orchestrator(ServerContext(session_factory, ArtifactStore(tmp_path), RecordingLink()))
    assert not single._hold(messages[0])  # one process: its own API starts its jobs
