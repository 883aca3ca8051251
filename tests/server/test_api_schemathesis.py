"""Property-based API tests: Schemathesis generates requests from the app's OpenAPI schema and sends them to
the app in-process (ASGI), checking that none is answered with a 5xx ("not_a_server_error").

The app runs on SQLite and on PostgreSQL with a seeded job (rounds with accepted and rejected updates,
clients, a model version), so that generated requests reach the query code and not only the validation
layer. Requests carry the admin token, so ``POST /jobs`` bodies get past authentication to validation and
the database. Skipped when schemathesis is not installed (``pip install schemathesis``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.orm import sessionmaker
from test_api import TOKEN, seed_job, seed_model_version, seed_rounds

from server_api.api.app import create_app
from server_api.db import make_engine, make_session_factory, upgrade_schema
from server_api.db.store import ArtifactStore
from server_api.settings import ServerSettings

schemathesis = pytest.importorskip("schemathesis")
not_a_server_error = schemathesis.checks.not_a_server_error

MAX_EXAMPLES = 25  # per operation and backend: ~15 s for both backends on a laptop-class CPU


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document; the factory and store are only referenced by handlers, never called here.
    (``schemathesis.pytest.from_fixture`` would avoid this, but breaks on pytest 9: no ``node._nodeid``.)"""
    app = create_app(
        ServerSettings(database_url="sqlite://", admin_token=TOKEN), sessionmaker(), cast(ArtifactStore, None)
    )
    return app.openapi()


schema = schemathesis.openapi.from_dict(_openapi_document())


@contextmanager
def _postgres_database(admin_url: URL) -> Iterator[str]:
    """URL of a new PostgreSQL database on the server of ``admin_url``, dropped afterwards."""
    name = f"fedgen_test_st_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def _seeded_app(url: str, artifacts: Path) -> Iterator[FastAPI]:
    upgrade_schema(url)
    engine = make_engine(url, sqlite_begin="DEFERRED")
    try:
        factory = make_session_factory(engine)
        store = ArtifactStore(artifacts)
        seed_job(factory)
        seed_rounds(factory)
        seed_model_version(factory, store, 0, b"model-v0", b"generator-v0")
        yield create_app(ServerSettings(database_url=url, admin_token=TOKEN), factory, store)
    finally:
        engine.dispose()


@pytest.fixture(
    scope="module",
    params=[pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgresql)],
)
def live_app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    """The app on a seeded database, once per backend (PostgreSQL: skipped, or failed in CI, when absent)."""
    root = tmp_path_factory.mktemp("schemathesis")
    if request.param == "sqlite":
        with _seeded_app(f"sqlite:///{root / 'fedgen.db'}", root / "artifacts") as app:
            yield app
        return
    with (
        _postgres_database(request.getfixturevalue("postgres_admin_url")) as url,
        _seeded_app(url, root / "artifacts") as app,
    ):
        yield app


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any, live_app: FastAPI) -> None:
    case.call_and_validate(
        app=live_app, headers={"Authorization": f"Bearer {TOKEN}"}, checks=[not_a_server_error]
    )
