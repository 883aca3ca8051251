"""REST API tests (server_api/app.py) against real SQLite and PostgreSQL databases (``db_url`` fixture)."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import server_api.api.routes.health as health_module
import server_api.db.queries as queries_module
from server_api.api.app import create_app
from server_api.db import (
    Client,
    ClientUpdate,
    Job,
    ModelVersion,
    Round,
    make_engine,
    make_session_factory,
    upgrade_schema,
    utcnow,
)
from server_api.db.store import ArtifactStore
from server_api.settings import ServerSettings
from shared.algorithm.config import AlgorithmConfig
from shared.fsutil import sha256_hex
from shared.protocol.codec import convert
from shared.protocol.job import JobConfig

TOKEN = "s3cr3t-admin-token-Zq9"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB_ID = "mnist-fedgen"


@dataclass
class FakeOrchestrator:
    """Records ``job_created`` calls; reports a configurable status."""

    broker_connected: bool = True
    jobs_running: int = 1
    created: list[str] = field(default_factory=list)
    fail_status: bool = False
    fail_created: bool = False

    def job_created(self, job_id: str) -> None:
        self.created.append(job_id)
        if self.fail_created:
            raise RuntimeError("orchestrator exploded")

    def waiting(self, job_id: str) -> tuple[int, int] | None:
        return (3, 10) if job_id == "waiting-job" else None

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        broker = "connected" if self.broker_connected else "disconnected"
        return {"broker": broker, "jobs_running": self.jobs_running, "database": "ok"}


@dataclass
class Api:
    client: TestClient
    factory: sessionmaker[Session]
    store: ArtifactStore
    orchestrator: FakeOrchestrator
    settings: ServerSettings


def _settings(db_url: str, tmp_path: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "admin_token": TOKEN,
        "artifact_dir": tmp_path / "artifacts",
        **overrides,
    }
    return ServerSettings(**values)


@pytest.fixture
def api_engine(db_url: str) -> Iterator[Engine]:
    upgrade_schema(db_url)
    engine = make_engine(db_url, sqlite_begin="DEFERRED")
    yield engine
    engine.dispose()


@pytest.fixture
def api(db_url: str, api_engine: Engine, tmp_path: Path) -> Iterator[Api]:
    settings = _settings(db_url, tmp_path)
    factory = make_session_factory(api_engine)
    store = ArtifactStore(settings.artifact_dir)
    orchestrator = FakeOrchestrator()
    app = create_app(settings, factory, store, orchestrator)
    with TestClient(app) as client:
        yield Api(client, factory, store, orchestrator, settings)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> str:
    """Check the JSON error shape; return the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return str(body["error"]["message"])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------------- seed data
def seed_job(
    factory: sessionmaker[Session], job_id: str = JOB_ID, status: str = "running", **config: Any
) -> None:
    cfg = convert(JobConfig, {"id": job_id, "dataset": "mnist-subset", **config}, "job")
    with factory.begin() as s:
        s.add(Job(id=job_id, config=cfg.stored_config(), status=status, current_round=1))


