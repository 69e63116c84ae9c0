"""Operations routes: liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import psycopg
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout

from api import schemas
from api.context import ApiContext
from api.workers import WorkerGroup

READY_TIMEOUT_S: Final = 2.0


def router(ctx: ApiContext, *, connect: bool) -> APIRouter:
    """``/healthz``, ``/readyz``, ``/metrics``."""
    router = APIRouter()
    settings, broadcaster, metrics = ctx.settings, ctx.broadcaster, ctx.metrics
    worker_group = WorkerGroup(settings)

    @router.get(
        "/healthz", tags=["operations"], response_model=None, responses=schemas.ok(schemas.Health, {"status": "ok"})
    )
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @router.get(
        "/readyz",
        tags=["operations"],
        response_model=None,
        responses={
            **schemas.ok(schemas.Readiness, schemas.READY_EXAMPLE, "The database and the broker are reachable."),
            503: {
                "model": schemas.Readiness,
                "description": "The database or the broker is unreachable.",
                "content": {"application/json": {"example": schemas.NOT_READY_EXAMPLE}},
            },
        },
    )
    async def readyz() -> JSONResponse:
        """Readiness: 200 when the database and the broker are reachable, else 503."""
        database, broker = await asyncio.gather(_database_ok(ctx), _broker_ok(settings.kafka_bootstrap))
        ready = database == "ok" and broker == "ok"
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "broker": broker,
            "feed": ctx.feed.status(),
            "clients": broadcaster.subscriber_count,
            "workers": await worker_group.status() if broker == "ok" and connect else None,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}, "example": schemas.METRICS_EXAMPLE}},
            }
        },
    )
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of this API process: clients, messages, refusals, feed, HTTP requests."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


async def _database_ok(ctx: ApiContext) -> str:
    if ctx.pool is None:
        return "not configured"
    try:
        async with ctx.pool.connection(timeout=READY_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")
    except (PoolTimeout, psycopg.Error, OSError) as exc:
        return f"unreachable ({type(exc).__name__})"
    return "ok"


async def _broker_ok(bootstrap: str) -> str:
    for server in [s.strip() for s in bootstrap.split(",") if s.strip()]:
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), READY_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError):
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return "ok"
    return "unreachable"


