"""What the route handlers depend on, in one place: the server's services (kept on ``app.state``), a database
session per request, and the admin-token check of the write endpoints."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from server_api.api.errors import ApiError
from server_api.db import queries
from server_api.db.store import ArtifactStore
from server_api.settings import ServerSettings
from shared.protocol.ids import ID_REGEX, MAX_ID_LENGTH

MAX_PAGE = 1000
MAX_OFFSET = 1_000_000_000
MAX_ROUND_INDEX = 2**31 - 1


class Orchestrator(Protocol):
    """What the API needs from the round orchestrator (both methods must return quickly)."""

    def job_created(self, job_id: str) -> None:
        """A job was committed with status ``created``: start running it."""

    def status(self) -> dict[str, Any]:
        """``{"broker": "connected" | "disconnected", "jobs_running": int, ...}``
        (``"broker_connected": bool`` is accepted in place of ``"broker"``)."""


@dataclass(frozen=True)
class Services:
    settings: ServerSettings
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    orchestrator: Orchestrator | None


def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


def session(svc: ServicesDep) -> Iterator[Session]:
    """A read session for one request (the API's one write, POST /jobs, opens its own transaction)."""
    with svc.session_factory() as s:
        yield s


SessionDep = Annotated[Session, Depends(session)]

_bearer = HTTPBearer(auto_error=False, description="the server's admin token (FEDGEN_ADMIN_TOKEN)")


def require_admin(svc: ServicesDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    settings = svc.settings
    if settings.admin_token is None:
        raise ApiError(503, "admin_disabled", "no admin token configured (set FEDGEN_ADMIN_TOKEN)")
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError(401, "unauthorized", "invalid bearer token",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})


def require_job(s: Session, job_id: str) -> None:
    if not queries.job_exists(s, job_id):
        raise ApiError(404, "not_found", f"job {job_id!r} not found")


JobIdPath = Annotated[str, Path(pattern=ID_REGEX, max_length=MAX_ID_LENGTH, description="job id",
                                examples=["mnist-fedgen"])]
JobIdQuery = Annotated[str | None, Query(pattern=ID_REGEX, max_length=MAX_ID_LENGTH)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
RoundIndex = Annotated[int, Path(ge=0, le=MAX_ROUND_INDEX, examples=[0])]
