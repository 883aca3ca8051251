"""The persistent state of one job, as the round engine sees it: `JobStore`.

The engine never writes SQL: it reads and writes plain records through a `JobStore`. `SqlJobStore` is the
real one (the named queries of `server_api.db.queries`, each call one committed transaction, retried while the
database is away); tests use an in-memory store with the same interface (tests/server/memory_store.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server_api.db import queries
from server_api.db.engine import in_transaction
from server_api.db.models import (
    Artifact,
    Client,
    ClientStatus,
    ClientUpdate,
    Job,
    JobLease,
    JobStatus,
    ModelVersion,
    Round,
    RoundStatus,
    UpdateStatus,
    utcnow,
)
from server_api.db.store import ArtifactStore

T = TypeVar("T")


class RoundClosed(Exception):
    """Accepted updates arrived for a round that is no longer open (another process began closing it)."""


class LeaseLost(Exception):
    """This process no longer holds the job's lease: another one runs its rounds now."""


DB_ATTEMPTS = 30  # ~ a few minutes of backoff: a PostgreSQL restart must not lose a round


# ------------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class JobRecord:
    id: str
    status: str
    current_round: int
    config: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class VersionRecord:
    """A model version and the sha256 of each of its blobs in the artifact store."""

    version: int
    round_index: int | None  # the round that produced it (None: the initial model)
    state_sha256: str
    model_onnx: str
    predictor_onnx: str
    server_state: str
    generator_onnx: str | None = None
    delta: str | None = None
    delta_base_version: int | None = None

    def blobs(self) -> dict[str, str]:
        """kind -> sha256 of every blob the version has."""
        named = {"model_onnx": self.model_onnx, "predictor_onnx": self.predictor_onnx,
                 "server_state": self.server_state, "generator_onnx": self.generator_onnx, "delta": self.delta}
        return {kind: sha for kind, sha in named.items() if sha}


@dataclass(frozen=True)
class RoundRecord:
    id: int
    index: int
    attempt: int
    status: str
    selected: list[str]
    deadline: datetime


@dataclass(frozen=True)
class UpdateRecord:
    """One delivery of an update, accepted (with its payload in the store) or rejected (with the reason)."""

    round_id: int
    client_id: str
    idempotency_key: str
    status: str  # accepted | rejected
    base_version: int = 0
    num_samples: int = 0
    label_counts: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    payload_sha256: str | None = None
    payload_bytes: int = 0
    model: str | None = None  # the model it was trained with (None: not recorded, rows before migration 0004)
    payload_pack: str | None = None  # where its tensors lie in the store: pack, offset, length (None: a blob
    payload_offset: int | None = None  # of its own at payload_sha256, rows before migration 0005)
    payload_length: int | None = None

    def payload(self, store: ArtifactStore) -> bytes:
        """The accepted update's tensors (safetensors bytes) from the store, verified against its sha256."""
        return store.get_update(self.payload_sha256, self.payload_pack, self.payload_offset, self.payload_length)


@dataclass(frozen=True)
class RoundResult:
    """What closing a round writes to its row."""

    status: str  # closed | failed
    num_updates: int
    bytes_up: int
    bytes_down: int = 0
    accuracy: float | None = None
    loss: float | None = None
    generator_loss: float | None = None
    model_version: int | None = None
    failure_reason: str | None = None
    model_stats: dict[str, dict[str, float | int | None]] | None = None  # per model, jobs with several


@dataclass(frozen=True)
class ClientRecord:
    client_id: str
    status: str
    num_samples: int | None
    state_version: int | None
    device_info: dict[str, Any]
    last_seen: datetime | None = field(default=None, compare=False)


