"""The round server's REST API (FastAPI): health, jobs, rounds, clients and model downloads.

``create_app(settings, session_factory, store, orchestrator)`` builds the application; docs/api.md describes
the endpoints, a router per resource lives in `server_api.api.routes`, their dependencies in
`server_api.api.deps`. Every error is JSON ``{"error": {"code": ..., "message": ...}}``.

SQLite: give the API a session factory on an engine made with ``make_engine(url, sqlite_begin="DEFERRED")``
so that its reads don't take the database's write lock (``BEGIN IMMEDIATE``, the engine default) away from
the orchestrator. The one write (``POST /jobs``) is a single INSERT, safe with either mode.
"""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from sqlalchemy.orm import Session, sessionmaker

from server_api.api.deps import Orchestrator, Services
from server_api.api.errors import GuardMiddleware, install_error_handlers
from server_api.api.routes import clients, dashboard, health, jobs, metrics, models, rounds
from server_api.db.store import ArtifactStore
from server_api.settings import ServerSettings
from shared.protocol.job import JobConfig

__all__ = ["create_app"]


def create_app(settings: ServerSettings, session_factory: sessionmaker[Session], store: ArtifactStore,
               orchestrator: Orchestrator | None = None) -> FastAPI:
    """The REST API on ``session_factory`` (schema already upgraded) and ``store``. OpenAPI at ``/docs``."""
    # FastAPIOffline: /docs and /redoc serve Swagger UI and ReDoc from the installed package, not from a CDN
    app = FastAPIOffline(title="FedGen round server", version="1",
                         description="Jobs, rounds, clients and model downloads of the FedGen-over-MQTT round server.")
    app.state.services = Services(settings, session_factory, store, orchestrator)
    install_error_handlers(app)
    for module in (health, metrics, jobs, rounds, clients, models, dashboard):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")  # the dashboard's files
    app.add_middleware(GuardMiddleware, max_body=settings.max_upload_bytes)
    _add_msgspec_schemas(app)
    return app


def _add_msgspec_schemas(app: FastAPI) -> None:
    """Put the JSON schema of JobConfig (a msgspec type, so FastAPI does not see it) into the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            (_,), components = msgspec.json.schema_components([JobConfig],
                                                             ref_template="#/components/schemas/{name}")
            document.setdefault("components", {}).setdefault("schemas", {}).update(components)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