def seed_rounds(factory: sessionmaker[Session], job_id: str = JOB_ID) -> None:
    """Round 0: attempt 0 failed, attempt 1 closed with an accepted and a rejected update; round 1 open."""
    now = utcnow()
    with factory.begin() as s:
        failed = Round(
            job_id=job_id,
            index=0,
            attempt=0,
            status="failed",
            selected=["dev-a"],
            deadline=now,
            closed_at=now,
            failure_reason="too few updates by the deadline",
        )
        closed = Round(
            job_id=job_id,
            index=0,
            attempt=1,
            status="closed",
            selected=["dev-a", "dev-b"],
            deadline=now + timedelta(minutes=2),
            closed_at=now,
            accuracy=0.5,
            loss=1.25,
            generator_loss=2.0,
            bytes_up=1000,
            bytes_down=2000,
            num_updates=1,
            model_version=1,
        )
        open_round = Round(
            job_id=job_id,
            index=1,
            attempt=0,
            status="open",
            selected=["dev-a", "dev-b"],
            deadline=now + timedelta(minutes=2),
        )
        s.add_all([failed, closed, open_round])
        s.flush()
        s.add_all(
            [
                ClientUpdate(
                    job_id=job_id,
                    round_id=closed.id,
                    client_id="dev-a",
                    idempotency_key="k1",
                    base_version=0,
                    num_samples=120,
                    label_counts=[60, 60, 0, 0, 0, 0, 0, 0, 0, 0],
                    metrics={"accuracy": 0.8, "loss": 0.4},
                    status="accepted",
                    payload_sha256="a" * 64,
                    payload_bytes=1000,
                ),
                ClientUpdate(
                    job_id=job_id,
                    round_id=closed.id,
                    client_id="dev-b",
                    idempotency_key="k2",
                    base_version=0,
                    num_samples=30,
                    label_counts=[0, 0, 30, 0, 0, 0, 0, 0, 0, 0],
                    metrics={},
                    status="rejected",
                    reason="stale base version",
                ),
            ]
        )
        s.add_all(
            [
                Client(job_id=job_id, client_id="dev-a", device_info={"arch": "aarch64"}, num_samples=120),
                Client(job_id=job_id, client_id="dev-b", status="offline", state_version=0),
            ]
        )


def seed_model_version(
    factory: sessionmaker[Session],
    store: ArtifactStore,
    version: int,
    model: bytes,
    generator: bytes | None,
    job_id: str = JOB_ID,
) -> tuple[str, str | None]:
    model_sha = store.put(model)
    gen_sha = store.put(generator) if generator is not None else None
    with factory.begin() as s:
        s.add(
            ModelVersion(
                job_id=job_id,
                version=version,
                round_index=version - 1 if version else None,
                state_sha256=sha256_hex(b"state%d" % version),
                model_onnx_sha256=model_sha,
                predictor_onnx_sha256=sha256_hex(b"pred"),
                generator_onnx_sha256=gen_sha,
            )
        )
    return model_sha, gen_sha


# ---------------------------------------------------------------------------------------------------- health
def test_health_ok(api: Api) -> None:
    response = api.client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok", "jobs_running": 1}


def test_health_without_orchestrator_counts_running_jobs(api: Api) -> None:
    seed_job(api.factory, "a-running", status="running")
    seed_job(api.factory, "b-created", status="created")
    app = create_app(api.settings, api.factory, api.store)
    with TestClient(app) as client:
        response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "broker": "not configured",
        "jobs_running": 1,
    }


def test_health_accepts_broker_connected_flag(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.orchestrator, "status", lambda: {"broker_connected": True, "jobs_running": 3})
    assert api.client.get("/health").json() == {
        "status": "ok",
        "database": "ok",
        "broker": "ok",
        "jobs_running": 3,
    }


@pytest.mark.parametrize(
    ("failure", "broker", "running"),
    [
        ("disconnected", "disconnected", 1),
        ("flag", "disconnected", 0),  # a bad jobs_running: counted in the database
        ("raises", "unavailable: RuntimeError", 0),  # jobs_running then counted in the database
        ("slow", "unavailable: TimeoutError", 0),
        ("not a dict", "unavailable: invalid status", 0),
    ],
)
def test_health_degraded_broker(
    api: Api, monkeypatch: pytest.MonkeyPatch, failure: str, broker: str, running: int | None
) -> None:
    if failure == "disconnected":
        api.orchestrator.broker_connected = False
    elif failure == "flag":
        monkeypatch.setattr(
            api.orchestrator, "status", lambda: {"broker_connected": False, "jobs_running": "x"}
        )
    elif failure == "raises":
        api.orchestrator.fail_status = True
    elif failure == "slow":
        monkeypatch.setattr(health_module, "HEALTH_ORCHESTRATOR_TIMEOUT_S", 0.05)
        monkeypatch.setattr(api.orchestrator, "status", lambda: time.sleep(0.5) or {})
    else:
        monkeypatch.setattr(api.orchestrator, "status", lambda: ["connected"])
    response = api.client.get("/health")
    assert response.status_code == 503
    assert response.json() == {
        "status": "degraded",
        "database": "ok",
        "broker": broker,
        "jobs_running": running,
    }