class JobStore(Protocol):
    """Everything the round engine reads and writes about one job. Each method is one unit of work."""

    job_id: str

    def job(self) -> JobRecord: ...
    def set_job_status(self, status: str, error: str | None = None, finished: bool = False) -> None: ...
    # versions
    def latest_version(self) -> VersionRecord | None: ...
    def version(self, number: int) -> VersionRecord | None: ...
    def add_version(self, record: VersionRecord, sizes: dict[str, int],
                    closes: tuple[int, RoundResult] | None = None) -> None: ...
    # rounds
    def attempt_count(self, index: int) -> int: ...
    def unfinished_round(self, index: int) -> RoundRecord | None: ...
    def create_round(self, index: int, attempt: int, selected: Sequence[str], deadline: datetime) -> int: ...
    def set_round_status(self, round_id: int, status: str) -> None: ...
    def finish_round(self, round_id: int, result: RoundResult) -> None: ...
    def round_id(self, index: int, attempt: int) -> int | None: ...
    def latest_round_id(self) -> int | None: ...
    # updates
    def find_update(self, key: str) -> UpdateRecord | None: ...
    def find_updates(self, keys: Sequence[str]) -> dict[str, UpdateRecord]: ...
    def add_update(self, record: UpdateRecord) -> bool: ...
    def add_updates(self, records: Sequence[UpdateRecord]) -> list[bool]: ...
    def accepted_updates(self, round_id: int) -> list[UpdateRecord]: ...
    def accepted_clients(self, round_id: int) -> set[str]: ...
    # leases (several server processes on one job)
    def acquire_lease(self, holder: str, ttl_s: float) -> bool: ...
    def release_lease(self, holder: str) -> None: ...
    # clients
    def online_clients(self) -> list[ClientRecord]: ...
    def all_clients(self) -> list[ClientRecord]: ...
    def clients_by_id(self, client_ids: Sequence[str]) -> dict[str, ClientRecord]: ...
    def save_clients(self, records: Sequence[ClientRecord]) -> None: ...


