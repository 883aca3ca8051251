"""The dashboard: ``GET /`` (a static page, `server_api/api/static/`) and ``GET /jobs/{job_id}/dashboard``, the
one aggregate the job page polls. The server computes everything the page shows from the database (the page
keeps no state of its own): the job, its latest round attempts (the curves), the current attempt's progress and
rejections, and per client its status, runtime, partition, rejections and latest label counts (the heatmap).
The answer is bounded (`MAX_ROUNDS` attempts, `MAX_CLIENTS` clients) and made of grouped queries."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from server_api.api.deps import JobIdPath, ServicesDep, SessionDep
from server_api.api.errors import ApiError
from server_api.api.routes.jobs import job_out
from server_api.api.schemas import ErrorResponse, JobOut, RoundPoint
from server_api.db import queries
from server_api.db.models import Client, Job, Round, RoundStatus, UpdateStatus, utcnow

router = APIRouter(tags=["dashboard"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MAX_ROUNDS = 1000  # round attempts in one answer (the latest)
MAX_CLIENTS = 1000  # clients in one answer (by client id)
MAX_TEXT = 128  # device-supplied strings are cut to this length
# The page loads only its own files and talks only to this server.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# ------------------------------------------------------------------------------------------------- models
class CurrentRound(BaseModel):
    """The latest round attempt and where it stands."""

    index: int
    attempt: int
    status: Literal["open", "aggregating", "closed", "failed"]
    started_at: datetime
    deadline: datetime
    closed_at: datetime | None
    seconds_to_deadline: float | None = Field(description="while open: seconds until the deadline (0 when past)")
    selected: int = Field(description="clients selected")
    received: int = Field(description="updates received (accepted + rejected)")
    accepted: int
    rejected: int
    rejections: dict[str, int] = Field(description="rejected updates by reason code")
    failure_reason: str | None


class DashboardClient(BaseModel):
    """One device of the job, with what the dashboard's clients table and heatmap show."""

    client_id: str
    status: Literal["online", "offline"]
    first_seen: datetime
    last_seen: datetime
    runtime: str | None = Field(description="device_info.runtime: torch or lite")
    runtime_version: str | None = Field(description="the version of that runtime (device_info.<runtime>)")
    model: str | None = Field(description="the model the device says it runs (presence), else the job's default")
    partition_index: int | None
    num_samples: int | None
    state_version: int | None
    refused: str | None = Field(description="why the device last refused the job, if it did")
    round_status: Literal["selected", "accepted", "rejected"] | None = Field(
        description="in the current round attempt: selected (no update yet), accepted, rejected; null: not in it")
    rejected: int = Field(description="rejected updates across the job")
    rejections: dict[str, int] = Field(description="rejected updates across the job by reason code")
    label_counts: list[int] | None = Field(description="samples per class of its latest accepted update")


class Dashboard(BaseModel):
    """Everything the job page shows."""

    job: JobOut
    now: datetime = Field(description="the server's clock when it answered")
    rounds: list[RoundPoint] = Field(description="the latest round attempts (at most 1000), oldest first")
    rounds_total: int
    current: CurrentRound | None
    clients: list[DashboardClient] = Field(description="clients by id (at most 1000)")
    clients_total: int
    num_classes: int | None = Field(description="length of the label counts (null until an update is accepted)")


# ------------------------------------------------------------------------------------------------- routes
@lru_cache(maxsize=1)
def _page() -> bytes:
    return (STATIC_DIR / "dashboard.html").read_bytes()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page() -> HTMLResponse:
    """The dashboard (read-only; job control asks for the admin token)."""
    return HTMLResponse(_page(), headers=PAGE_HEADERS)