def _unreachable_url(kind: str, tmp_path: Path) -> str:
    if kind == "postgresql":
        return f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/fedgen"
    return f"sqlite:///{tmp_path / 'no-such-dir' / 'fedgen.db'}"


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_database_unavailable_is_503_json(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _unreachable_url(kind, tmp_path)
    engine = make_engine(url, sqlite_begin="DEFERRED")
    settings = _settings(url, tmp_path)
    app = create_app(
        settings, make_session_factory(engine), ArtifactStore(tmp_path / "a"), FakeOrchestrator()
    )
    try:
        with TestClient(app) as client:
            health = client.get("/health")
            assert health.status_code == 503
            body = health.json()
            assert body["status"] == "degraded" and body["database"].startswith("unavailable: ")
            assert body["broker"] == "ok"
            for method, path in [
                ("GET", "/jobs"),
                ("GET", f"/jobs/{JOB_ID}"),
                ("GET", "/clients"),
                ("GET", f"/jobs/{JOB_ID}/rounds/0"),
                ("GET", f"/jobs/{JOB_ID}/model.onnx"),
            ]:
                message = assert_error(client.request(method, path), 503, "database_unavailable")
                assert message == "database unavailable (OperationalError), try again later"
            response = client.post("/jobs", json={"dataset": "mnist"}, headers=AUTH)
            assert_error(response, 503, "database_unavailable")
    finally:
        engine.dispose()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ---------------------------------------------------------------------------------------------- POST /jobs
def test_create_job_requires_token(api: Api) -> None:
    body = {"id": "j1", "dataset": "mnist"}
    missing = api.client.post("/jobs", json=body)
    assert_error(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    headers: dict[str, Any]
    for headers in (
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer t\u00f6ken".encode("latin-1")},
    ):
        response = api.client.post("/jobs", json=body, headers=headers)
        assert response.status_code in (401, 403)
        assert_error(response, response.status_code)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert api.orchestrator.created == []
    assert api.client.get("/jobs").json()["total"] == 0


def test_create_job_without_configured_token_is_503(db_url: str, api_engine: Engine, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path, admin_token=None)
    app = create_app(settings, make_session_factory(api_engine), ArtifactStore(tmp_path / "a"))
    with TestClient(app) as client:
        for headers in ({}, AUTH):
            message = assert_error(client.post("/jobs", json={"dataset": "mnist"}, headers=headers), 503)
            assert "no admin token configured" in message
        assert client.get("/jobs").status_code == 200  # reads don't need the token


def test_create_job_fills_defaults_and_notifies(api: Api) -> None:
    response = api.client.post("/jobs", json={"id": JOB_ID, "dataset": "mnist", "active": 5}, headers=AUTH)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"] == JOB_ID and job["status"] == "created" and job["current_round"] == 0
    assert job["latest_model_version"] is None and job["error"] is None and job["finished_at"] is None
    cfg = job["config"]
    assert cfg["rounds"] == 20 and cfg["active"] == 5 and cfg["min_clients"] == 3 and cfg["min_online"] == 5
    assert cfg["round_timeout_s"] == 120 and cfg["seed"] == 0 and cfg["aggregation"] == "mean"
    assert cfg["trim_ratio"] == 0.1 and cfg["chunk_size"] == 262144 and cfg["server_eval"] is None
    assert cfg["algorithm"] == AlgorithmConfig().to_dict()  # {} means the complete FedGen defaults
    assert "id" not in cfg
    assert api.orchestrator.created == [JOB_ID]
    assert api.client.get(f"/jobs/{JOB_ID}").json() == job
    with api.factory() as s:
        stored = s.get(Job, JOB_ID)
        assert stored is not None and stored.config == cfg
        assert JobConfig.from_stored(JOB_ID, stored.config).min_clients == 3


def test_create_job_generates_id_and_keeps_given_values(api: Api) -> None:
    body = {
        "dataset": "fashion-mnist",
        "rounds": 3,
        "active": 4,
        "min_clients": 4,
        "min_online": 6,
        "round_timeout_s": 30,
        "seed": 7,
        "algorithm": {"algorithm": "fedavg", "learning_rate": 1},
        "aggregation": "trimmed_mean",
        "trim_ratio": 0,
        "chunk_size": 1024,
        "server_eval": {"dataset": "mnist-subset", "alpha": 0.5, "users": 4, "samples_per_class": None, "seed": 3},
    }
    response = api.client.post("/jobs", json=body, headers=AUTH)
    assert response.status_code == 201, response.text
    job = response.json()
    assert re.fullmatch(r"job-[0-9a-f]{8}", job["id"])
    cfg = job["config"]
    assert cfg["algorithm"]["algorithm"] == "fedavg" and cfg["algorithm"]["learning_rate"] == 1.0
    assert {k: cfg[k] for k in ("rounds", "active", "min_clients", "min_online", "aggregation")} == {
        "rounds": 3,
        "active": 4,
        "min_clients": 4,
        "min_online": 6,
        "aggregation": "trimmed_mean",
    }
    assert cfg["server_eval"] == {**body["server_eval"], "min_samples": 10}  # stored complete
    assert api.orchestrator.created == [job["id"]]


def test_create_duplicate_job_is_409(api: Api) -> None:
    body = {"id": JOB_ID, "dataset": "mnist"}
    assert api.client.post("/jobs", json=body, headers=AUTH).status_code == 201
    assert_error(api.client.post("/jobs", json=body, headers=AUTH), 409, "conflict")
    assert api.orchestrator.created == [JOB_ID]


def test_orchestrator_failure_does_not_fail_the_request(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    api.orchestrator.fail_created = True
    response = api.client.post("/jobs", json={"id": JOB_ID, "dataset": "mnist"}, headers=AUTH)
    assert response.status_code == 201
    assert "job_created" in caplog.text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"dataset": "mnist", "algorithm": {"algorithm": "fedsgd"}}, "unknown algorithm 'fedsgd'"),
        ({"dataset": "mnist", "algorithm": {"no_such": 1}}, "unknown algorithm settings: no_such"),
        ({"dataset": "mnist", "algorithm": {"local_steps": 0}}, "local_steps must be >= 1"),
        ({"dataset": "mnist", "algorithm": {"learning_rate": "fast"}}, "algorithm.learning_rate"),
        ({"dataset": "mnist", "algorithm": {"model": "resnet"}}, "unknown model 'resnet'"),
        ({"dataset": "mnist", "algorithm": []}, "algorithm"),
        ({"dataset": "mnist", "active": 4, "min_clients": 5}, "min_clients (5) must be <= active (4)"),
        ({"dataset": "mnist", "colour": "red"}, "colour"),
        ({"dataset": "mnist", "id": "Bad ID"}, "id"),
        ({"dataset": "mnist", "id": "-leading-dash"}, "id"),
        ({"dataset": "mnist", "id": "x" * 64}, "id"),
        ({"dataset": "cifar-10"}, "unknown dataset 'cifar-10'"),
        ({}, "dataset"),
        ({"dataset": "mnist", "rounds": 0}, "rounds"),
        ({"dataset": "mnist", "rounds": "20"}, "rounds"),
        ({"dataset": "mnist", "active": 0}, "active"),
        ({"dataset": "mnist", "round_timeout_s": 86401}, "round_timeout_s"),
        ({"dataset": "mnist", "seed": -1}, "seed"),
        ({"dataset": "mnist", "aggregation": "mode"}, "aggregation"),
        ({"dataset": "mnist", "trim_ratio": 0.5}, "trim_ratio"),
        ({"dataset": "mnist", "chunk_size": 1023}, "chunk_size"),
        ({"dataset": "mnist", "chunk_size": 1048577}, "chunk_size"),
        ({"dataset": "mnist", "min_online": 0}, "min_online"),
        ({"dataset": "mnist", "server_eval": {"dataset": "svhn"}}, "unknown dataset 'svhn'"),
        ({"dataset": "mnist", "server_eval": {"dataset": "mnist", "alpha": 0}}, "server_eval.alpha"),
        ({"dataset": "mnist", "server_eval": {"dataset": "mnist", "extra": 1}}, "server_eval.extra"),
        # ranges that a job which passes validation can actually run with
        ({"dataset": "mnist", "algorithm": {"local_steps": 10**15}}, "algorithm.local_steps must be <= 10000"),
        ({"dataset": "mnist", "algorithm": {"lr_decay": -0.5}}, "algorithm.lr_decay must be > 0"),
        ({"dataset": "mnist", "algorithm": {"prox_mu": -1}}, "algorithm.prox_mu must be >= 0"),
        ({"dataset": "mnist", "algorithm": {"noise_dim": -1}}, "algorithm.noise_dim must be >= 1"),
        ({"dataset": "mnist", "algorithm": {"generator_hidden": 10**12}}, "algorithm.generator_hidden"),
        ({"dataset": "mnist", "algorithm": {"learning_rate": 0}}, "algorithm.learning_rate must be > 0"),
        ({"dataset": "mnist", "max_client_samples": 0}, "max_client_samples"),
        ({"dataset": "mnist", "max_client_weight": 0}, "max_client_weight"),
        ({"dataset": "mnist", "max_client_weight": 1.5}, "max_client_weight"),
        ({"dataset": "mnist-subset", "server_eval": {"users": 5000}}, "cannot give 5000 users"),
        ({"dataset": "mnist-subset", "server_eval": {"samples_per_class": 5000}}, "fewer than samples_per_class"),
    ],
)
def test_invalid_job_config_is_422(api: Api, body: dict[str, Any], expected: str) -> None:
    message = assert_error(api.client.post("/jobs", json=body, headers=AUTH), 422, "validation_error")
    assert expected in message
    assert api.orchestrator.created == []


