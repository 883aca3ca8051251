"""Engines, sessions, schema upgrades and retries for the round server's database.

The database is chosen by :func:`database_url`: an explicit URL, else ``$FEDGEN_DATABASE_URL``, else a SQLite
file ``fedgen.db`` in the current directory. See docs/database.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server_api.resources import shipped_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

ENV_VAR = "FEDGEN_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///fedgen.db"

SQLITE_BUSY_TIMEOUT_S = 30.0
POSTGRES_CONNECT_TIMEOUT_S = 10

# Alembic's ``context`` is a module-level global: one migration command at a time per process.
# (Across processes, migrations/env.py serialises with a lock in the database.)
_ALEMBIC_LOCK = threading.Lock()


def normalise_url(url: str) -> str:
    """Use the psycopg 3 driver for bare ``postgresql://`` / ``postgres://`` URLs; leave others alone."""
    url = url.strip()
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def database_url(explicit: str | None = None) -> str:
    """The database URL: ``explicit``, else ``$FEDGEN_DATABASE_URL``, else :data:`DEFAULT_DATABASE_URL`."""
    url = explicit or os.environ.get(ENV_VAR) or DEFAULT_DATABASE_URL
    return normalise_url(url)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars (label counts from np.bincount...)
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """JSON serializer of the engines: numpy values become plain lists/numbers, and NaN/Infinity become
    null (PostgreSQL's JSONB rejects them, SQLite would keep them: null is the same on both)."""
    try:
        return json.dumps(value, default=_json_default, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(json.loads(json.dumps(value, default=_json_default))), allow_nan=False)


def make_engine(
    url: str | None = None,
    *,
    sqlite_begin: str = "IMMEDIATE",
    sqlite_foreign_keys: bool = True,
    **kwargs: Any,
) -> Engine:
    """Create an engine for ``database_url(url)``; extra keyword arguments go to ``create_engine``.

    SQLite: foreign keys on, WAL journal, a busy timeout (``busy_timeout=`` seconds, default 30), and real
    transactions (``BEGIN IMMEDIATE`` by default: a transaction takes the write lock when it starts, so
    concurrent writers wait for each other instead of failing with "database is locked" half-way; pass
    ``sqlite_begin="DEFERRED"`` for read-mostly use). ``sqlite_foreign_keys=False`` is for migrations only.
    PostgreSQL: ``pool_pre_ping`` so that connections killed by a server restart are replaced, and a
    connect timeout. JSON is written by :func:`json_dumps`.
    """
    resolved = make_url(database_url(url))
    kwargs.setdefault("json_serializer", json_dumps)
    if resolved.get_backend_name() == "sqlite":
        return _sqlite_engine(resolved, sqlite_begin, sqlite_foreign_keys, **kwargs)
    if resolved.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S, **kwargs.pop("connect_args", {})}
        if resolved.get_driver_name() == "psycopg":
            # no server-side prepared statements: psycopg prepares a query after its 5th run, and PostgreSQL's
            # generic plan for the ingest's `idempotency_key IN (256 keys)` took 50-77 ms against 3 ms planned
            # with the values (docs/scaling.md); it also keeps PgBouncer's transaction pooling usable
            connect_args.setdefault("prepare_threshold", None)
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(resolved, connect_args=connect_args, **kwargs)
    return create_engine(resolved, **kwargs)