# ------------------------------------------------------------------------------------------------- SQL
class SqlJobStore:
    """`JobStore` on the server's database. `healthy` is cleared while a call is failing and set again when
    one succeeds (what /health reports)."""

    def __init__(self, job_id: str, factory: sessionmaker[Session], healthy: threading.Event | None = None):
        self.job_id = job_id
        self._factory = factory
        self.healthy = healthy if healthy is not None else threading.Event()
        # while set, every write that moves the job's rounds on checks in its transaction that this holder
        # still has the job's lease (LeaseLost otherwise): a process that lost it cannot close a round
        self.fence: str | None = None

    def _tx(self, fn: Callable[[Session], T]) -> T:
        try:
            result = in_transaction(self._factory, fn, attempts=DB_ATTEMPTS, delay=0.2)
        except (LeaseLost, RoundClosed):  # answers of a healthy database
            self.healthy.set()
            raise
        except Exception:
            self.healthy.clear()
            raise
        self.healthy.set()
        return result

    def _fenced(self, fn: Callable[[Session], T]) -> T:
        """`fn` in a transaction that first checks (and locks until it ends) this process's lease."""
        holder = self.fence

        def write(s: Session) -> T:
            if holder is not None:
                lease = s.scalars(select(JobLease).where(JobLease.job_id == self.job_id).with_for_update()).first()
                if lease is None or lease.holder != holder or lease.expires_at <= utcnow():
                    raise LeaseLost(f"job {self.job_id}: the lease is held by "
                                    f"{lease.holder if lease else 'nobody'}, not by {holder}")
            return fn(s)
        return self._tx(write)

    # -------------------------------------------------------------------------------------- lease
    def acquire_lease(self, holder: str, ttl_s: float) -> bool:
        """Take (or renew) the job's lease for `ttl_s` seconds unless another holder's is still valid; True if
        `holder` holds it now. One conditional UPDATE, so two processes cannot both take an expired lease."""
        def write(s: Session) -> bool:
            now = utcnow()
            taken = s.execute(update(JobLease).where(
                JobLease.job_id == self.job_id, or_(JobLease.holder == holder, JobLease.expires_at <= now))
                .values(holder=holder, expires_at=now + timedelta(seconds=ttl_s))
                .execution_options(synchronize_session=False)).rowcount
            if taken:
                return True
            if s.get(JobLease, self.job_id) is not None:
                return False
            s.add(JobLease(job_id=self.job_id, holder=holder, expires_at=now + timedelta(seconds=ttl_s)))
            s.flush()
            return True
        try:
            return self._tx(write)
        except IntegrityError:  # another process inserted the first lease row meanwhile
            return False

    def release_lease(self, holder: str) -> None:
        """Give the lease up at once (a clean stop), if `holder` has it."""
        def write(s: Session) -> None:
            s.execute(update(JobLease).where(JobLease.job_id == self.job_id, JobLease.holder == holder)
                      .values(expires_at=utcnow()).execution_options(synchronize_session=False))
        self._tx(write)

    # -------------------------------------------------------------------------------------- job
    def job(self) -> JobRecord:
        def read(s: Session) -> JobRecord:
            job = s.get(Job, self.job_id)
            if job is None:
                raise LookupError(f"job {self.job_id} does not exist")
            return JobRecord(job.id, job.status.value, job.current_round, dict(job.config), job.error)
        return self._tx(read)

    def set_job_status(self, status: str, error: str | None = None, finished: bool = False) -> None:
        def write(s: Session) -> None:
            job = s.get(Job, self.job_id)
            job.status = JobStatus(status)
            if error:
                job.error = error[:2000]
            if finished:
                job.finished_at = utcnow()
        self._tx(write)

    # -------------------------------------------------------------------------------------- versions
    def latest_version(self) -> VersionRecord | None:
        return self._tx(lambda s: _version_record(queries.latest_version(s, self.job_id)))

    def version(self, number: int) -> VersionRecord | None:
        return self._tx(lambda s: _version_record(s.get(ModelVersion, (self.job_id, number))))

    def add_version(self, record: VersionRecord, sizes: dict[str, int],
                    closes: tuple[int, RoundResult] | None = None) -> None:
        """The version row and its blobs' index rows; with `closes` (round id, result), in the same transaction
        the round's row is closed and the job moves on to the next round."""
        def write(s: Session) -> None:
            for kind, sha in record.blobs().items():
                if s.get(Artifact, sha) is None:
                    s.add(Artifact(sha256=sha, size=sizes[kind], kind=kind))
            s.add(ModelVersion(
                job_id=self.job_id, version=record.version, round_index=record.round_index,
                state_sha256=record.state_sha256, model_onnx_sha256=record.model_onnx,
                predictor_onnx_sha256=record.predictor_onnx, generator_onnx_sha256=record.generator_onnx,
                server_state_sha256=record.server_state, delta_sha256=record.delta,
                delta_base_version=record.delta_base_version))
            if closes is not None:
                round_id, result = closes
                row = _finish_round_row(s, round_id, result)
                s.get(Job, self.job_id).current_round = row.index + 1
        self._fenced(write)

    # -------------------------------------------------------------------------------------- rounds
    def attempt_count(self, index: int) -> int:
        return self._tx(lambda s: queries.attempt_count(s, self.job_id, index))

    def unfinished_round(self, index: int) -> RoundRecord | None:
        return self._tx(lambda s: _round_record(queries.unfinished_round(s, self.job_id, index)))

    def create_round(self, index: int, attempt: int, selected: Sequence[str], deadline: datetime) -> int:
        def write(s: Session) -> int:
            row = Round(job_id=self.job_id, index=index, attempt=attempt, selected=list(selected),
                        deadline=deadline, status=RoundStatus.OPEN)
            s.add(row)
            s.flush()
            return row.id
        return self._fenced(write)

    def set_round_status(self, round_id: int, status: str) -> None:
        self._fenced(lambda s: setattr(s.get(Round, round_id), "status", RoundStatus(status)))

    def finish_round(self, round_id: int, result: RoundResult) -> None:
        self._fenced(lambda s: _finish_round_row(s, round_id, result))

    def round_id(self, index: int, attempt: int) -> int | None:
        return self._tx(lambda s: queries.round_id_of(s, self.job_id, index, attempt))

    def latest_round_id(self) -> int | None:
        return self._tx(lambda s: queries.latest_round_id(s, self.job_id))

    # -------------------------------------------------------------------------------------- updates
    def find_update(self, key: str) -> UpdateRecord | None:
        return self._tx(lambda s: _update_record(queries.update_by_key(s, self.job_id, key)))

    def find_updates(self, keys: Sequence[str]) -> dict[str, UpdateRecord]:
        """The stored updates among `keys`, by key, in one query."""
        if not keys:
            return {}
        return self._tx(lambda s: {u.idempotency_key: _update_record(u)
                                   for u in queries.updates_by_keys(s, self.job_id, keys)})

    def add_update(self, record: UpdateRecord) -> bool:
        """Insert the record unless an update with its idempotency key exists; True if it was inserted."""
        return self.add_updates([record])[0]

    def add_updates(self, records: Sequence[UpdateRecord]) -> list[bool]:
        """Insert the records whose idempotency keys are not stored yet, in one transaction (group commit);
        for each, True if it was inserted. Keys must be distinct. Accepted records are stored only while
        their round is open (RoundClosed otherwise: whoever closes it has read or will read what is stored)."""
        def write(s: Session) -> list[bool]:
            for round_id in sorted({r.round_id for r in records if r.status == "accepted"}):
                status = queries.round_status_for_share(s, round_id)
                if status != RoundStatus.OPEN:
                    raise RoundClosed(f"round {round_id} is {status.value if status else 'gone'}")
            taken = {u.idempotency_key for u in queries.updates_by_keys(s, self.job_id,
                                                                        [r.idempotency_key for r in records])}
            rows = [self._row(r) for r in records if r.idempotency_key not in taken]
            if rows:  # one Core INSERT, the rows as its parameters: ORM objects cost more than the rest
                s.execute(insert(ClientUpdate.__table__), rows)
            return [r.idempotency_key not in taken for r in records]
        if not records:
            return []
        try:
            return self._tx(write)
        except IntegrityError:  # another server process stored one of the keys meanwhile: one at a time
            if len(records) == 1:
                return [False]
            return [self.add_updates([r])[0] for r in records]

    def _row(self, record: UpdateRecord) -> dict[str, Any]:
        """The `updates` row of `record`, as column values (received_at: the column's default)."""
        return {
            "job_id": self.job_id, "round_id": record.round_id, "client_id": record.client_id,
            "idempotency_key": record.idempotency_key, "base_version": record.base_version,
            "num_samples": record.num_samples, "label_counts": list(record.label_counts),
            "metrics": dict(record.metrics), "status": UpdateStatus(record.status), "reason": record.reason,
            "payload_sha256": record.payload_sha256, "payload_bytes": record.payload_bytes, "model": record.model,
            "payload_pack": record.payload_pack, "payload_offset": record.payload_offset,
            "payload_length": record.payload_length}

    def accepted_updates(self, round_id: int) -> list[UpdateRecord]:
        return self._tx(lambda s: [_update_record(u) for u in queries.accepted_updates(s, round_id)])

    def accepted_clients(self, round_id: int) -> set[str]:
        return self._tx(lambda s: queries.accepted_clients(s, round_id))

    # -------------------------------------------------------------------------------------- clients
    def online_clients(self) -> list[ClientRecord]:
        return self._tx(lambda s: [_client_record(c) for c in queries.online_clients(s, self.job_id)])

    def all_clients(self) -> list[ClientRecord]:
        return self._tx(lambda s: [_client_record(c) for c in queries.clients_of_job(s, self.job_id)])

    def clients_by_id(self, client_ids: Sequence[str]) -> dict[str, ClientRecord]:
        """The stored clients among `client_ids`, by id (one transaction)."""
        return self._tx(lambda s: {c.client_id: _client_record(c)
                                   for c in queries.clients_by_ids(s, self.job_id, client_ids)})

    def save_clients(self, records: Sequence[ClientRecord]) -> None:
        """Insert or update the clients' rows in one transaction; `last_seen` is now. Ids must be distinct."""
        def write(s: Session) -> None:
            now = utcnow()
            rows = {c.client_id: c for c in queries.clients_by_ids(s, self.job_id, [r.client_id for r in records])}
            for record in records:
                row = rows.get(record.client_id)
                if row is None:
                    row = Client(job_id=self.job_id, client_id=record.client_id, first_seen=now)
                    s.add(row)
                row.status = ClientStatus(record.status)
                row.last_seen = now
                row.num_samples = record.num_samples
                row.state_version = record.state_version
                row.device_info = dict(record.device_info)
        if records:
            self._tx(write)