def test_malformed_json_is_422(api: Api) -> None:
    response = api.client.post(
        "/jobs", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(response, 422, "validation_error")


def test_body_over_limit_is_413(db_url: str, api_engine: Engine, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path, max_upload_bytes=2048)
    app = create_app(settings, make_session_factory(api_engine), ArtifactStore(tmp_path / "a"))
    with TestClient(app) as client:
        big = {"dataset": "mnist", "algorithm": {"model": "x" * 4096}}
        assert_error(client.post("/jobs", json=big, headers=AUTH), 413, "payload_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
            yield b'{"dataset": "mnist", "pad": "'
            yield b"x" * 4096
            yield b'"}'

        assert_error(client.post("/jobs", content=chunks(), headers=AUTH), 413, "payload_too_large")
        assert client.post("/jobs", json={"dataset": "mnist"}, headers=AUTH).status_code == 201


# ---------------------------------------------------------------------------------------------- GET endpoints
def test_list_and_get_jobs(api: Api) -> None:
    for i in range(3):
        seed_job(api.factory, f"job-{i}", status="created")
    page = api.client.get("/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0 and len(page["items"]) == 2
    rest = api.client.get("/jobs", params={"limit": 2, "offset": 2}).json()
    assert len(rest["items"]) == 1
    assert {j["id"] for j in page["items"] + rest["items"]} == {"job-0", "job-1", "job-2"}
    job = api.client.get("/jobs/job-1").json()
    assert job["status"] == "created" and job["config"]["dataset"] == "mnist-subset"
    assert_error(api.client.get("/jobs/no-such-job"), 404, "not_found")
    assert_error(api.client.get("/jobs/Bad%20Id"), 422, "validation_error")


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "ten"}])
def test_bad_pagination_is_422(api: Api, params: dict[str, Any]) -> None:
    for path in ("/jobs", "/clients", f"/jobs/{JOB_ID}/rounds"):
        assert_error(api.client.get(path, params=params), 422, "validation_error")


