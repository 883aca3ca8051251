"""SQLAlchemy 2 models of the round server: jobs, clients, rounds, updates, model versions, artifacts.

docs/database.md describes every column. Rules that hold for all tables:

* Timestamps are :class:`UTCDateTime`: timezone-aware UTC in Python on every backend. Naive datetimes are
  refused when written (use :func:`utcnow`).
* JSON columns are plain ``JSON`` (``JSONB`` on PostgreSQL). They are not mutation-tracked: assign a new
  dict/list (``job.config = {**job.config, "k": v}``) rather than mutating one in place. Engines from
  ``make_engine`` write numpy values as plain numbers/lists and NaN/Infinity as null (same on both backends).
* Enumerations are stored as short strings with a named CHECK constraint; in Python they are ``str``
  enums, so ``job.status == "running"`` works and plain strings are accepted on assignment.
* Every schema change needs an Alembic migration in ``migrations/versions`` (tests/test_db.py compares the
  migrated schema with these models).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column, relationship, validates

from shared.protocol.ids import MAX_ID_LENGTH, is_valid_id

SHA256_LENGTH = 64
CLIENT_ID_LENGTH = 128  # wider than the id pattern (MAX_ID_LENGTH); kept so that no migration is needed
IDEMPOTENCY_KEY_LENGTH = 128
MAX_HOLDER_LENGTH = 200  # a server process's instance name (its MQTT client id and a random suffix)

# Deterministic constraint names, so that later (batch) migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (what every timestamp column expects)."""
    return datetime.now(timezone.utc)


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a valid id (`shared.protocol.ids`), else raise ValueError."""
    if not is_valid_id(job_id):
        raise ValueError(
            f"invalid job id {job_id!r}: use 1-63 characters of A-Z, a-z, 0-9, '.', '-' and '_', "
            "starting with a letter or digit"
        )
    return job_id


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes, on SQLite too.

    SQLite has no time zone type: values are stored there as naive UTC and re-tagged as UTC when read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware (use utcnow())")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# JSON on SQLite, JSONB on PostgreSQL (comparable and indexable there).
JSONType = JSON().with_variant(JSONB(), "postgresql")


class JobStatus(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"  # the open round finishes; no new one opens until resumed
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ClientStatus(str, enum.Enum):
    ONLINE = "online"
    OFFLINE = "offline"


class RoundStatus(str, enum.Enum):
    OPEN = "open"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"


class UpdateStatus(str, enum.Enum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


def _enum_type(enum_cls: type[enum.Enum]) -> SAEnum:
    """A VARCHAR(16) holding the enum's values; the CHECK constraint is declared by :func:`_enum_check`."""
    return SAEnum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


def _enum_check(column: str, enum_cls: type[enum.Enum]) -> CheckConstraint:
    values = ", ".join(f"'{m.value}'" for m in enum_cls)
    return CheckConstraint(f"{column} IN ({values})", name=column)


def _sha_column(nullable: bool) -> MappedColumn[Any]:
    return mapped_column(String(SHA256_LENGTH), nullable=nullable)


def _now_column(nullable: bool = False, onupdate: bool = False) -> MappedColumn[Any]:
    return mapped_column(
        UTCDateTime(),
        nullable=nullable,
        default=utcnow,
        server_default=func.now(),
        onupdate=utcnow if onupdate else None,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    """A federated training job; ``config`` holds everything needed to run it."""

    __tablename__ = "jobs"
    __table_args__ = (
        _enum_check("status", JobStatus),
        CheckConstraint("current_round >= 0", name="current_round_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(MAX_ID_LENGTH), primary_key=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    status: Mapped[JobStatus] = mapped_column(
        _enum_type(JobStatus), nullable=False, default=JobStatus.CREATED, server_default="created"
    )
    current_round: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    created_at: Mapped[datetime] = _now_column()
    updated_at: Mapped[datetime] = _now_column(onupdate=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    clients: Mapped[list[Client]] = relationship(back_populates="job", cascade="all", passive_deletes=True)
    rounds: Mapped[list[Round]] = relationship(
        back_populates="job",
        cascade="all",
        passive_deletes=True,
        order_by=lambda: (Round.index, Round.attempt),
    )
    updates: Mapped[list[ClientUpdate]] = relationship(
        back_populates="job", cascade="all", passive_deletes=True
    )
    model_versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="job",
        cascade="all",
        passive_deletes=True,
        order_by="ModelVersion.version",
    )

    @validates("id")
    def _validate_id(self, _key: str, value: str) -> str:
        return validate_job_id(value)

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, current_round={self.current_round!r})"


class Client(Base):
    """A device that has joined a job."""

    __tablename__ = "clients"
    __table_args__ = (_enum_check("status", ClientStatus),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(CLIENT_ID_LENGTH), primary_key=True)
    device_info: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    num_samples: Mapped[int | None] = mapped_column(Integer, nullable=True)
    first_seen: Mapped[datetime] = _now_column()
    last_seen: Mapped[datetime] = _now_column()
    status: Mapped[ClientStatus] = mapped_column(
        _enum_type(ClientStatus), nullable=False, default=ClientStatus.ONLINE, server_default="online"
    )
    state_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    job: Mapped[Job] = relationship(back_populates="clients")

    def __repr__(self) -> str:
        return f"Client(job_id={self.job_id!r}, client_id={self.client_id!r}, status={self.status!r})"


class Round(Base):
    """One attempt at one round of a job. A failed round is retried as a new row with ``attempt + 1``."""

    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("job_id", "index", "attempt"),
        _enum_check("status", RoundStatus),
        CheckConstraint('"index" >= 0 AND attempt >= 0', name="index_attempt_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    index: Mapped[int] = mapped_column(Integer, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    status: Mapped[RoundStatus] = mapped_column(
        _enum_type(RoundStatus), nullable=False, default=RoundStatus.OPEN, server_default="open"
    )
    selected: Mapped[list[str]] = mapped_column(JSONType, nullable=False, default=list)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    started_at: Mapped[datetime] = _now_column()
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    generator_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    bytes_up: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    bytes_down: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    num_updates: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failure_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # a job with several models: model -> {"updates", "samples", "test_correct", "test_count", "accuracy"}
    model_stats: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)

    job: Mapped[Job] = relationship(back_populates="rounds")
    updates: Mapped[list[ClientUpdate]] = relationship(
        back_populates="round", cascade="all", passive_deletes=True
    )

    def __repr__(self) -> str:
        return (
            f"Round(id={self.id!r}, job_id={self.job_id!r}, index={self.index!r}, "
            f"attempt={self.attempt!r}, status={self.status!r})"
        )