def _sqlite_engine(url: URL, begin: str, foreign_keys: bool, **kwargs: Any) -> Engine:
    if begin.upper() not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise ValueError(f"sqlite_begin must be DEFERRED, IMMEDIATE or EXCLUSIVE, not {begin!r}")
    busy_timeout = float(kwargs.pop("busy_timeout", SQLITE_BUSY_TIMEOUT_S))
    connect_args = {"timeout": busy_timeout, **kwargs.pop("connect_args", {})}
    engine = create_engine(url, connect_args=connect_args, **kwargs)
    in_memory = url.database in (None, "", ":memory:")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (pysqlite's own BEGIN handling breaks SAVEPOINTs and
        # lets reads escape the transaction); the "begin" hook below issues BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(f"BEGIN {begin.upper()}")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``. Objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic ``Config`` for the repository's migrations/ folder and ``database_url(url)``."""
    migrations = shipped_dir("migrations")
    if not (migrations / "env.py").is_file():
        raise FileNotFoundError(f"Alembic migrations not found at {migrations}")
    config = Config()
    config.set_main_option("script_location", str(migrations))
    # ConfigParser interpolates '%': escape it (URL-encoded passwords contain it).
    config.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    return config


def upgrade_schema(url: str | None = None, revision: str = "head") -> None:
    """Run ``alembic upgrade <revision>`` on ``database_url(url)``; a no-op when already there."""
    config = alembic_config(url)
    log.info("upgrading database schema of %s to %s", make_url(database_url(url)), revision)
    with _ALEMBIC_LOCK:
        command.upgrade(config, revision)


def downgrade_schema(url: str | None = None, revision: str = "base") -> None:
    """Run ``alembic downgrade <revision>``. ``base`` drops every table: all data is lost."""
    config = alembic_config(url)
    with _ALEMBIC_LOCK:
        command.downgrade(config, revision)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: ``OperationalError`` (lost connection, lock/busy, serialization failure...)
    and any DBAPI error whose connection was invalidated (e.g. a PostgreSQL restart)."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def retry_attempts(
    attempts: int = 5, delay: float = 0.5, *, backoff: float = 2.0, max_delay: float = 10.0
) -> Iterator[AbstractContextManager[None]]:
    """Block form of :func:`retrying`::

        for attempt in retry_attempts(5, 0.5):
            with attempt, factory.begin() as session:
                ...

    The body runs again after a :func:`is_transient` error, at most ``attempts`` times in all, waiting
    ``delay``, ``delay * backoff``, ... (capped at ``max_delay``) in between; each retry is logged. The last
    error, and any non-transient one, propagates. Open the session *inside* the ``with`` so that every try
    gets a fresh transaction.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    succeeded = False

    @contextmanager
    def attempt(number: int) -> Iterator[None]:
        nonlocal succeeded
        try:
            yield
        except DBAPIError as exc:
            if not is_transient(exc):
                raise
            if number == attempts:
                log.error("database operation failed %d time(s), giving up: %s", attempts, short_db_error(exc))
                raise
            wait = min(delay * backoff ** (number - 1), max_delay)
            log.warning(
                "database operation failed (attempt %d/%d): %s; retrying in %.2fs",
                number,
                attempts,
                short_db_error(exc),
                wait,
            )
            time.sleep(wait)
        else:
            succeeded = True

    for number in range(1, attempts + 1):
        yield attempt(number)
        if succeeded:
            return


def retrying(
    fn: Callable[[], T],
    attempts: int = 5,
    delay: float = 0.5,
    *,
    backoff: float = 2.0,
    max_delay: float = 10.0,
) -> T:
    """Call ``fn()`` until it succeeds, retrying :func:`is_transient` errors (see :func:`retry_attempts`).

    ``fn`` must be a whole unit of work that opens its own session/transaction, so that a retry starts
    clean; :func:`in_transaction` does that for you.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    for attempt in retry_attempts(attempts, delay, backoff=backoff, max_delay=max_delay):
        with attempt:
            return fn()
    raise AssertionError("unreachable: the last attempt either returns or raises")


def in_transaction(
    factory: sessionmaker[Session],
    fn: Callable[[Session], T],
    attempts: int = 5,
    delay: float = 0.5,
    **retry_kwargs: Any,
) -> T:
    """Run ``fn(session)`` in a fresh session and transaction, committed on return, retried when transient.

    The usual way for the server to write: ``in_transaction(factory, lambda s: s.add(...))``.
    """

    def unit() -> T:
        with factory.begin() as session:
            return fn(session)

    return retrying(unit, attempts, delay, **retry_kwargs)


def short_db_error(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL, parameters or URLs."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first[:200]}" if first else type(orig).__name__