def test_rounds(api: Api) -> None:
    seed_job(api.factory)
    seed_rounds(api.factory)
    rounds = api.client.get(f"/jobs/{JOB_ID}/rounds").json()
    assert rounds["job_id"] == JOB_ID and rounds["total"] == 3
    assert [(r["index"], r["attempt"], r["status"]) for r in rounds["items"]] == [
        (0, 0, "failed"),
        (0, 1, "closed"),
        (1, 0, "open"),
    ]
    assert rounds["items"][0]["failure_reason"] == "too few updates by the deadline"
    assert rounds["items"][1]["accuracy"] == 0.5 and rounds["items"][1]["model_version"] == 1

    detail = api.client.get(f"/jobs/{JOB_ID}/rounds/0").json()
    assert detail["job_id"] == JOB_ID and detail["index"] == 0
    failed, closed = detail["attempts"]
    assert failed["attempt"] == 0 and failed["updates"] == []
    assert closed["attempt"] == 1 and closed["selected"] == ["dev-a", "dev-b"] and closed["bytes_up"] == 1000
    updates = {u["client_id"]: u for u in closed["updates"]}
    assert updates["dev-a"]["status"] == "accepted" and updates["dev-a"]["reason"] is None
    assert updates["dev-a"]["label_counts"][:2] == [60, 60] and updates["dev-a"]["num_samples"] == 120
    assert updates["dev-a"]["metrics"] == {"accuracy": 0.8, "loss": 0.4}
    assert updates["dev-b"]["status"] == "rejected" and updates["dev-b"]["reason"] == "stale base version"
    assert updates["dev-b"]["label_counts"] == [0, 0, 30, 0, 0, 0, 0, 0, 0, 0]

    assert api.client.get(f"/jobs/{JOB_ID}/rounds/1").json()["attempts"][0]["status"] == "open"
    assert_error(api.client.get(f"/jobs/{JOB_ID}/rounds/7"), 404, "not_found")
    assert_error(api.client.get("/jobs/other-job/rounds/0"), 404, "not_found")
    assert_error(api.client.get("/jobs/other-job/rounds"), 404, "not_found")
    for bad in ("-1", "abc", "1.5", str(2**31), str(2**70)):
        assert_error(api.client.get(f"/jobs/{JOB_ID}/rounds/{bad}"), 422, "validation_error")


