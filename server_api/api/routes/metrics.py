"""``GET /metrics``: the server's Prometheus metrics (text format); the database and broker gauges are read at
scrape time."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server_api import metrics
from server_api.api.deps import ServicesDep
from server_api.api.routes.health import check_health

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                                  "description": "Prometheus text format"}})
async def prometheus_metrics(svc: ServicesDep) -> Response:
    """Counters and gauges with the `fedgen_` prefix (docs/api.md)."""
    health = await check_health(svc.session_factory, svc.orchestrator)
    metrics.DATABASE_UP.set(1 if health.database == "ok" else 0)
    metrics.BROKER_UP.set(1 if health.broker == "ok" else 0)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
