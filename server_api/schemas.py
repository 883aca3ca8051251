"""Pydantic v2 models of the REST API: what ``POST /jobs`` accepts, and every response body.

:class:`JobConfig` is also what is stored in ``jobs.config`` (``JobConfig.stored_config()``): every default is
filled in, and ``algorithm`` holds the complete, validated :class:`shared.config.AlgorithmConfig`, so a job's
behaviour doesn't change if a default changes later. The round orchestrator can rebuild the config with
``JobConfig.from_stored(job.id, job.config)``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import fields
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.config import AlgorithmConfig
from shared.data import DATASETS

JOB_ID_REGEX = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Classifier architectures of shared.models.MODELS (not imported here: that would import torch).
KNOWN_MODELS = ("cnn", "mlp")
AGGREGATIONS = ("mean", "median", "trimmed_mean")

JobId = Annotated[str, Field(pattern=JOB_ID_REGEX, min_length=1, max_length=63, examples=["mnist-fedgen"])]
DatasetName = Annotated[str, Field(json_schema_extra={"enum": sorted(DATASETS)})]


def generate_job_id() -> str:
    """A fresh id ``job-<8 hex digits>``."""
    return f"job-{secrets.token_hex(4)}"


def _check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return name


# ------------------------------------------------------------------------------------------------ algorithm
def _check_algorithm_value(name: str, value: Any, default: Any) -> Any:
    """Type-check one AlgorithmConfig setting against its default's type (ints are fine for floats).

    Raises ValueError, not TypeError: pydantic turns only ValueError into a validation error (422)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"algorithm.{name} must be true or false")  # noqa: TRY004
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"algorithm.{name} must be an integer")  # noqa: TRY004
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"algorithm.{name} must be a finite number")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"algorithm.{name} must be a string")  # noqa: TRY004
    return value


def validate_algorithm(data: dict[str, Any]) -> AlgorithmConfig:
    """``data`` as an :class:`AlgorithmConfig` (``{}``: FedGen defaults); else a clear ``ValueError``."""
    known = {f.name: f.default for f in fields(AlgorithmConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown algorithm settings: {', '.join(unknown)}; known: {', '.join(known)}")
    checked = {name: _check_algorithm_value(name, value, known[name]) for name, value in data.items()}
    if checked.get("model", "cnn") not in KNOWN_MODELS:
        raise ValueError(f"unknown model {checked['model']!r}; known: {', '.join(KNOWN_MODELS)}")
    try:
        return AlgorithmConfig.from_dict(checked)
    except TypeError as exc:  # defensive: from_dict with values of a wrong type
        raise ValueError(f"invalid algorithm settings: {exc}") from None


# ---------------------------------------------------------------------------------------------- job config
class ServerEvalConfig(BaseModel):
    """The partition whose pooled per-user test splits the server evaluates each round's model on
    (the fields of :class:`shared.partition.PartitionConfig`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: DatasetName
    alpha: float = Field(default=0.1, gt=0, allow_inf_nan=False)
    users: int = Field(default=20, ge=1, le=100_000)
    samples_per_class: int | None = Field(default=1500, ge=1)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: str) -> str:
        return _check_dataset(value)


class JobConfig(BaseModel):
    """Everything needed to run a federated training job: the body of ``POST /jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: JobId = Field(default_factory=generate_job_id, description="slug; generated as job-<8 hex> if absent")
    dataset: DatasetName = Field(description="defines the classes and the image shape")
    rounds: int = Field(default=20, ge=1, le=100_000)
    active: int = Field(default=10, ge=1, le=100_000, description="clients selected per round")
    min_clients: int | None = Field(
        default=None, ge=1, le=100_000, description="accepted updates a round needs; default ceil(active / 2)"
    )
    round_timeout_s: int = Field(default=120, ge=1, le=86_400)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    algorithm: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="shared.config.AlgorithmConfig settings; {} = FedGen defaults; stored complete",
    )
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_ratio: float = Field(default=0.1, ge=0, lt=0.5, allow_inf_nan=False)
    chunk_size: int = Field(default=262_144, ge=1024, le=1_048_576)
    server_eval: ServerEvalConfig | None = None
    min_online: int | None = Field(
        default=None, ge=1, le=100_000, description="clients online before round 0 starts; default = active"
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, value: str) -> str:
        return _check_dataset(value)

    @field_validator("algorithm")
    @classmethod
    def _full_algorithm(cls, value: dict[str, Any]) -> dict[str, Any]:
        return validate_algorithm(value).to_dict()

    @model_validator(mode="after")
    def _fill_client_counts(self) -> JobConfig:
        if self.min_clients is None:
            self.min_clients = math.ceil(self.active / 2)
        if self.min_clients > self.active:
            raise ValueError(f"min_clients ({self.min_clients}) must be <= active ({self.active})")
        if self.min_online is None:
            self.min_online = self.active
        return self

    @property
    def algorithm_config(self) -> AlgorithmConfig:
        return AlgorithmConfig.from_dict(self.algorithm)

    def stored_config(self) -> dict[str, Any]:
        """What goes into ``jobs.config``: every field but ``id`` (the primary key), defaults filled in."""
        return self.model_dump(mode="json", exclude={"id"})

    @classmethod
    def from_stored(cls, job_id: str, config: dict[str, Any]) -> JobConfig:
        """Rebuild (and re-validate) a job's config from its row."""
        return cls.model_validate({**config, "id": job_id})


# ------------------------------------------------------------------------------------------------ responses
class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBody


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Literal["created", "running", "finished", "failed"]
    current_round: int
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: str | None
    latest_model_version: int | None = Field(default=None, description="null until a model version exists")


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class JobList(Page):
    items: list[JobOut]


class RoundOut(BaseModel):
    """One attempt at one round."""

    model_config = ConfigDict(from_attributes=True)

    index: int
    attempt: int
    status: Literal["open", "aggregating", "closed", "failed"]
    selected: list[str]
    deadline: datetime
    started_at: datetime
    closed_at: datetime | None
    accuracy: float | None
    loss: float | None
    generator_loss: float | None
    bytes_up: int
    bytes_down: int
    num_updates: int
    model_version: int | None
    failure_reason: str | None


class RoundList(Page):
    job_id: str
    items: list[RoundOut]


class UpdateOut(BaseModel):
    """One client update of a round attempt, accepted or rejected."""

    model_config = ConfigDict(from_attributes=True)

    client_id: str
    status: Literal["accepted", "rejected"]
    reason: str | None
    num_samples: int
    label_counts: list[int]
    metrics: dict[str, Any]
    base_version: int
    payload_bytes: int
    received_at: datetime


class RoundAttemptDetail(RoundOut):
    updates: list[UpdateOut]


class RoundDetail(BaseModel):
    """All attempts of one round index, each with its clients' updates."""

    job_id: str
    index: int
    attempts: list[RoundAttemptDetail]


class ClientOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    job_id: str
    client_id: str
    status: Literal["online", "offline"]
    device_info: dict[str, Any]
    num_samples: int | None
    first_seen: datetime
    last_seen: datetime
    state_version: int | None


class ClientList(Page):
    items: list[ClientOut]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str = Field(description='"ok" or "unavailable: <short reason>"')
    broker: str = Field(description='"ok", "disconnected", "not configured" or "unavailable: <reason>"')
    jobs_running: int | None = Field(description="null when it cannot be determined")