def test_clients(api: Api) -> None:
    seed_job(api.factory)
    seed_job(api.factory, "other-job")
    seed_rounds(api.factory)
    with api.factory.begin() as s:
        s.add(Client(job_id="other-job", client_id="dev-z"))
    all_clients = api.client.get("/clients").json()
    assert all_clients["total"] == 3
    assert [(c["job_id"], c["client_id"]) for c in all_clients["items"]] == [
        (JOB_ID, "dev-a"),
        (JOB_ID, "dev-b"),
        ("other-job", "dev-z"),
    ]
    mine = api.client.get("/clients", params={"job_id": JOB_ID}).json()
    assert [c["client_id"] for c in mine["items"]] == ["dev-a", "dev-b"]
    dev_a, dev_b = mine["items"]
    assert (
        dev_a["status"] == "online"
        and dev_a["device_info"] == {"arch": "aarch64"}
        and dev_a["num_samples"] == 120
    )
    assert dev_b["status"] == "offline" and dev_b["state_version"] == 0
    assert_error(api.client.get("/clients", params={"job_id": "no-such-job"}), 404, "not_found")
    assert_error(api.client.get("/clients", params={"job_id": "../etc"}), 422, "validation_error")


# ---------------------------------------------------------------------------------------------- downloads
def test_model_downloads(api: Api) -> None:
    seed_job(api.factory)
    assert_error(api.client.get("/jobs/no-such-job/model.onnx"), 404, "not_found")
    assert_error(api.client.get(f"/jobs/{JOB_ID}/model.onnx"), 404, "no_model")
    assert_error(api.client.get(f"/jobs/{JOB_ID}/generator.onnx"), 404, "no_model")

    seed_model_version(api.factory, api.store, 0, b"model-v0", None)
    model_sha, _ = seed_model_version(api.factory, api.store, 1, b"\x08\x07model-v1\x00", None)
    response = api.client.get(f"/jobs/{JOB_ID}/model.onnx")
    assert response.status_code == 200
    assert response.content == b"\x08\x07model-v1\x00"
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["etag"] == f'"{model_sha}"'
    assert response.headers["x-model-version"] == "1"
    assert api.client.get(f"/jobs/{JOB_ID}").json()["latest_model_version"] == 1
    cached = api.client.get(f"/jobs/{JOB_ID}/model.onnx", headers={"If-None-Match": f'"{model_sha}"'})
    assert cached.status_code == 304 and cached.content == b""
    assert_error(api.client.get(f"/jobs/{JOB_ID}/generator.onnx"), 404, "no_generator")  # e.g. FedAvg

    _, gen_sha = seed_model_version(api.factory, api.store, 2, b"model-v2", b"generator-v2")
    generator = api.client.get(f"/jobs/{JOB_ID}/generator.onnx")
    assert generator.status_code == 200 and generator.content == b"generator-v2"
    assert generator.headers["etag"] == f'"{gen_sha}"'
    assert api.client.get(f"/jobs/{JOB_ID}/model.onnx").content == b"model-v2"


