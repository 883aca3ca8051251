"""Pydantic v2 models of the REST API's responses. The request body of ``POST /jobs`` is
`shared.protocol.job.JobConfig` (msgspec), the type that also goes to the database and the devices; its JSON
schema is added to the OpenAPI document by `server_api.api.app`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"code": ..., "message": ...}}``."""

    error: ErrorBody


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    status: Literal["created", "running", "paused", "finished", "failed", "cancelled"]
    current_round: int
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    error: str | None
    latest_model_version: int | None = Field(default=None, description="null until a model version exists")
    waiting_for_devices: str | None = Field(default=None, description='e.g. "3 of 10": the next round waits '
                                            "until that many devices are online; null otherwise")


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class JobList(Page):
    items: list[JobOut]


class ModelStats(BaseModel):
    """One model's share of a round of a job with several models (devices' own figures)."""

    updates: int = Field(description="accepted updates trained with this model")
    samples: int = Field(description="their training samples")
    test_correct: float = Field(description="correct predictions the devices reported on their test splits")
    test_count: float = Field(description="test images the devices reported")
    accuracy: float | None = Field(description="test_correct / test_count; null when no device reported a test")


class RoundPoint(BaseModel):
    """One round attempt, without its selection (what the dashboard's curves need)."""

    model_config = ConfigDict(from_attributes=True)

    index: int
    attempt: int
    status: Literal["open", "aggregating", "closed", "failed"]
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
    model_stats: dict[str, ModelStats] | None = Field(
        default=None, description="a job with several models: this round's figures per model")


class RoundOut(RoundPoint):
    """One attempt at one round."""

    selected: list[str]
    deadline: datetime


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
    model: str | None = Field(default=None, description="the model it was trained with (null: not recorded)")


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