@router.get("/jobs/{job_id}/dashboard", response_model=Dashboard, responses=ERRORS)
def job_dashboard(job_id: JobIdPath, s: SessionDep, svc: ServicesDep) -> Dashboard:
    """What the dashboard's job page shows, in one answer: the job, its latest round attempts, the current
    attempt's progress and rejections by reason, and its clients with their rejections and label counts."""
    job = s.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id!r} not found")
    now = utcnow()
    rounds_total, rows = queries.recent_round_series(s, job_id, MAX_ROUNDS)
    latest = queries.latest_round(s, job_id)
    clients_total, clients = queries.clients_page(s, job_id, MAX_CLIENTS, 0)
    current = _current(s, latest, now) if latest is not None else None
    out = _clients(s, job, clients, latest)
    sizes = {len(c.label_counts) for c in out if c.label_counts}
    return Dashboard(job=job_out(job, queries.latest_version_numbers(s, [job_id]), svc), now=now,
                     rounds=[RoundPoint.model_validate(r) for r in rows], rounds_total=rounds_total,
                     current=current, clients=out, clients_total=clients_total,
                     num_classes=max(sizes) if sizes else None)


# ------------------------------------------------------------------------------------------------- assembly
def _current(s: Session, rnd: Round, now: datetime) -> CurrentRound:
    counts = {UpdateStatus.ACCEPTED.value: 0, UpdateStatus.REJECTED.value: 0}
    rejections: dict[str, int] = {}
    for status, code, n in queries.round_status_counts(s, rnd.id):
        counts[UpdateStatus(status).value] += n
        if status == UpdateStatus.REJECTED:
            key = _text(code) or "unknown"
            rejections[key] = rejections.get(key, 0) + n
    is_open = rnd.status == RoundStatus.OPEN
    return CurrentRound(
        index=rnd.index, attempt=rnd.attempt, status=RoundStatus(rnd.status).value, started_at=rnd.started_at,
        deadline=rnd.deadline, closed_at=rnd.closed_at, failure_reason=rnd.failure_reason,
        seconds_to_deadline=max(0.0, (rnd.deadline - now).total_seconds()) if is_open else None,
        selected=len(rnd.selected or []), received=sum(counts.values()), accepted=counts["accepted"],
        rejected=counts["rejected"], rejections=rejections)


def _clients(s: Session, job: Job, clients: Sequence[Client], rnd: Round | None) -> list[DashboardClient]:
    ids = [c.client_id for c in clients]
    rejections: dict[str, dict[str, int]] = {}
    for client_id, code, n in queries.rejections_by_client(s, job.id, ids):
        per = rejections.setdefault(client_id, {})
        key = _text(code) or "unknown"
        per[key] = per.get(key, 0) + n
    labels = queries.latest_accepted_label_counts(s, job.id, ids)
    in_round = queries.round_client_statuses(s, rnd.id, ids) if rnd is not None else {}
    selected = set(rnd.selected or []) if rnd is not None else set()
    model = _text((job.config.get("algorithm") or {}).get("model")) if isinstance(job.config, dict) else None
    return [_client(c, model, rejections.get(c.client_id, {}), labels.get(c.client_id),
                    _round_status(c.client_id in selected, in_round.get(c.client_id, set())))
            for c in clients]


def _client(c: Client, model: str | None, rejections: dict[str, int], labels: list[int] | None,
            round_status: str | None) -> DashboardClient:
    info = c.device_info if isinstance(c.device_info, dict) else {}
    runtime = _text(info.get("runtime"))
    index = info.get("partition_index")
    return DashboardClient(
        client_id=c.client_id, status=c.status.value, first_seen=c.first_seen, last_seen=c.last_seen,
        runtime=runtime, runtime_version=_text(info.get(runtime)) if runtime else None,
        model=_text(info.get("model")) or model,
        partition_index=index if isinstance(index, int) and not isinstance(index, bool) else None,
        num_samples=c.num_samples, state_version=c.state_version, refused=_text(info.get("refused")),
        round_status=round_status, rejected=sum(rejections.values()), rejections=rejections,
        label_counts=[n if isinstance(n, int) and not isinstance(n, bool) else 0 for n in labels] if labels else None)


def _round_status(selected: bool, statuses: set[str]) -> str | None:
    if "accepted" in statuses:
        return "accepted"
    if "rejected" in statuses:
        return "rejected"
    return "selected" if selected else None


def _text(value: object) -> str | None:
    """A device-supplied string, cut to `MAX_TEXT`; None for anything that is not a non-empty string."""
    return value[:MAX_TEXT] if isinstance(value, str) and value else None