def test_missing_or_corrupt_artifact_is_a_json_error(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    seed_job(api.factory)
    sha, _ = seed_model_version(api.factory, api.store, 0, b"model-v0", None)
    api.store.path(sha).write_bytes(b"bit rot")
    assert_error(api.client.get(f"/jobs/{JOB_ID}/model.onnx"), 500, "artifact_corrupt")
    api.store.path(sha).unlink()
    assert_error(api.client.get(f"/jobs/{JOB_ID}/model.onnx"), 404, "artifact_missing")
    assert "missing from the store" in caplog.text and "is corrupt" in caplog.text


# ------------------------------------------------------------------------------------------- error shapes
def test_unknown_route_and_method_are_json(api: Api) -> None:
    assert_error(api.client.get("/no/such/route"), 404, "not_found")
    assert_error(api.client.delete("/jobs"), 405, "method_not_allowed")


def test_unhandled_errors_are_generic_500(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(*_args: Any) -> None:
        raise KeyError("internal detail")

    monkeypatch.setattr(queries_module, "jobs_page", boom)
    message = assert_error(api.client.get("/jobs"), 500, "internal_error")
    assert "internal detail" not in message
    assert "unhandled error in GET /jobs" in caplog.text


def test_openapi_and_docs(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    assert {
        "/health",
        "/jobs",
        "/jobs/{job_id}",
        "/jobs/{job_id}/rounds",
        "/jobs/{job_id}/rounds/{index}",
        "/clients",
        "/jobs/{job_id}/model.onnx",
        "/jobs/{job_id}/generator.onnx",
    } <= set(schema["paths"])
    assert api.client.get("/docs").status_code == 200


# ---------------------------------------------------------------------------------------------- secrets
def test_admin_token_never_leaks(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seed_job(api.factory)
    api.orchestrator.fail_created = True  # logs an exception on create
    responses = [
        api.client.post("/jobs", json={"id": "j1", "dataset": "mnist"}, headers=AUTH),
        api.client.post("/jobs", json={"id": "j1", "dataset": "mnist"}, headers=AUTH),
        api.client.post("/jobs", json={"dataset": "nope", "algorithm": {"x": TOKEN}}, headers=AUTH),
        api.client.post(
            "/jobs", json={"dataset": "mnist"}, headers={"Authorization": f"Bearer {TOKEN[:-1]}"}
        ),
        api.client.post("/jobs", json={"dataset": "mnist"}, headers={"Authorization": f"Basic {TOKEN}"}),
        api.client.get("/jobs", headers=AUTH),
        api.client.get("/health", headers=AUTH),
        api.client.get("/openapi.json"),
    ]
    for response in responses:
        assert TOKEN not in response.text
        assert TOKEN not in str(response.headers)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(api.settings) and TOKEN not in str(api.settings)


# ---------------------------------------------------------------------------------------------- settings
def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDGEN_DATABASE_URL", "postgresql://fedgen:dbpass@db:5432/fedgen")
    monkeypatch.setenv("FEDGEN_BROKER_URL", "mqtts://user:brokerpw@broker:8883")
    monkeypatch.setenv("FEDGEN_BROKER_PASSWORD", "brokerpw")
    monkeypatch.setenv("FEDGEN_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("FEDGEN_PORT", "9000")
    monkeypatch.setenv("FEDGEN_ARTIFACT_DIR", str(tmp_path))
    settings = ServerSettings()
    assert settings.database_url == "postgresql+psycopg://fedgen:dbpass@db:5432/fedgen"
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == TOKEN
    assert settings.port == 9000 and settings.artifact_dir == tmp_path
    for text in (repr(settings), str(settings)):
        assert TOKEN not in text and "dbpass" not in text and "brokerpw" not in text


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DATABASE_URL",
        "BROKER_URL",
        "ADMIN_TOKEN",
        "HOST",
        "PORT",
        "MAX_UPLOAD_BYTES",
        "ARTIFACT_DIR",
    ):
        monkeypatch.delenv(f"FEDGEN_{name}", raising=False)
    monkeypatch.setenv("FEDGEN_BROKER_PASSWORD", "")
    settings = ServerSettings()
    assert settings.database_url == "sqlite:///fedgen.db"
    assert settings.broker_url == "mqtt://127.0.0.1:1883" and settings.broker_password is None
    assert settings.admin_token is None and settings.broker_tls_ca is None
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_upload_bytes == 16 * 1024 * 1024 and settings.artifact_dir == Path("fedgen-artifacts")


def test_a_job_waiting_for_devices_says_so(api: Api) -> None:
    seed_job(api.factory, "waiting-job")
    seed_job(api.factory, "other-job")
    assert api.client.get("/jobs/waiting-job").json()["waiting_for_devices"] == "3 of 10"
    assert api.client.get("/jobs/other-job").json()["waiting_for_devices"] is None
    listed = {j["id"]: j["waiting_for_devices"] for j in api.client.get("/jobs").json()["items"]}
    assert listed == {"waiting-job": "3 of 10", "other-job": None}


def test_api_docs_need_no_internet(api: Api) -> None:
    """/docs and /redoc load their scripts from this server (air-gapped sites have no CDN)."""
    for page in ("/docs", "/redoc"):
        html = api.client.get(page).text
        scripts = re.findall(r'<script src="([^"]+)"', html)
        assert scripts and all(src.startswith("/") for src in scripts), (page, scripts)
        for src in scripts:
            assert api.client.get(src).status_code == 200, src
        assert "cdn.jsdelivr" not in html and "unpkg.com" not in html and "fonts.googleapis" not in html


def test_job_control_transitions(api: Api) -> None:
    seed_job(api.factory, "ctl-job", status="running")
    post = lambda action, **kw: api.client.post(f"/jobs/ctl-job/{action}", **kw)  # noqa: E731
    assert_error(post("pause"), 401, "unauthorized")
    assert post("pause", headers=AUTH).json()["status"] == "paused"
    assert_error(post("pause", headers=AUTH), 409, "conflict")
    assert post("resume", headers=AUTH).json()["status"] == "running"
    assert_error(post("resume", headers=AUTH), 409, "conflict")
    cancelled = post("cancel", headers=AUTH).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] and cancelled["error"]
    for action in ("pause", "resume", "cancel"):
        assert_error(post(action, headers=AUTH), 409, "conflict")
    assert_error(api.client.post("/jobs/no-such-job/cancel", headers=AUTH), 404, "not_found")


def test_metrics_are_prometheus_text(api: Api) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    response = api.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in ("fedgen_rounds", "fedgen_updates", "fedgen_devices_online", "fedgen_round_close_seconds",
                 "fedgen_ingest_seconds", "fedgen_generator_training_seconds", "fedgen_database_up",
                 "fedgen_broker_connected", "fedgen_bytes_received", "fedgen_bytes_published"):
        assert name in families, name
    assert families["fedgen_database_up"].samples[0].value == 1.0
    assert families["fedgen_broker_connected"].samples[0].value == 1.0  # FakeOrchestrator: connected
