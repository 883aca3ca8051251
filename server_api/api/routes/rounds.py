"""``/jobs/{job_id}/rounds``: every round attempt, and one round's attempts with their clients' updates."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server_api.api.deps import JobIdPath, Limit, Offset, RoundIndex, SessionDep, require_job
from server_api.api.errors import ApiError
from server_api.api.schemas import ErrorResponse, RoundAttemptDetail, RoundDetail, RoundList, RoundOut, UpdateOut
from server_api.db import queries

router = APIRouter(tags=["rounds"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.get("/jobs/{job_id}/rounds", response_model=RoundList, responses=ERRORS)
def list_rounds(job_id: JobIdPath, s: SessionDep, limit: Limit = 100, offset: Offset = 0) -> RoundList:
    """Every round attempt of the job, by index then attempt."""
    require_job(s, job_id)
    total, rows = queries.rounds_page(s, job_id, limit, offset)
    return RoundList(job_id=job_id, items=[RoundOut.model_validate(r) for r in rows], total=total, limit=limit,
                     offset=offset)


@router.get("/jobs/{job_id}/rounds/{index}", response_model=RoundDetail, responses=ERRORS)
def get_round(job_id: JobIdPath, index: RoundIndex, s: SessionDep) -> RoundDetail:
    """All attempts of round ``index``, each with its clients' updates (accepted and rejected)."""
    require_job(s, job_id)
    rounds = queries.round_attempts(s, job_id, index)
    if not rounds:
        raise ApiError(404, "not_found", f"job {job_id!r} has no round {index}")
    by_round: dict[int, list[UpdateOut]] = {r.id: [] for r in rounds}
    for update in queries.updates_of_rounds(s, [r.id for r in rounds]):
        by_round[update.round_id].append(UpdateOut.model_validate(update))
    attempts = [RoundAttemptDetail(**RoundOut.model_validate(r).model_dump(), updates=by_round[r.id])
                for r in rounds]
    return RoundDetail(job_id=job_id, index=index, attempts=attempts)
