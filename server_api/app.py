"""The round server's REST API (FastAPI): health, jobs, rounds, clients and model downloads.

``create_app(settings, session_factory, store, orchestrator)`` builds the application; docs/api.md describes
the endpoints. Handlers are thin: the queries are the small ``_query_*`` / ``_insert_*`` functions below, each
in its own short-lived session. Every error is JSON ``{"error": {"code": ..., "message": ...}}``.

SQLite: give the API a session factory on an engine made with ``make_engine(url, sqlite_begin="DEFERRED")``
so that its reads don't take the database's write lock (``BEGIN IMMEDIATE``, the engine default) away from
the orchestrator. The one write (``POST /jobs``) is a single INSERT, safe with either mode.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_api.db.models import Client, ClientUpdate, Job, JobStatus, ModelVersion, Round
from server_api.schemas import (
    JOB_ID_REGEX,
    ClientList,
    ClientOut,
    ErrorResponse,
    Health,
    JobConfig,
    JobList,
    JobOut,
    RoundAttemptDetail,
    RoundDetail,
    RoundList,
    RoundOut,
    UpdateOut,
)
from server_api.settings import ServerSettings
from server_api.store import ArtifactCorruptError, ArtifactNotFoundError, ArtifactStore

log = logging.getLogger(__name__)

HEALTH_DB_TIMEOUT_S = 3.0
HEALTH_ORCHESTRATOR_TIMEOUT_S = 2.0
MAX_PAGE = 1000
MAX_OFFSET = 1_000_000_000
MAX_ROUND_INDEX = 2**31 - 1
ONNX_MEDIA_TYPE = "application/octet-stream"

__all__ = ["ApiError", "Orchestrator", "create_app"]


class Orchestrator(Protocol):
    """What the API needs from the round orchestrator (both methods must return quickly)."""

    def job_created(self, job_id: str) -> None:
        """A job was committed with status ``created``: start running it."""

    def status(self) -> dict[str, Any]:
        """``{"broker": "connected" | "disconnected", "jobs_running": int, ...}``
        (``"broker_connected": bool`` is accepted in place of ``"broker"``)."""


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def short_db_error(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL, parameters or URLs."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}" if first else type(orig).__name__


# --------------------------------------------------------------------------------------------- middleware
class _BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body over the limit. An HTTPException, so FastAPI's body parser re-raises it
    (rather than answering 400) and the HTTPException handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class GuardMiddleware:
    """Outermost guard: rejects bodies over ``max_body`` bytes (413) and turns any exception that escaped
    the handlers into a logged, generic 500 JSON response (never a stack trace)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._declared_length(scope) > self.max_body:
            await self._send_error(send, 413, "payload_too_large", self._too_large())
            return
        started = False
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _BodyTooLarge(self.max_body)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._send_error(send, 413, "payload_too_large", self._too_large())
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await self._send_error(send, 500, "internal_error", "internal server error")

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body} bytes"

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    @staticmethod
    async def _send_error(send: Send, status: int, code: str, message: str) -> None:
        response = error_response(status, code, message)
        await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})


# ------------------------------------------------------------------------------------------ error handlers
def _format_validation_errors(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own message, without pydantic's "Value error, " prefix
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, f"http_{exc.status_code}"
        )
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _format_validation_errors(exc))

    async def _db_error(request: Request, exc: Exception) -> JSONResponse:
        # The detail (host, driver message) goes to the log and to /health, not to every API client.
        log.warning(
            "database unavailable during %s %s: %s", request.method, request.url.path, short_db_error(exc)
        )
        message = (
            f"database unavailable ({type(getattr(exc, 'orig', None) or exc).__name__}), try again later"
        )
        return error_response(503, "database_unavailable", message)

    # DBAPIError: OperationalError (refused, lost connection, locked...) and every other driver error;
    # SQLAlchemy's TimeoutError: no pooled connection became free in time.
    app.add_exception_handler(DBAPIError, _db_error)
    app.add_exception_handler(PoolTimeoutError, _db_error)


# ---------------------------------------------------------------------------------------------------- auth
_bearer = HTTPBearer(auto_error=False, description="the server's admin token (FEDGEN_ADMIN_TOKEN)")


