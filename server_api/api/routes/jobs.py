"""``/jobs``: create a job (admin token), list and read jobs."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server_api.api.deps import JobIdPath, Limit, Offset, ServicesDep, SessionDep, require_admin
from server_api.api.errors import ApiError
from server_api.api.schemas import ErrorResponse, JobList, JobOut
from server_api.db import queries
from server_api.db.models import Job, JobStatus, utcnow
from server_api.rounds.feasibility import check_job
from shared.protocol.codec import decode_json
from shared.protocol.errors import ValidationError
from shared.protocol.job import JobConfig

log = logging.getLogger("server_api.api")
router = APIRouter(tags=["jobs"])

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}
CREATE_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                                  for code in (401, 409, 413, 415, 422, 503)}
JOB_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobConfig"}}}}}


@router.post("/jobs", status_code=201, response_model=JobOut, responses=CREATE_ERRORS,
             dependencies=[Depends(require_admin)], openapi_extra=JOB_BODY)
async def create_job(request: Request, svc: ServicesDep) -> JobOut:
    """Create a job (status ``created``) and hand it to the orchestrator. Needs the admin token. The body is a
    JobConfig; every field is checked against its documented range, and a job the server could not run (a
    server-side evaluation partition its data cannot supply) is refused here, with the field named."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"send the job as JSON with 'Content-Type: application/json' (got {content_type!r})")
    body = await request.body()
    try:
        config = decode_json(JobConfig, body, "job", svc.settings.max_upload_bytes)
        check_job(config, svc.settings.data_dir)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", exc.detail) from None
    job = _insert_job(svc.session_factory, config)
    log.info("job %s created", job.id)
    _notify_orchestrator(svc, job.id)
    return job


@router.get("/jobs", response_model=JobList, responses=ERRORS)
def list_jobs(s: SessionDep, svc: ServicesDep, limit: Limit = 100, offset: Offset = 0) -> JobList:
    """Jobs, newest first."""
    total, jobs = queries.jobs_page(s, limit, offset)
    latest = queries.latest_version_numbers(s, [job.id for job in jobs])
    return JobList(items=[job_out(j, latest, svc) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS)
def get_job(job_id: JobIdPath, s: SessionDep, svc: ServicesDep) -> JobOut:
    job = s.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id!r} not found")
    return job_out(job, queries.latest_version_numbers(s, [job_id]), svc)


def job_out(job: Job, latest: dict[str, int], svc: ServicesDep | None = None) -> JobOut:
    out = JobOut.model_validate(job)
    out.latest_model_version = latest.get(job.id)
    waiting = getattr(svc.orchestrator, "waiting", None) if svc is not None else None
    if waiting is not None:
        state = waiting(job.id)
        out.waiting_for_devices = f"{state[0]} of {state[1]}" if state else None
    return out


def _insert_job(factory: sessionmaker[Session], config: JobConfig) -> JobOut:
    """Insert the job (status ``created``); ApiError 409 if the id is taken. No read first, so that a DEFERRED
    SQLite transaction never has to upgrade a read lock."""
    job = Job(id=config.id, config=config.stored_config(), status=JobStatus.CREATED, current_round=0)
    try:
        with factory.begin() as session:
            session.add(job)
    except IntegrityError:
        raise ApiError(409, "conflict", f"job {config.id!r} already exists") from None
    return job_out(job, {})


def _notify_orchestrator(svc: ServicesDep, job_id: str) -> None:
    """Tell the orchestrator; its failure is logged, not returned (the job is committed either way and is
    picked up again from the database by a restarted orchestrator)."""
    if svc.orchestrator is None:
        return
    try:
        svc.orchestrator.job_created(job_id)
    except Exception:
        log.exception("orchestrator.job_created(%r) failed", job_id)


# -------------------------------------------------------------------------------------------- job control
CONTROL = {  # action -> (statuses it applies to, the status it sets)
    "pause": (("created", "running"), "paused"),
    "resume": (("paused",), "running"),
    "cancel": (("created", "running", "paused"), "cancelled"),
}


def _control(action: str, job_id: str, svc: ServicesDep) -> JobOut:
    """One conditional UPDATE (no read first: a DEFERRED SQLite transaction must never upgrade a read lock
    while the round loop writes), then the job as it is now."""
    allowed, target = CONTROL[action]
    values: dict[str, object] = {"status": JobStatus(target)}
    if target == "cancelled":
        values.update(error="cancelled by the operator", finished_at=utcnow())
    with svc.session_factory.begin() as s:
        changed = s.execute(update(Job).where(Job.id == job_id, Job.status.in_([JobStatus(a) for a in allowed]))
                            .values(**values)).rowcount
    with svc.session_factory() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise ApiError(404, "not_found", f"job {job_id!r} not found")
        if not changed:
            raise ApiError(409, "conflict", f"job {job_id!r} is {job.status.value}: it cannot be {action}d "
                                            f"(only a job that is {' or '.join(allowed)})")
        out = job_out(job, queries.latest_version_numbers(s, [job_id]), svc)
    log.info("job %s %s by the operator", job_id, target)
    return out


@router.post("/jobs/{job_id}/pause", response_model=JobOut, responses=CREATE_ERRORS,
             dependencies=[Depends(require_admin)])
def pause_job(job_id: JobIdPath, svc: ServicesDep) -> JobOut:
    """Pause: the open round finishes as usual, no new round opens until the job is resumed."""
    return _control("pause", job_id, svc)


@router.post("/jobs/{job_id}/resume", response_model=JobOut, responses=CREATE_ERRORS,
             dependencies=[Depends(require_admin)])
def resume_job(job_id: JobIdPath, svc: ServicesDep) -> JobOut:
    """Resume a paused job."""
    return _control("resume", job_id, svc)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=CREATE_ERRORS,
             dependencies=[Depends(require_admin)])
def cancel_job(job_id: JobIdPath, svc: ServicesDep) -> JobOut:
    """Cancel: the job ends with status `cancelled`, its open round fails, and its devices are told (retained
    round status) so that they stop. Survives a server restart (the state is in the database)."""
    return _control("cancel", job_id, svc)
