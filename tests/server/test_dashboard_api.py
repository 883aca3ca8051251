"""The dashboard's server side (server_api/api/routes/dashboard.py): ``GET /jobs/{id}/dashboard`` on seeded data,
on SQLite and PostgreSQL (``db_url``), and ``GET /`` with its static files (no external URL, no HTML sinks)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, insert
from sqlalchemy.orm import Session, sessionmaker
from test_api import JOB_ID, FakeOrchestrator, assert_error, seed_job, seed_rounds

import server_api.api.routes.dashboard as dashboard_module
from server_api.api.app import create_app
from server_api.db import Client, ClientUpdate, Round, make_engine, make_session_factory, upgrade_schema, utcnow
from server_api.db.store import ArtifactStore
from server_api.settings import ServerSettings

STATIC = Path(dashboard_module.__file__).resolve().parent.parent / "static"


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    upgrade_schema(db_url)
    engine: Engine = make_engine(db_url, sqlite_begin="DEFERRED")
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def client(db_url: str, factory: sessionmaker[Session], tmp_path: Path) -> Iterator[TestClient]:
    settings = ServerSettings(database_url=db_url, admin_token="t0ken-for-tests", artifact_dir=tmp_path / "a")
    app = create_app(settings, factory, ArtifactStore(settings.artifact_dir), FakeOrchestrator())
    with TestClient(app) as test_client:
        yield test_client


def _update(round_id: int, client_id: str, key: str, status: str, reason: str | None = None,
            labels: list[int] | None = None) -> ClientUpdate:
    return ClientUpdate(job_id=JOB_ID, round_id=round_id, client_id=client_id, idempotency_key=key, base_version=1,
                        num_samples=sum(labels or []), label_counts=labels or [], metrics={}, status=status,
                        reason=reason, payload_bytes=10)


def _open_round_id(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return s.query(Round.id).filter(Round.job_id == JOB_ID, Round.index == 1).scalar()


def _dashboard(client: TestClient, job_id: str = JOB_ID) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}/dashboard")
    assert response.status_code == 200, response.text
    return response.json()


def test_aggregate_of_a_seeded_job(client: TestClient, factory: sessionmaker[Session]) -> None:
    seed_job(factory)
    seed_rounds(factory)  # round 0: a failed and a closed attempt; round 1 open; dev-a online, dev-b offline
    d = _dashboard(client)
    assert d["job"]["id"] == JOB_ID and d["job"]["status"] == "running" and d["job"]["config"]["rounds"] == 20
    assert d["rounds_total"] == 3
    assert [(r["index"], r["attempt"], r["status"]) for r in d["rounds"]] == [(0, 0, "failed"), (0, 1, "closed"),
                                                                              (1, 0, "open")]
    closed = d["rounds"][1]
    assert (closed["accuracy"], closed["loss"], closed["generator_loss"]) == (0.5, 1.25, 2.0)
    assert (closed["bytes_up"], closed["bytes_down"], closed["num_updates"], closed["model_version"]) == (1000, 2000,
                                                                                                         1, 1)
    assert d["rounds"][0]["failure_reason"] == "too few updates by the deadline"
    current = d["current"]
    assert (current["index"], current["attempt"], current["status"]) == (1, 0, "open")
    assert (current["selected"], current["received"], current["accepted"], current["rejected"]) == (2, 0, 0, 0)
    assert current["rejections"] == {} and 100 < current["seconds_to_deadline"] <= 120
    assert d["clients_total"] == 2 and d["num_classes"] == 10
    dev_a, dev_b = d["clients"]
    assert dev_a["client_id"] == "dev-a" and dev_a["status"] == "online" and dev_a["model"] == "cnn"
    assert dev_a["label_counts"] == [60, 60, 0, 0, 0, 0, 0, 0, 0, 0] and dev_a["rejected"] == 0
    assert dev_a["round_status"] == "selected" and dev_a["num_samples"] == 120
    assert dev_b["status"] == "offline" and dev_b["label_counts"] is None and dev_b["state_version"] == 0
    assert dev_b["rejected"] == 1 and dev_b["rejections"] == {"stale base version": 1}  # no code: the whole text
    assert (dev_b["runtime"], dev_b["partition_index"], dev_b["refused"]) == (None, None, None)


def test_current_round_counts_rejections_by_reason_code(client: TestClient, factory: sessionmaker[Session]) -> None:
    seed_job(factory)
    seed_rounds(factory)
    round_id = _open_round_id(factory)
    with factory.begin() as s:
        s.add_all([
            _update(round_id, "dev-a", "r1-a", "accepted", labels=[5, 0, 7, 0, 0, 0, 0, 0, 0, 1]),
            _update(round_id, "dev-b", "r1-b", "rejected", "not_selected: dev-b is not selected in round 1"),
            _update(round_id, "intruder", "r1-x1", "rejected", "bad_tensor: layer conv1.weight has NaN"),
            _update(round_id, "intruder", "r1-x2", "rejected", "bad_tensor: layer fc.bias has the wrong shape"),
            _update(round_id, "dev-b", "r1-b2", "rejected", None),
        ])
    d = _dashboard(client)
    current = d["current"]
    assert (current["selected"], current["received"], current["accepted"], current["rejected"]) == (2, 5, 1, 4)
    assert current["rejections"] == {"not_selected": 1, "bad_tensor": 2, "unknown": 1}
    clients = {c["client_id"]: c for c in d["clients"]}
    assert set(clients) == {"dev-a", "dev-b"}  # the intruder never announced itself: not a client row
    assert clients["dev-a"]["round_status"] == "accepted"
    assert clients["dev-a"]["label_counts"] == [5, 0, 7, 0, 0, 0, 0, 0, 0, 1]  # its latest accepted update
    assert clients["dev-b"]["round_status"] == "rejected"
    assert clients["dev-b"]["rejected"] == 3
    assert clients["dev-b"]["rejections"] == {"stale base version": 1, "not_selected": 1, "unknown": 1}


def test_device_facts_and_hostile_device_info(client: TestClient, factory: sessionmaker[Session]) -> None:
    seed_job(factory, algorithm={"algorithm": "fedavg", "model": "mlp"})
    with factory.begin() as s:
        s.add_all([
            Client(job_id=JOB_ID, client_id="c0", device_info={"runtime": "lite", "lite": "1.2", "partition_index": 3,
                                                               "torch": "not mine"}),
            Client(job_id=JOB_ID, client_id="c1", device_info={"runtime": "torch", "torch": "2.13.0",
                                                               "refused": "unsupported model 'resnet'"}),
            Client(job_id=JOB_ID, client_id="c2", device_info={"runtime": ["<b>x</b>"], "partition_index": True,
                                                               "refused": "y" * 5000}),
            Client(job_id=JOB_ID, client_id="c3", device_info={"runtime": "<img src=x onerror=alert(1)>",
                                                               "partition_index": "7"}),
        ])
    d = _dashboard(client)
    c0, c1, c2, c3 = d["clients"]
    assert (c0["runtime"], c0["runtime_version"], c0["partition_index"], c0["model"]) == ("lite", "1.2", 3, "mlp")
    assert (c1["runtime"], c1["runtime_version"], c1["refused"]) == ("torch", "2.13.0", "unsupported model 'resnet'")
    assert (c2["runtime"], c2["partition_index"]) == (None, None) and c2["refused"] == "y" * 128
    assert c3["runtime"] == "<img src=x onerror=alert(1)>"  # returned as text: the page escapes it
    assert c3["partition_index"] is None
    assert d["current"] is None and d["rounds"] == [] and d["num_classes"] is None
    assert all(c["round_status"] is None and c["label_counts"] is None for c in d["clients"])


def test_unknown_and_invalid_job_ids(client: TestClient) -> None:
    assert_error(client.get("/jobs/no-such-job/dashboard"), 404, "not_found")
    for bad in ("bad%20id", "-leading-dash", "x" * 64, "%3Cscript%3E"):
        assert_error(client.get(f"/jobs/{bad}/dashboard"), 422, "validation_error")


def test_the_answer_is_bounded_to_the_latest_rounds_and_first_clients(
        client: TestClient, factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    seed_job(factory)
    seed_rounds(factory)
    monkeypatch.setattr(dashboard_module, "MAX_ROUNDS", 2)
    monkeypatch.setattr(dashboard_module, "MAX_CLIENTS", 1)
    d = _dashboard(client)
    assert d["rounds_total"] == 3 and [(r["index"], r["attempt"]) for r in d["rounds"]] == [(0, 1), (1, 0)]
    assert d["clients_total"] == 2 and [c["client_id"] for c in d["clients"]] == ["dev-a"]


def test_a_long_job_answers_quickly(client: TestClient, factory: sessionmaker[Session]) -> None:
    """1,200 round attempts and 12,000 updates of 30 clients: the answer is bounded and comes fast."""
    seed_job(factory)
    now = utcnow()
    clients = [f"c{k}" for k in range(30)]
    with factory.begin() as s:
        s.execute(insert(Round), [dict(job_id=JOB_ID, index=i, attempt=0, status="closed", selected=clients[:10],
                                       deadline=now, closed_at=now, accuracy=i / 1200, loss=1.0, bytes_up=i,
                                       bytes_down=2 * i, num_updates=10) for i in range(1200)])
        s.add_all([Client(job_id=JOB_ID, client_id=c) for c in clients])
    with factory() as s:
        ids = [rid for (rid,) in s.query(Round.id).filter(Round.job_id == JOB_ID).order_by(Round.index)]
    with factory.begin() as s:
        s.execute(insert(ClientUpdate), [dict(
            job_id=JOB_ID, round_id=rid, client_id=clients[(i + k) % 30], idempotency_key=f"{i}-{k}", base_version=i,
            num_samples=10, label_counts=[k, 10 - k], metrics={}, status="accepted" if k < 8 else "rejected",
            reason=None if k < 8 else f"stale_base_version: base {i} of round {i}", payload_bytes=1)
            for i, rid in enumerate(ids) for k in range(10)])
    _dashboard(client)  # warm up
    started = time.perf_counter()
    d = _dashboard(client)
    elapsed = time.perf_counter() - started
    assert d["rounds_total"] == 1200 and len(d["rounds"]) == 1000 and d["rounds"][0]["index"] == 200
    assert d["rounds"][-1]["index"] == 1199 and d["current"]["index"] == 1199 and d["current"]["received"] == 10
    assert d["current"]["rejections"] == {"stale_base_version": 2}
    assert sum(c["rejected"] for c in d["clients"]) == 2400
    assert all(set(c["rejections"]) == {"stale_base_version"} for c in d["clients"])
    assert elapsed < 3.0, f"the dashboard took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------- the page
def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert 'src="static/dashboard.js"' in page.text and 'href="static/dashboard.css"' in page.text
    for name, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert_error(client.get("/static/nope.js"), 404, "not_found")
    assert_error(client.get("/static/../app.py"), 404)
    schema = client.get("/openapi.json").json()
    assert "/jobs/{job_id}/dashboard" in schema["paths"] and "/" not in schema["paths"]


def test_the_static_files_name_no_external_url_and_use_no_html_sinks() -> None:
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} == {"dashboard.html", "dashboard.js", "dashboard.css"}
    for path in files:
        text = path.read_text()
        urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", text, re.IGNORECASE))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)  # the SVG namespace name, never fetched
        assert not re.search(r"""(src|href)\s*=\s*["']//|url\(\s*["']?//|@import""", text), path.name
    script = (STATIC / "dashboard.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "<script>" not in (STATIC / "dashboard.html").read_text()  # no inline script (the CSP forbids it)


def test_a_seeded_open_round_deadline_is_in_the_future(client: TestClient, factory: sessionmaker[Session]) -> None:
    seed_job(factory, "deadline-job")
    now = utcnow()
    with factory.begin() as s:
        s.add(Round(job_id="deadline-job", index=0, attempt=0, status="open", selected=["a"],
                    deadline=now - timedelta(seconds=5)))
    current = _dashboard(client, "deadline-job")["current"]
    assert current["seconds_to_deadline"] == 0.0 and current["selected"] == 1  # past: 0, never negative