def _admin_dependency(settings: ServerSettings) -> Callable[..., None]:
    def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if settings.admin_token is None:
            raise ApiError(503, "admin_disabled", "no admin token configured (set FEDGEN_ADMIN_TOKEN)")
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing bearer token", {"WWW-Authenticate": "Bearer"})
        expected = settings.admin_token.get_secret_value().encode()
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            raise ApiError(
                401,
                "unauthorized",
                "invalid bearer token",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )

    return require_admin


# ------------------------------------------------------------------------------------------------- queries
def _latest_versions(session: Session, job_ids: list[str]) -> dict[str, int]:
    if not job_ids:
        return {}
    rows = session.execute(
        select(ModelVersion.job_id, func.max(ModelVersion.version))
        .where(ModelVersion.job_id.in_(job_ids))
        .group_by(ModelVersion.job_id)
    )
    return {job_id: version for job_id, version in rows}


def _job_out(job: Job, latest: dict[str, int]) -> JobOut:
    out = JobOut.model_validate(job)
    out.latest_model_version = latest.get(job.id)
    return out


def _query_job(session: Session, job_id: str) -> JobOut:
    job = session.get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id!r} not found")
    return _job_out(job, _latest_versions(session, [job_id]))


def _require_job(session: Session, job_id: str) -> None:
    if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise ApiError(404, "not_found", f"job {job_id!r} not found")


def _query_jobs(session: Session, limit: int, offset: int) -> JobList:
    total = session.scalar(select(func.count()).select_from(Job)) or 0
    jobs = session.scalars(
        select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
    ).all()
    latest = _latest_versions(session, [job.id for job in jobs])
    return JobList(items=[_job_out(j, latest) for j in jobs], total=total, limit=limit, offset=offset)


def _query_rounds(session: Session, job_id: str, limit: int, offset: int) -> RoundList:
    _require_job(session, job_id)
    where = Round.job_id == job_id
    total = session.scalar(select(func.count()).select_from(Round).where(where)) or 0
    rows = session.scalars(
        select(Round).where(where).order_by(Round.index, Round.attempt).limit(limit).offset(offset)
    ).all()
    items = [RoundOut.model_validate(r) for r in rows]
    return RoundList(job_id=job_id, items=items, total=total, limit=limit, offset=offset)


def _query_round(session: Session, job_id: str, index: int) -> RoundDetail:
    _require_job(session, job_id)
    rounds = session.scalars(
        select(Round).where(Round.job_id == job_id, Round.index == index).order_by(Round.attempt)
    ).all()
    if not rounds:
        raise ApiError(404, "not_found", f"job {job_id!r} has no round {index}")
    updates = session.scalars(
        select(ClientUpdate)
        .where(ClientUpdate.round_id.in_([r.id for r in rounds]))
        .order_by(ClientUpdate.received_at, ClientUpdate.id)
    ).all()
    by_round: dict[int, list[UpdateOut]] = {r.id: [] for r in rounds}
    for update in updates:
        by_round[update.round_id].append(UpdateOut.model_validate(update))
    attempts = [
        RoundAttemptDetail(**RoundOut.model_validate(r).model_dump(), updates=by_round[r.id]) for r in rounds
    ]
    return RoundDetail(job_id=job_id, index=index, attempts=attempts)


def _query_clients(session: Session, job_id: str | None, limit: int, offset: int) -> ClientList:
    query = select(Client)
    count = select(func.count()).select_from(Client)
    if job_id is not None:
        _require_job(session, job_id)
        query, count = query.where(Client.job_id == job_id), count.where(Client.job_id == job_id)
    total = session.scalar(count) or 0
    rows = session.scalars(query.order_by(Client.job_id, Client.client_id).limit(limit).offset(offset)).all()
    return ClientList(
        items=[ClientOut.model_validate(c) for c in rows], total=total, limit=limit, offset=offset
    )


def _query_artifact_sha(session: Session, job_id: str, kind: str) -> tuple[int, str]:
    """(version, sha256) of the ``kind`` ("model" or "generator") ONNX file of the job's latest version."""
    _require_job(session, job_id)
    latest = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.job_id == job_id)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    ).first()
    if latest is None:
        raise ApiError(404, "no_model", f"job {job_id!r} has no model version yet")
    sha = latest.model_onnx_sha256 if kind == "model" else latest.generator_onnx_sha256
    if sha is None:
        raise ApiError(
            404, "no_generator", f"model version {latest.version} of job {job_id!r} has no generator"
        )
    return latest.version, sha


