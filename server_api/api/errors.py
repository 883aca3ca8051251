"""Every error of the REST API is JSON ``{"error": {"code": ..., "message": ...}}``: the exception, the handlers
that answer it, and the outermost guard (body size limit, generic 500 without a stack trace)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server_api.db.engine import short_db_error

log = logging.getLogger("server_api.api")


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message"}}`` with ``status`` (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


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


def _format_validation_errors(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])  # our own message, without pydantic's "Value error, " prefix
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "validation_error", _format_validation_errors(exc))

    async def _db_error(request: Request, exc: Exception) -> JSONResponse:
        # The detail (host, driver message) goes to the log and to /health, not to every API client.
        log.warning("database unavailable during %s %s: %s", request.method, request.url.path, short_db_error(exc))
        message = f"database unavailable ({type(getattr(exc, 'orig', None) or exc).__name__}), try again later"
        return error_response(503, "database_unavailable", message)

    # DBAPIError: OperationalError (refused, lost connection, locked...) and every other driver error;
    # SQLAlchemy's TimeoutError: no pooled connection became free in time.
    app.add_exception_handler(DBAPIError, _db_error)
    app.add_exception_handler(PoolTimeoutError, _db_error)
