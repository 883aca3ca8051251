"""``GET /health``: the database (``SELECT 1``, short timeout) and the broker, 200 when ok, 503 when degraded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from server_api.api.deps import Orchestrator, ServicesDep
from server_api.api.schemas import Health
from server_api.db import queries
from server_api.db.engine import short_db_error

log = logging.getLogger("server_api.api")
router = APIRouter(tags=["health"])

HEALTH_DB_TIMEOUT_S = 3.0
HEALTH_ORCHESTRATOR_TIMEOUT_S = 2.0


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(svc: ServicesDep) -> JSONResponse:
    """Database (``SELECT 1``, short timeout) and broker state: 200 when ok, 503 when degraded."""
    result = await check_health(svc.session_factory, svc.orchestrator)
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503)


async def check_health(factory: sessionmaker[Session], orchestrator: Orchestrator | None) -> Health:
    database = await _database_health(factory)
    broker, running = await _orchestrator_health(orchestrator)
    if running is None and database == "ok":
        try:
            running = await _within(lambda: _count_running(factory), HEALTH_DB_TIMEOUT_S)
        except Exception:  # health must report, never fail
            running = None
    degraded = database != "ok" or broker not in ("ok", "not configured")
    return Health(status="degraded" if degraded else "ok", database=database, broker=broker, jobs_running=running)


async def _within(fn: Callable[[], Any], timeout: float) -> Any:
    """Run blocking ``fn`` in a worker thread; ``TimeoutError`` after ``timeout`` s (the thread runs on)."""
    return await asyncio.wait_for(asyncio.to_thread(fn), timeout)


def _check_database(factory: sessionmaker[Session]) -> None:
    with factory() as session:
        session.execute(text("SELECT 1"))


def _count_running(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return queries.count_running_jobs(session)


async def _database_health(factory: sessionmaker[Session]) -> str:
    try:
        await _within(lambda: _check_database(factory), HEALTH_DB_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError):
        return f"unavailable: no answer within {HEALTH_DB_TIMEOUT_S:g} s"
    except Exception as exc:  # health must report, never fail
        return f"unavailable: {short_db_error(exc)}"
    return "ok"


async def _orchestrator_health(orchestrator: Orchestrator | None) -> tuple[str, int | None]:
    """(broker state, jobs running according to the orchestrator)."""
    if orchestrator is None:
        return "not configured", None
    try:
        status = await _within(orchestrator.status, HEALTH_ORCHESTRATOR_TIMEOUT_S)
    except Exception as exc:
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