def _finish_round_row(s: Session, round_id: int, result: RoundResult) -> Round:
    row = s.get(Round, round_id)
    row.status = RoundStatus(result.status)
    row.closed_at = utcnow()
    row.num_updates = result.num_updates
    row.bytes_up = result.bytes_up
    row.bytes_down = result.bytes_down
    row.accuracy, row.loss, row.generator_loss = result.accuracy, result.loss, result.generator_loss
    row.model_version = result.model_version
    row.failure_reason = result.failure_reason
    row.model_stats = result.model_stats
    return row


def _version_record(row: ModelVersion | None) -> VersionRecord | None:
    if row is None:
        return None
    return VersionRecord(row.version, row.round_index, row.state_sha256, row.model_onnx_sha256,
                         row.predictor_onnx_sha256, row.server_state_sha256, row.generator_onnx_sha256,
                         row.delta_sha256, row.delta_base_version)


def _round_record(row: Round | None) -> RoundRecord | None:
    if row is None:
        return None
    return RoundRecord(row.id, row.index, row.attempt, row.status.value, list(row.selected), row.deadline)


def _update_record(row: ClientUpdate | None) -> UpdateRecord | None:
    if row is None:
        return None
    return UpdateRecord(row.round_id, row.client_id, row.idempotency_key, row.status.value, row.base_version,
                        row.num_samples, list(row.label_counts), dict(row.metrics), row.reason,
                        row.payload_sha256, row.payload_bytes, row.model, row.payload_pack, row.payload_offset,
                        row.payload_length)


def _client_record(row: Client) -> ClientRecord:
    return ClientRecord(row.client_id, row.status.value, row.num_samples, row.state_version,
                        dict(row.device_info or {}), row.last_seen)
