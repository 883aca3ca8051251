"""``/clients``: the devices of every job, or of one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server_api.api.deps import JobIdQuery, Limit, Offset, SessionDep, require_job
from server_api.api.schemas import ClientList, ClientOut, ErrorResponse
from server_api.db import queries

router = APIRouter(tags=["clients"])
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}


@router.get("/clients", response_model=ClientList, responses=ERRORS)
def list_clients(s: SessionDep, job_id: JobIdQuery = None, limit: Limit = 100, offset: Offset = 0) -> ClientList:
    """Clients of every job, or of ``job_id``."""
    if job_id is not None:
        require_job(s, job_id)
    total, rows = queries.clients_page(s, job_id, limit, offset)
    return ClientList(items=[ClientOut.model_validate(c) for c in rows], total=total, limit=limit, offset=offset)
