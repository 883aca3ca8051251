"""Alembic environment of the round server's database.

The database URL is, in this order: ``alembic -x url=...``, the ``sqlalchemy.url`` option of the Config
(set by ``server_api.db.engine.upgrade_schema``), ``$FEDGEN_DATABASE_URL``, the default SQLite file.
A caller may also hand over an open connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

import importlib.util
import sys
from logging.config import fileConfig
from pathlib import Path

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection

# `alembic` run by hand from a checkout: make the repository importable (installed, the package is anyway).
if importlib.util.find_spec("server_api") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_api.db.engine import database_url, make_engine  # noqa: E402 (after the sys.path line above)
from server_api.db.models import Base, UTCDateTime  # noqa: E402

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

# Serialises concurrent upgrades (two servers starting at once) on PostgreSQL.
_PG_ADVISORY_LOCK_ID = 0x46454447454E  # "FEDGEN"


def _url() -> str:
    from_x = context.get_x_argument(as_dictionary=True).get("url")
    return database_url(from_x or config.get_main_option("sqlalchemy.url") or None)


def _render_item(type_: str, obj: object, autogen_context: AutogenContext) -> str | bool:
    """Autogenerate: write the models' custom types as plain SQLAlchemy types, so that migrations don't
    import server_api (they must keep working when the models change)."""
    if type_ != "type":
        return False
    if isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, sa.Enum) and not obj.native_enum:
        return f"sa.String({obj.length})"  # the values are in a CHECK constraint: add it by hand
    if isinstance(obj, sa.JSON) and "postgresql" in getattr(obj, "_variant_mapping", {}):
        autogen_context.imports.add("from sqlalchemy.dialects import postgresql")
        return 'sa.JSON().with_variant(postgresql.JSONB(), "postgresql")'
    return False


def _configure_options(dialect_name: str) -> dict[str, object]:
    return {
        "target_metadata": target_metadata,
        "render_item": _render_item,
        "compare_type": True,
        # SQLite can't ALTER most things: let op.batch_alter_table() (and autogenerate) copy tables.
        "render_as_batch": dialect_name == "sqlite",
    }


def run_migrations_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    url = _url()
    dialect_name = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(
        url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_configure_options(dialect_name)
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection: Connection, own_engine: bool) -> None:
    dialect_name = connection.dialect.name
    options = _configure_options(dialect_name)
    if dialect_name == "sqlite" and own_engine:
        # make_engine() issues a real BEGIN on SQLite, so DDL is transactional: a failed upgrade rolls back.
        options["transactional_ddl"] = True
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        if dialect_name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_ADVISORY_LOCK_ID})
        context.run_migrations()
        if dialect_name == "sqlite":
            _check_sqlite_foreign_keys(connection)


def _check_sqlite_foreign_keys(connection: Connection) -> None:
    """Foreign keys are off while migrating SQLite (batch table copies would cascade); verify them after."""
    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if problems:
        raise RuntimeError(f"migration left rows violating foreign keys: {problems[:10]}")


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection, own_engine=False)
        return
    engine = make_engine(_url(), poolclass=pool.NullPool, sqlite_foreign_keys=False)
    try:
        with engine.connect() as connection:
            _run_on(connection, own_engine=True)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