def _insert_job(factory: sessionmaker[Session], config: JobConfig) -> JobOut:
    """Insert the job (status ``created``); :class:`ApiError` 409 if the id is taken. No read first, so that
    a DEFERRED SQLite transaction never has to upgrade a read lock."""
    job = Job(id=config.id, config=config.stored_config(), status=JobStatus.CREATED, current_round=0)
    try:
        with factory.begin() as session:
            session.add(job)
    except IntegrityError:
        raise ApiError(409, "conflict", f"job {config.id!r} already exists") from None
    return _job_out(job, {})


def _check_database(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        session.execute(text("SELECT 1"))


def _count_running(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return (
            session.scalar(select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING)) or 0
        )


# ---------------------------------------------------------------------------------------------------- health
async def _within(fn: Callable[[], Any], timeout: float) -> Any:
    """Run blocking ``fn`` in a worker thread; ``TimeoutError`` after ``timeout`` s (the thread runs on)."""
    return await asyncio.wait_for(asyncio.to_thread(fn), timeout)


async def _database_health(factory: sessionmaker[Session]) -> str:
    try:
        await _within(lambda: _check_database(factory), HEALTH_DB_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError):
        return f"unavailable: no answer within {HEALTH_DB_TIMEOUT_S:g} s"
    except Exception as exc:  # noqa: BLE001 - health must report, never fail
        return f"unavailable: {short_db_error(exc)}"
    return "ok"


async def _orchestrator_health(orchestrator: Orchestrator | None) -> tuple[str, int | None]:
    """(broker state, jobs running according to the orchestrator)."""
    if orchestrator is None:
        return "not configured", None
    try:
        status = await _within(orchestrator.status, HEALTH_ORCHESTRATOR_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001
        log.warning("orchestrator status failed: %s", type(exc).__name__)
        return f"unavailable: {type(exc).__name__}", None
    if not isinstance(status, dict):
        return "unavailable: invalid status", None
    running = status.get("jobs_running")
    running = running if isinstance(running, int) and not isinstance(running, bool) else None
    return _broker_state(status), running


def _broker_state(status: dict[str, Any]) -> str:
    """The broker as /health reports it: ``ok`` when connected, else the orchestrator's word for it."""
    if "broker_connected" in status:
        return "ok" if status["broker_connected"] is True else "disconnected"
    broker = status.get("broker")
    if broker in ("connected", "ok"):
        return "ok"
    return str(broker)[:100] if broker else "unknown"


async def _health(factory: sessionmaker[Session], orchestrator: Orchestrator | None) -> Health:
    database = await _database_health(factory)
    broker, running = await _orchestrator_health(orchestrator)
    if running is None and database == "ok":
        try:
            running = await _within(lambda: _count_running(factory), HEALTH_DB_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            running = None
    degraded = database != "ok" or broker not in ("ok", "not configured")
    return Health(
        status="degraded" if degraded else "ok", database=database, broker=broker, jobs_running=running
    )


# ------------------------------------------------------------------------------------------------ downloads
def _artifact_response(
    request: Request, store: ArtifactStore, job_id: str, kind: str, version: int, sha: str
) -> Response:
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Model-Version": str(version)}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    try:
        data = store.get(sha)
    except ArtifactNotFoundError:
        log.error("job %s version %d: %s artifact %s missing from the store", job_id, version, kind, sha)
        raise ApiError(404, "artifact_missing", f"the {kind} file of version {version} is missing") from None
    except ArtifactCorruptError:
        log.error("job %s version %d: %s artifact %s is corrupt", job_id, version, kind, sha)
        raise ApiError(500, "artifact_corrupt", f"the {kind} file of version {version} is corrupt") from None
    headers["Content-Disposition"] = f'attachment; filename="{job_id}-v{version}-{kind}.onnx"'
    return Response(content=data, media_type=ONNX_MEDIA_TYPE, headers=headers)


# --------------------------------------------------------------------------------------------------- routes
JobIdPath = Annotated[
    str, Path(pattern=JOB_ID_REGEX, max_length=63, description="job id", examples=["mnist-fedgen"])
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (404, 422, 503)}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 409, 413, 422, 503)
}
ONNX_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {ONNX_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "ONNX",
    },
    304: {"description": "not modified (If-None-Match matched the ETag)"},
    **ERRORS,
}


