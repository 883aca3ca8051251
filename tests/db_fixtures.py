"""Database fixtures (a pytest plugin, loaded by conftest.py): every test that takes ``db_url`` runs twice,
on a fresh SQLite file and on a fresh PostgreSQL database.

PostgreSQL: a uniquely named database is created on the server of ``$FEDGEN_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``) and dropped afterwards. When that server can't
be reached the PostgreSQL cases are skipped, unless ``FEDGEN_REQUIRE_POSTGRES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from server_api.db.engine import make_engine, make_session_factory, normalise_url, upgrade_schema

POSTGRES_URL_ENV = "FEDGEN_TEST_POSTGRES_URL"
REQUIRE_POSTGRES_ENV = "FEDGEN_REQUIRE_POSTGRES"
DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgresql: runs against a real PostgreSQL server")


def _postgres_required() -> bool:
    return os.environ.get(REQUIRE_POSTGRES_ENV, "").strip().lower() in ("1", "true", "yes")


def _admin_url() -> URL:
    return make_url(normalise_url(os.environ.get(POSTGRES_URL_ENV) or DEFAULT_TEST_POSTGRES_URL))


def _admin_engine(url: URL) -> Engine:
    return create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


@pytest.fixture(scope="session")
def postgres_admin_url() -> URL:
    """The maintenance URL of the test PostgreSQL server; skips (or fails, in CI) when it is unreachable."""
    url = _admin_url()
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure to connect means "no PostgreSQL here"
        reason = (
            f"PostgreSQL not reachable at {url!r} (set {POSTGRES_URL_ENV}): {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
        if _postgres_required():
            pytest.fail(f"{REQUIRE_POSTGRES_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    finally:
        engine.dispose()
    return url


def _drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture
def fresh_postgres_url(postgres_admin_url: URL) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped after the test."""
    name = f"fedgen_test_{uuid.uuid4().hex[:16]}"
    admin = _admin_engine(postgres_admin_url)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield postgres_admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            _drop_database(admin, name)
        finally:
            admin.dispose()


@pytest.fixture
def fresh_sqlite_url(tmp_path: Path) -> str:
    """URL of a new SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'fedgen-test.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """URL of an empty database (no schema yet), once per backend."""
    fixture = "fresh_sqlite_url" if request.param == "sqlite" else "fresh_postgres_url"
    return str(request.getfixturevalue(fixture))


@pytest.fixture
def db_engine(db_url: str) -> Iterator[Engine]:
    """An engine from ``make_engine`` on the test database (schema not upgraded)."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session_factory(db_url: str, db_engine: Engine) -> sessionmaker[Session]:
    """Session factory on the test database, schema upgraded to head by ``upgrade_schema``."""
    upgrade_schema(db_url)
    return make_session_factory(db_engine)


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session on the upgraded test database; rolled back and closed after the test."""
    with session_factory() as s:
        yield s
        s.rollback()
