"""KPI routes (CONTRACT §4–5): current snapshots, and a KPI's history from the database."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, HTTPException, Query

from api import history, schemas
from api.auth import Caller
from api.context import ApiContext
from api.live import snapshot_item


def router(ctx: ApiContext) -> APIRouter:
    """``/api/kpis``, ``/api/kpis/history``."""
    router = APIRouter()
    live = ctx.live

    @router.get(
        "/api/kpis",
        tags=["kpis"],
        response_model=None,
        responses={
            **schemas.ok(schemas.KpiList, {"items": [schemas.KPI_SNAPSHOT_EXAMPLE], "count": 1}),
            **schemas.errors(401, 403, 422),
        },
    )
    async def kpis(
        caller: Caller,
        kpi: Annotated[str | None, Query(description="KPI name(s), comma-separated")] = None,
        scope: Annotated[str | None, Query(description="scope(s), comma-separated, e.g. province")] = None,
        window: Annotated[str | None, Query(description="window(s), comma-separated")] = None,
    ) -> dict[str, Any]:
        """Current KPI snapshots (CONTRACT §4) that the caller may see."""
        scopes = _split(scope)
        refused = [s for s in scopes if not caller.can_see_scope(s)]
        if refused:
            raise HTTPException(403, f"scope {refused[0]!r} is outside your rights")
        found = live.table.query(_split(kpi), scopes, _split(window))
        items = [snapshot_item(s) for s in found if caller.can_see_kpi(s.kpi, s.scope)]
        return {"items": items, "count": len(items)}

    @router.get(
        "/api/kpis/history",
        tags=["kpis"],
        response_model=None,
        responses={
            **schemas.ok(schemas.KpiHistory, schemas.HISTORY_EXAMPLE),
            **schemas.errors(400, 401, 403, 422, 503),
        },
    )
    async def kpi_history(
        caller: Caller,
        kpi: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="one KPI name, e.g. env.aqi (required)")
        ] = None,
        scope: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="one scope, e.g. province (required)")
        ] = None,
        window: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="one window: 1h, 24h, today, mtd, now (required)")
        ] = None,
        start: Annotated[
            str | None, Query(alias="from", pattern=schemas.NO_NUL, description="ISO 8601; default: 24 h before `to`")
        ] = None,
        end: Annotated[
            str | None, Query(alias="to", pattern=schemas.NO_NUL, description="ISO 8601; default: now")
        ] = None,
        bucket: Annotated[
            str | None, Query(pattern=schemas.NO_NUL, description="1m, 5m, 1h, 1d ...; default: fits the range")
        ] = None,
    ) -> dict[str, Any]:
        """A KPI's time series, one point per bucket (its last value, with min, max and mean).

        `kpi`, `scope` and `window` are required (400 naming the missing ones); at most 31 days
        and 2,000 points per request.
        """
        try:
            q = history.build_query(kpi, scope, window, start, end, bucket)
        except history.HistoryQueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        if not caller.can_see_kpi(q.kpi, q.scope):
            raise HTTPException(403, f"{q.kpi} at {q.scope} is outside your rights")
        if ctx.pool is None:
            raise HTTPException(503, "the database is not connected")
        async with ctx.pool.connection(timeout=5) as conn:
            storage = await _storage(ctx, conn)
            cur = await conn.execute(history.sql_for(storage), history.sql_params(q))
            rows = await cur.fetchall()
        return {
            "kpi": q.kpi,
            "scope": q.scope,
            "window": q.window,
            "from": q.start.astimezone(history.LOCAL).isoformat(),
            "to": q.end.astimezone(history.LOCAL).isoformat(),
            "bucket": q.bucket_label,
            "storage": storage,
            "points": [history.point(r) for r in rows[: history.MAX_POINTS]],
        }

    return router


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


async def _storage(ctx: ApiContext, conn: psycopg.AsyncConnection[Any]) -> str:
    if ctx.storage is None:
        cur = await conn.execute("SELECT value FROM ioc_meta WHERE key = 'storage'")
        row = await cur.fetchone()
        ctx.storage = str(row[0]) if row else "postgresql"
    return ctx.storage
