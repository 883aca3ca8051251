"""The round server's schema, migrations, retries and artifact store, on real SQLite and PostgreSQL.

Tests taking ``db_url`` / ``session_factory`` run once per backend (see tests/db_fixtures.py).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from server_api.db import (
    Artifact,
    Base,
    Client,
    ClientStatus,
    ClientUpdate,
    Job,
    JobStatus,
    ModelVersion,
    Round,
    RoundStatus,
    UpdateStatus,
    database_url,
    downgrade_schema,
    in_transaction,
    make_engine,
    queries,
    retry_attempts,
    retrying,
    upgrade_schema,
    utcnow,
    validate_job_id,
)
from server_api.db.engine import DEFAULT_DATABASE_URL, ENV_VAR
from server_api.db.store import (
    PACK_MAX_BLOB,
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ArtifactStore,
    InvalidDigestError,
)
from shared.fsutil import sha256_hex

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {"jobs", "clients", "rounds", "updates", "model_versions", "artifacts", "job_leases"}
HEAD = "0005"  # the newest migration
SHA_A, SHA_B, SHA_C = (sha256_hex(x) for x in (b"a", b"b", b"c"))


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _add_job(session: Session, job_id: str = "job-1", **kwargs: object) -> Job:
    job = Job(id=job_id, config={"algorithm": "fedgen", "rounds": 3}, **kwargs)
    session.add(job)
    return job


def _add_round(session: Session, job: Job, index: int = 0, attempt: int = 0, **kwargs: object) -> Round:
    rnd = Round(job=job, index=index, attempt=attempt, deadline=utcnow() + timedelta(seconds=60), **kwargs)
    session.add(rnd)
    return rnd


def _update(job_id: str, rnd: Round, key: str, client: str = "dev-1", **kwargs: object) -> ClientUpdate:
    fields: dict[str, object] = {
        "job_id": job_id,
        "round": rnd,
        "client_id": client,
        "idempotency_key": key,
        "base_version": 0,
        "num_samples": 10,
        "status": UpdateStatus.ACCEPTED,
        **kwargs,
    }
    return ClientUpdate(**fields)


# --------------------------------------------------------------------------------------------- migrations


def test_upgrade_creates_every_table_and_is_idempotent(db_url: str) -> None:
    upgrade_schema(db_url)
    assert TABLES | {"alembic_version"} == _tables(db_url)
    upgrade_schema(db_url)  # second start of the server: nothing to do
    assert TABLES | {"alembic_version"} == _tables(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]
    engine.dispose()


def test_migrated_schema_matches_models(db_url: str, db_engine: Engine) -> None:
    """Guards against a model edited without a migration (or the other way round)."""
    upgrade_schema(db_url)
    with db_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], "models and migrations differ; add a migration (docs/database.md):\n" + "\n".join(
        map(repr, diff)
    )


def test_downgrade_to_base_then_upgrade_again(db_url: str, db_engine: Engine) -> None:
    upgrade_schema(db_url)
    with Session(db_engine) as s, s.begin():
        _add_job(s)
    downgrade_schema(db_url, "base")
    assert _tables(db_url) <= {"alembic_version"}
    upgrade_schema(db_url)
    assert TABLES <= _tables(db_url)
    with Session(db_engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0


def test_alembic_command_line(db_url: str) -> None:
    """``alembic -x url=... upgrade head`` and ``FEDGEN_DATABASE_URL=... alembic ...`` both work."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini")]
    up = subprocess.run(
        [*alembic, "-x", f"url={db_url}", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    current = subprocess.run(
        [*alembic, "current"],
        cwd=REPO_ROOT,
        env={**env, ENV_VAR: db_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert current.returncode == 0, current.stderr
    assert f"{HEAD} (head)" in current.stdout
    assert TABLES <= _tables(db_url)


# ------------------------------------------------------------------------------------------ data round trip


def test_round_trip_job_clients_rounds_updates_versions(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as s:
        job = _add_job(s, "mnist-fedgen_01", status=JobStatus.RUNNING, current_round=1)
        job.config = {
            "algorithm": {"name": "fedgen", "local_steps": 20},
            "dataset": "mnist",
            "seed": 7,
            "min_clients": 2,
            "round_deadline_s": 60.5,
            "active": ["dev-1", "dev-2"],
        }
        s.add(
            Client(
                job=job,
                client_id="dev-1",
                device_info={"arch": "aarch64", "ram_mb": 4096},
                num_samples=600,
                state_version=1,
            )
        )
        r0 = _add_round(
            s,
            job,
            0,
            selected=["dev-1", "dev-2"],
            status=RoundStatus.CLOSED,
            accuracy=0.91,
            loss=0.3,
            generator_loss=1.25,
            bytes_up=5_000_000_000,
            bytes_down=123,
            num_updates=2,
            model_version=1,
            closed_at=utcnow(),
        )
        r1 = _add_round(s, job, 1, selected=["dev-1"])
        s.add_all(
            [
                _update(
                    job.id,
                    r0,
                    "k0",
                    label_counts=[3, 0, 7],
                    metrics={"accuracy": 0.5, "loss": 1.5, "n_test": 40},
                    payload_sha256=SHA_A,
                    payload_bytes=2048,
                ),
                _update(
                    job.id,
                    r0,
                    "k1",
                    client="dev-2",
                    status=UpdateStatus.REJECTED,
                    reason="stale base_version",
                    label_counts=[1, 1, 1],
                ),
                _update(job.id, r1, "k2", base_version=1, label_counts=[0, 5, 5], payload_sha256=SHA_B),
            ]
        )
        s.add_all(
            [
                Artifact(sha256=SHA_A, size=2048, kind="update"),
                ModelVersion(
                    job=job,
                    version=0,
                    state_sha256=SHA_A,
                    model_onnx_sha256=SHA_B,
                    predictor_onnx_sha256=SHA_C,
                ),
                ModelVersion(
                    job=job,
                    version=1,
                    round_index=0,
                    state_sha256=SHA_B,
                    model_onnx_sha256=SHA_C,
                    predictor_onnx_sha256=SHA_A,
                    generator_onnx_sha256=SHA_A,
                    server_state_sha256=SHA_C,
                    delta_sha256=SHA_A,
                    delta_base_version=0,
                ),
            ]
        )

    with session_factory() as s:
        job = s.get_one(Job, "mnist-fedgen_01")
        assert job.status is JobStatus.RUNNING and job.status == "running"
        assert job.config["algorithm"] == {"name": "fedgen", "local_steps": 20}
        assert job.config["round_deadline_s"] == 60.5
        assert [(c.client_id, c.device_info["ram_mb"], c.status) for c in job.clients] == [
            ("dev-1", 4096, ClientStatus.ONLINE)
        ]
        r0, r1 = job.rounds
        assert (r0.index, r0.attempt, r0.status, r0.selected) == (
            0,
            0,
            RoundStatus.CLOSED,
            ["dev-1", "dev-2"],
        )
        assert (r0.accuracy, r0.generator_loss, r0.bytes_up, r0.model_version) == (
            0.91,
            1.25,
            5_000_000_000,
            1,
        )
        assert (r1.index, r1.status, r1.bytes_up, r1.num_updates, r1.closed_at) == (
            1,
            RoundStatus.OPEN,
            0,
            0,
            None,
        )
        accepted = s.scalars(
            select(ClientUpdate).where(
                ClientUpdate.round_id == r0.id, ClientUpdate.status == UpdateStatus.ACCEPTED
            )
        ).all()
        assert [(u.idempotency_key, u.label_counts, u.metrics["n_test"]) for u in accepted] == [
            ("k0", [3, 0, 7], 40)
        ]
        rejected = s.scalars(select(ClientUpdate).where(ClientUpdate.status == "rejected")).one()
        assert (rejected.reason, rejected.payload_sha256, rejected.payload_bytes) == (
            "stale base_version",
            None,
            0,
        )
        assert [u.idempotency_key for u in r1.updates] == ["k2"]
        v0, v1 = job.model_versions
        assert (v0.version, v0.round_index, v0.delta_sha256, v0.generator_onnx_sha256) == (
            0,
            None,
            None,
            None,
        )
        assert (v1.round_index, v1.delta_sha256, v1.delta_base_version, v1.server_state_sha256) == (
            0,
            SHA_A,
            0,
            SHA_C,
        )
        assert s.get_one(Artifact, SHA_A).size == 2048


def test_idempotency_key_unique_per_job(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as s:
        job_a, job_b = _add_job(s, "job-a"), _add_job(s, "job-b")
        r_a, r_b = _add_round(s, job_a), _add_round(s, job_b)
        s.add(_update("job-a", r_a, "delivery-1"))
    with session_factory() as s:
        s.add(_update("job-a", s.get_one(Round, r_a.id), "delivery-1"))
        with pytest.raises(IntegrityError):
            s.commit()
    with session_factory.begin() as s:  # the same key in another job is a different delivery
        s.add(_update("job-b", s.get_one(Round, r_b.id), "delivery-1"))
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(ClientUpdate)) == 2


def test_round_unique_per_job_index_attempt(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as s:
        job = _add_job(s)
        _add_round(s, job, 0, 0, status=RoundStatus.FAILED, failure_reason="too few updates")
    with session_factory() as s:
        _add_round(s, s.get_one(Job, "job-1"), 0, 0)
        with pytest.raises(IntegrityError):
            s.commit()
    with session_factory.begin() as s:  # the retry of a failed round is attempt + 1
        _add_round(s, s.get_one(Job, "job-1"), 0, 1)
    with session_factory() as s:
        assert [(r.index, r.attempt) for r in s.get_one(Job, "job-1").rounds] == [(0, 0), (0, 1)]


def test_timestamps_are_timezone_aware_utc(session_factory: sessionmaker[Session]) -> None:
    plus_two = timezone(timedelta(hours=2))
    finished = datetime(2025, 6, 1, 14, 30, 15, 250000, tzinfo=plus_two)
    with session_factory.begin() as s:
        _add_job(s, finished_at=finished)
    with session_factory() as s:
        job = s.get_one(Job, "job-1")
        for value in (job.created_at, job.updated_at, job.finished_at):
            assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
        assert job.finished_at == finished and job.finished_at.hour == 12
        assert abs(job.created_at - utcnow()) < timedelta(minutes=5)
        # comparisons in SQL work across the stored representation too
        assert s.scalar(
            select(Job.id).where(Job.finished_at < datetime(2025, 6, 1, 12, 31, tzinfo=timezone.utc))
        )
        # a server-side default (CURRENT_TIMESTAMP / now()) also comes back aware UTC
        s.execute(text("INSERT INTO artifacts (sha256, size, kind) VALUES (:sha, 1, 'raw')"), {"sha": SHA_C})
        created = s.get_one(Artifact, SHA_C).created_at
        assert created.utcoffset() == timedelta(0) and abs(created - utcnow()) < timedelta(minutes=5)


def test_json_values_are_portable(session_factory: sessionmaker[Session]) -> None:
    """numpy label counts are stored as ints; NaN/Infinity (JSONB rejects them) become null on both."""
    np = pytest.importorskip("numpy")
    with session_factory.begin() as s:
        job = _add_job(s)
        s.add(
            _update(
                job.id,
                _add_round(s, job),
                "k",
                label_counts=np.bincount([0, 2, 2], minlength=4),
                metrics={"loss": float("nan"), "accuracy": np.float32(0.5), "hist": [float("inf"), 1.0]},
            )
        )
    with session_factory() as s:
        update = s.scalars(select(ClientUpdate)).one()
        assert update.label_counts == [1, 0, 2, 0]
        assert update.metrics == {"loss": None, "accuracy": 0.5, "hist": [None, 1.0]}


def test_naive_datetime_is_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s:
        _add_job(s, finished_at=datetime(2025, 1, 1))
        with pytest.raises(StatementError, match="naive datetime"):
            s.commit()


def test_constraints_are_enforced(session_factory: sessionmaker[Session]) -> None:
    """Foreign keys (SQLite: PRAGMA foreign_keys) and CHECK constraints hold even for raw SQL."""
    with session_factory.begin() as s:
        _add_job(s)
    bad_statements = [
        # foreign key
        "INSERT INTO clients (job_id, client_id, device_info) VALUES ('no-such-job', 'd', '{}')",
        # CHECK constraints
        "UPDATE jobs SET status = 'exploded'",
        "UPDATE jobs SET current_round = -1",
        (
            "INSERT INTO model_versions (job_id, version, state_sha256, model_onnx_sha256, "
            f"predictor_onnx_sha256, delta_sha256) VALUES ('job-1', 1, '{SHA_A}', '{SHA_A}', '{SHA_A}', "
            f"'{SHA_A}')"
        ),
    ]
    for statement in bad_statements:
        with session_factory() as s, pytest.raises(IntegrityError):
            s.execute(text(statement))
            s.commit()


def test_deleting_a_job_deletes_its_rows(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as s:
        job = _add_job(s)
        s.add(Client(job=job, client_id="dev-1"))
        s.add(_update(job.id, _add_round(s, job), "k"))
        s.add(
            ModelVersion(
                job=job, version=0, state_sha256=SHA_A, model_onnx_sha256=SHA_A, predictor_onnx_sha256=SHA_A
            )
        )
    with session_factory.begin() as s:  # database-side ON DELETE CASCADE
        s.execute(text("DELETE FROM jobs WHERE id = 'job-1'"))
    with session_factory() as s:
        for model in (Client, Round, ClientUpdate, ModelVersion):
            assert s.scalar(select(func.count()).select_from(model)) == 0


@pytest.mark.parametrize("job_id", ["a", "mnist-fedgen", "0_run-2", "Upper.case", "x" * 63])
def test_valid_job_ids(job_id: str) -> None:
    assert validate_job_id(job_id) == job_id
    assert Job(id=job_id).id == job_id


@pytest.mark.parametrize("job_id", ["", "-lead", "_lead", ".lead", "has space", "a/b", "../x", "x" * 64, "é"])
def test_invalid_job_ids(job_id: str) -> None:
    with pytest.raises(ValueError, match="invalid job id"):
        Job(id=job_id)


def test_sqlite_engine_settings(fresh_sqlite_url: str) -> None:
    engine = make_engine(fresh_sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_database_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert database_url(None) == DEFAULT_DATABASE_URL == "sqlite:///fedgen.db"
    monkeypatch.setenv(ENV_VAR, "postgresql://u:p%40ss@db:5432/fedgen")
    assert database_url(None) == "postgresql+psycopg://u:p%40ss@db:5432/fedgen"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"
    assert database_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert database_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"


# ----------------------------------------------------------------------------------------------- retries


def _terminate_backends(db_url: str, pid: int | None = None) -> int:
    """Kill PostgreSQL backends of the test database (one, or all but ours), as a server restart does."""
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND (CAST(:pid AS integer) IS NULL OR pid = :pid)"
                    ),
                    {"pid": pid},
                ).all()
            )
    finally:
        admin.dispose()


def test_retrying_recovers_from_a_real_database_failure(
    db_url: str, session_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL: the session's backend is killed mid-transaction. SQLite: another connection holds the
    write lock past a short busy timeout ("database is locked"). Either way the retry succeeds."""
    engine = make_engine(db_url, **({"busy_timeout": 0.2} if db_url.startswith("sqlite") else {}))
    factory = sessionmaker(engine, expire_on_commit=False)
    blocker = None
    if db_url.startswith("sqlite"):
        blocker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    calls = []

    def write_job(s: Session) -> str:
        calls.append(1)
        if len(calls) == 1:
            if blocker is not None:
                blocker.execute("BEGIN EXCLUSIVE")
            else:
                assert (
                    _terminate_backends(db_url, s.execute(text("SELECT pg_backend_pid()")).scalar_one()) == 1
                )
        elif blocker is not None and blocker.in_transaction:
            blocker.execute("ROLLBACK")
        s.add(Job(id="after-blip"))
        return "ok"

    try:
        assert in_transaction(factory, write_job, attempts=3, delay=0.01) == "ok"
    finally:
        if blocker is not None:
            blocker.close()
        engine.dispose()
    assert len(calls) == 2
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 1
    with session_factory() as s:
        assert s.get(Job, "after-blip") is not None


def test_pool_survives_a_postgres_restart(fresh_postgres_url: str) -> None:
    """Pooled connections killed while idle are replaced transparently (pool_pre_ping)."""
    upgrade_schema(fresh_postgres_url)
    engine = make_engine(fresh_postgres_url)
    try:
        with Session(engine) as s, s.begin():
            _add_job(s)
        assert _terminate_backends(fresh_postgres_url) >= 1
        with Session(engine) as s:
            assert s.get_one(Job, "job-1").status is JobStatus.CREATED
    finally:
        engine.dispose()


def test_postgres_plans_every_query_with_its_values(fresh_postgres_url: str) -> None:
    """No server-side prepared statements: PostgreSQL's generic plan for the ingest's key lookup
    (`idempotency_key IN (256 keys)`) took 50-77 ms against 3 ms planned with the values."""
    upgrade_schema(fresh_postgres_url)
    engine = make_engine(fresh_postgres_url)
    try:
        keys = [f"key-{i}" for i in range(256)]
        with Session(engine) as s:
            for _ in range(10):  # psycopg's default prepares a query on its 5th run
                assert queries.updates_by_keys(s, "job-1", keys) == []
            assert s.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar_one() == 0
    finally:
        engine.dispose()


def test_concurrent_upgrades(db_url: str) -> None:
    """Server processes (and threads) starting at once: one migrates, the others wait and find the head."""
    start = time.time() + 3.0  # all start together, once the processes have imported everything
    code = (
        "import sys, time; from server_api.db import upgrade_schema; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); upgrade_schema(sys.argv[1])"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url, str(start)], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]

    def upgrade_at_start() -> None:
        time.sleep(max(0.0, start - time.time()))
        upgrade_schema(db_url)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(upgrade_at_start) for _ in range(2)]:
            future.result(timeout=120)
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    assert TABLES <= _tables(db_url)


def test_retrying_does_not_retry_integrity_errors(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as s:
        _add_job(s)
    calls = []

    def duplicate(s: Session) -> None:
        calls.append(1)
        s.add(Job(id="job-1"))

    with pytest.raises(IntegrityError):
        in_transaction(session_factory, duplicate, attempts=5, delay=0.01)
    assert len(calls) == 1


def _operational_error() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_retrying_succeeds_after_transient_errors(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise _operational_error()
        return 42

    assert retrying(flaky, attempts=3, delay=0.001) == 42
    assert len(calls) == 3
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2


def test_retrying_gives_up_after_n_attempts() -> None:
    calls = []

    def always_down() -> None:
        calls.append(1)
        raise _operational_error()

    with pytest.raises(OperationalError):
        retrying(always_down, attempts=4, delay=0.001)
    assert len(calls) == 4
    with pytest.raises(ValueError):
        retrying(always_down, attempts=0)


def test_retry_attempts_block_form() -> None:
    calls = []
    for attempt in retry_attempts(5, 0.001):
        with attempt:
            calls.append(1)
            if len(calls) < 2:
                raise _operational_error()
    assert len(calls) == 2

    calls.clear()
    with pytest.raises(OperationalError):
        for attempt in retry_attempts(3, 0.001):
            with attempt:
                calls.append(1)
                raise _operational_error()
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------ artifact store


def test_store_round_trip(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(100_000)
    sha = store.put(data)
    assert sha == sha256_hex(data)
    assert store.path(sha) == tmp_path / "artifacts" / sha[:2] / sha[2:]
    assert store.has(sha) and store.get(sha) == data and store.size(sha) == len(data)
    assert store.get(store.put(b"")) == b""


def test_store_put_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put(b"model state")
    mtime = store.path(sha).stat().st_mtime_ns
    assert store.put(b"model state") == sha
    assert store.path(sha).stat().st_mtime_ns == mtime  # not rewritten
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [sha[2:]]  # no temp files left


@pytest.mark.parametrize("with_syncfs", [True, False])
def test_store_ingest_batch_packs_small_updates_and_files_large_ones(tmp_path: Path, monkeypatch,
                                                                      with_syncfs: bool) -> None:
    """The group-commit write of an ingest batch: the small updates in one pack file, the large ones a
    content-addressed blob each (one already there not rewritten); one syncfs, or without it every file
    synced; every blob read back from where its row would say and checked; no temp files left."""
    import server_api.db.store as store_module

    if not with_syncfs:
        monkeypatch.setattr(store_module, "syncfs", lambda path: False)
    store = ArtifactStore(tmp_path)
    kept = os.urandom(PACK_MAX_BLOB + 1)
    store.put(kept)
    mtime = store.path(sha256_hex(kept)).stat().st_mtime_ns
    blobs = [os.urandom(n) for n in (2000, 1, PACK_MAX_BLOB, 0)] + [os.urandom(PACK_MAX_BLOB + 2), kept]
    places = store.put_updates(blobs, [sha256_hex(b) for b in blobs])
    (name, _), *_ = places
    assert places == [(name, 0), (name, 2000), (name, 2001), (name, 2001 + PACK_MAX_BLOB), (None, None),
                      (None, None)]
    files = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert files == {store.pack_path(name), store.path(sha256_hex(blobs[4])), store.path(sha256_hex(kept))}
    assert store.path(sha256_hex(kept)).stat().st_mtime_ns == mtime
    for blob, (pack, offset) in zip(blobs, places):
        assert store.get_update(sha256_hex(blob), pack, offset, len(blob) if pack else None) == blob
    assert store.put_updates(blobs[:1], [sha256_hex(blobs[0])])[0][0] != name  # a new pack every batch
    assert store.put_updates([blobs[4]], [sha256_hex(blobs[4])]) == [(None, None)]


def test_store_pack_refuses_corrupt_truncated_and_misnamed(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    blobs = [b"first update", b"second update"]
    (name, first), (_, second) = store.put_updates(blobs, [sha256_hex(b) for b in blobs])
    offsets = [first, second]
    with pytest.raises(ArtifactCorruptError):  # the wrong place: the bytes do not hash to the row's sha256
        store.get_packed(name, offsets[0] + 1, len(blobs[0]), sha256_hex(blobs[0]))
    with pytest.raises(ArtifactCorruptError):  # beyond the end of the pack
        store.get_packed(name, offsets[1], len(blobs[1]) + 5, sha256_hex(blobs[1]))
    path = store.pack_path(name)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ArtifactCorruptError):
        store.get_packed(name, offsets[1], len(blobs[1]), sha256_hex(blobs[1]))
    assert store.get_packed(name, offsets[0], len(blobs[0]), sha256_hex(blobs[0])) == blobs[0]
    with pytest.raises(ArtifactNotFoundError):
        store.get_packed("0" * 32, 0, 1, SHA_A)
    for bad in ("../" + "0" * 29, "0" * 31, "A" * 32, SHA_A):
        with pytest.raises(InvalidDigestError):
            store.get_packed(bad, 0, 1, SHA_A)


def test_store_detects_corruption(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    sha = store.put(b"\x00\x01weights\x02")
    path = store.path(sha)
    raw = bytearray(path.read_bytes())
    raw[3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactCorruptError, match=f"artifact {sha} is corrupt"):
        store.get(sha)
    assert store.put(b"\x00\x01weights\x02") == sha  # a put of the right content repairs it
    assert store.get(sha) == b"\x00\x01weights\x02"


def test_store_missing_artifact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert not store.has(SHA_A)
    with pytest.raises(ArtifactNotFoundError, match="not found"):
        store.get(SHA_A)


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "../../" + "a" * 58,
        SHA_A.upper(),
        SHA_A[:63],
        SHA_A + "0",
        "",
        "/" + SHA_A[1:],
        SHA_A[:2] + "/" + SHA_A[3:],
        "g" * 64,
        SHA_A[:63] + "\n",
    ],
)
def test_store_rejects_bad_names(tmp_path: Path, name: str) -> None:
    store = ArtifactStore(tmp_path)
    for method in (store.path, store.has, store.get):
        with pytest.raises(InvalidDigestError):
            method(name)