def _add_routes(
    app: FastAPI,
    settings: ServerSettings,
    factory: sessionmaker[Session],
    store: ArtifactStore,
    orchestrator: Orchestrator | None,
) -> None:
    admin = _admin_dependency(settings)

    def read(fn: Callable[[Session], Any]) -> Any:
        with factory() as session:
            return fn(session)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
    async def health() -> JSONResponse:
        """Database (``SELECT 1``, short timeout) and broker state: 200 when ok, 503 when degraded."""
        result = await _health(factory, orchestrator)
        return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503)

    @app.post(
        "/jobs",
        status_code=201,
        response_model=JobOut,
        responses=AUTH_ERRORS,
        tags=["jobs"],
        dependencies=[Depends(admin)],
    )
    def create_job(config: JobConfig) -> JobOut:
        """Create a job (status ``created``) and hand it to the orchestrator. Needs the admin token."""
        job = _insert_job(factory, config)
        log.info("job %s created", job.id)
        _notify_orchestrator(orchestrator, job.id)
        return job

    @app.get("/jobs", response_model=JobList, responses=ERRORS, tags=["jobs"])
    def list_jobs(limit: Limit = 100, offset: Offset = 0) -> JobList:
        """Jobs, newest first."""
        return read(lambda s: _query_jobs(s, limit, offset))

    @app.get("/jobs/{job_id}", response_model=JobOut, responses=ERRORS, tags=["jobs"])
    def get_job(job_id: JobIdPath) -> JobOut:
        return read(lambda s: _query_job(s, job_id))

    @app.get("/jobs/{job_id}/rounds", response_model=RoundList, responses=ERRORS, tags=["rounds"])
    def list_rounds(job_id: JobIdPath, limit: Limit = 100, offset: Offset = 0) -> RoundList:
        """Every round attempt of the job, by index then attempt."""
        return read(lambda s: _query_rounds(s, job_id, limit, offset))

    @app.get("/jobs/{job_id}/rounds/{index}", response_model=RoundDetail, responses=ERRORS, tags=["rounds"])
    def get_round(
        job_id: JobIdPath, index: Annotated[int, Path(ge=0, le=MAX_ROUND_INDEX, examples=[0])]
    ) -> RoundDetail:
        """All attempts of round ``index``, each with its clients' updates (accepted and rejected)."""
        return read(lambda s: _query_round(s, job_id, index))

    @app.get("/clients", response_model=ClientList, responses=ERRORS, tags=["clients"])
    def list_clients(
        job_id: Annotated[str | None, Query(pattern=JOB_ID_REGEX, max_length=63)] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> ClientList:
        """Clients of every job, or of ``job_id``."""
        return read(lambda s: _query_clients(s, job_id, limit, offset))

    for kind in ("model", "generator"):
        _add_download_route(app, read, store, kind)


def _add_download_route(
    app: FastAPI, read: Callable[[Callable[[Session], Any]], Any], store: ArtifactStore, kind: str
) -> None:
    def download(job_id: JobIdPath, request: Request) -> Response:
        version, sha = read(lambda s: _query_artifact_sha(s, job_id, kind))
        return _artifact_response(request, store, job_id, kind, version, sha)

    download.__doc__ = f"The {kind} ONNX file of the job's latest model version; ETag = its sha256."
    app.add_api_route(
        f"/jobs/{{job_id}}/{kind}.onnx",
        download,
        methods=["GET"],
        response_class=Response,
        responses=ONNX_RESPONSES,
        tags=["models"],
        name=f"download_{kind}",
    )


def _notify_orchestrator(orchestrator: Orchestrator | None, job_id: str) -> None:
    """Tell the orchestrator; its failure is logged, not returned (the job is committed either way and is
    picked up again from the database by a restarted orchestrator)."""
    if orchestrator is None:
        return
    try:
        orchestrator.job_created(job_id)
    except Exception:
        log.exception("orchestrator.job_created(%r) failed", job_id)


# ------------------------------------------------------------------------------------------------------ app
def create_app(
    settings: ServerSettings,
    session_factory: sessionmaker[Session],
    store: ArtifactStore,
    orchestrator: Orchestrator | None = None,
) -> FastAPI:
    """The REST API on ``session_factory`` (schema already upgraded) and ``store``. OpenAPI at ``/docs``."""
    app = FastAPI(
        title="FedGen round server",
        version="1",
        description="Jobs, rounds, clients and model downloads of the FedGen-over-MQTT round server.",
    )
    _install_error_handlers(app)
    _add_routes(app, settings, session_factory, store, orchestrator)
    app.add_middleware(GuardMiddleware, max_body=settings.max_upload_bytes)
    return app