class ClientUpdate(Base):
    """One delivery of a local update (accepted or rejected). ``idempotency_key`` is unique per job."""

    __tablename__ = "updates"
    __table_args__ = (
        UniqueConstraint("job_id", "idempotency_key"),
        Index("ix_updates_round_id_status", "round_id", "status"),
        # one accepted update per client and round, whichever server process accepted it (0005)
        Index("uq_updates_round_id_client_id_accepted", "round_id", "client_id", unique=True,
              sqlite_where=text("status = 'accepted'"), postgresql_where=text("status = 'accepted'")),
        _enum_check("status", UpdateStatus),
        CheckConstraint("num_samples >= 0 AND payload_bytes >= 0", name="sizes_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), nullable=False)
    client_id: Mapped[str] = mapped_column(String(CLIENT_ID_LENGTH), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(IDEMPOTENCY_KEY_LENGTH), nullable=False)
    base_version: Mapped[int] = mapped_column(Integer, nullable=False)
    num_samples: Mapped[int] = mapped_column(Integer, nullable=False)
    label_counts: Mapped[list[int]] = mapped_column(JSONType, nullable=False, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, nullable=False, default=dict)
    status: Mapped[UpdateStatus] = mapped_column(_enum_type(UpdateStatus), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload_sha256: Mapped[str | None] = _sha_column(nullable=True)
    payload_bytes: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # where the accepted tensors lie (ArtifactStore packs, 0005); NULL: a blob of its own at payload_sha256
    payload_pack: Mapped[str | None] = mapped_column(String(32), nullable=True)
    payload_offset: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    payload_length: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    received_at: Mapped[datetime] = _now_column()
    model: Mapped[str | None] = mapped_column(String(32), nullable=True)  # None: rows from before 0004

    job: Mapped[Job] = relationship(back_populates="updates")
    round: Mapped[Round] = relationship(back_populates="updates")

    def __repr__(self) -> str:
        return (
            f"ClientUpdate(id={self.id!r}, round_id={self.round_id!r}, client_id={self.client_id!r}, "
            f"status={self.status!r})"
        )


class ModelVersion(Base):
    """A global model produced by a round (version 0: the initial model). Artifacts are sha256 digests."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint("version >= 0", name="version_nonnegative"),
        CheckConstraint(
            "(delta_sha256 IS NULL AND delta_base_version IS NULL) "
            "OR (delta_sha256 IS NOT NULL AND delta_base_version IS NOT NULL)",
            name="delta_complete",
        ),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    round_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = _now_column()
    state_sha256: Mapped[str] = _sha_column(nullable=False)
    model_onnx_sha256: Mapped[str] = _sha_column(nullable=False)
    predictor_onnx_sha256: Mapped[str] = _sha_column(nullable=False)
    generator_onnx_sha256: Mapped[str | None] = _sha_column(nullable=True)
    server_state_sha256: Mapped[str | None] = _sha_column(nullable=True)
    delta_sha256: Mapped[str | None] = _sha_column(nullable=True)
    delta_base_version: Mapped[int | None] = mapped_column(Integer, nullable=True)

    job: Mapped[Job] = relationship(back_populates="model_versions")

    def __repr__(self) -> str:
        return f"ModelVersion(job_id={self.job_id!r}, version={self.version!r})"


class JobLease(Base):
    """Which server process runs a job's rounds (docs/scaling.md, "Several server processes"): held by
    `holder` until `expires_at`, renewed by it well before; another process takes an expired lease over."""

    __tablename__ = "job_leases"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(MAX_HOLDER_LENGTH), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    acquired_at: Mapped[datetime] = _now_column()

    def __repr__(self) -> str:
        return f"JobLease(job_id={self.job_id!r}, holder={self.holder!r}, expires_at={self.expires_at!r})"


class Artifact(Base):
    """Index row of one blob in the content-addressed :class:`server_api.store.ArtifactStore`."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(f"length(sha256) = {SHA256_LENGTH}", name="sha256_length"),
        CheckConstraint("size >= 0", name="size_nonnegative"),
    )

    sha256: Mapped[str] = mapped_column(String(SHA256_LENGTH), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    created_at: Mapped[datetime] = _now_column()

    def __repr__(self) -> str:
        return f"Artifact(sha256={self.sha256!r}, size={self.size!r}, kind={self.kind!r})"
