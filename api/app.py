"""The HTTP and WebSocket edge (CONTRACT §7): ``create_app`` builds it, ``serve`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from api import history
from api.auth import Principal, verify_token
from api.broadcaster import Broadcaster
from api.feed import Feed
from api.live import LiveState, snapshot_item
from api.ws import WsLimits, websocket_endpoint
from ioc.errors import AuthError
from ioc.registry import Registry, load_registry
from ioc.settings import Settings

log = logging.getLogger(__name__)

STATIC_DIR: Final = Path(__file__).parent / "static"
#: The wall page loads only its own script, style and socket; tokens never leave by referrer.
WALL_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
READY_TIMEOUT_S: Final = 2.0


@dataclass
class ApiContext:
    """Everything the routes and the WebSocket handler share within one app."""

    settings: Settings
    registry: Registry
    broadcaster: Broadcaster
    live: LiveState
    feed: Feed
    ws_limits: WsLimits
    pool: AsyncConnectionPool | None = None
    storage: str | None = None
    units_json: list[dict[str, Any]] = field(default_factory=list)
    stations_json: list[dict[str, Any]] = field(default_factory=list)


_bearer = HTTPBearer(auto_error=False, description="An access token from `ioc token create`.")


def _context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ioc
    return ctx


def current_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The caller of an HTTP request; 401 when the bearer token is missing or not valid."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        return verify_token(_context(request).settings, credentials.credentials)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc


Caller = Annotated[Principal, Depends(current_principal)]
Context = Annotated[ApiContext, Depends(_context)]


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


async def _storage(ctx: ApiContext, conn: psycopg.AsyncConnection[Any]) -> str:
    if ctx.storage is None:
        cur = await conn.execute("SELECT value FROM ioc_meta WHERE key = 'storage'")
        row = await cur.fetchone()
        ctx.storage = str(row[0]) if row else "postgresql"
    return ctx.storage


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
    for server in _split(bootstrap):
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


def create_app(
    settings: Settings,
    registry: Registry | None = None,
    *,
    connect: bool = True,
    broadcaster: Broadcaster | None = None,
    ws_limits: WsLimits | None = None,
) -> FastAPI:
    """A fresh API app; ``connect=False`` opens neither database nor broker (tests)."""
    registry = registry or load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    broadcaster = broadcaster or Broadcaster()
    live = LiveState(broadcaster)
    ctx = ApiContext(
        settings=settings,
        registry=registry,
        broadcaster=broadcaster,
        live=live,
        feed=Feed(settings, live),
        ws_limits=ws_limits or WsLimits(),
        units_json=[{"code": u.code, "name": u.name, "kind": u.kind} for u in registry.units.values()],
        stations_json=[
            {
                "station_id": s.station_id,
                "name": s.name,
                "kind": s.kind,
                "commune_code": s.commune_code,
                "lat": s.lat,
                "lon": s.lon,
                "interval_s": s.interval_s,
                "river": s.river or None,
                "bd1_m": s.alarm_levels_m[0],
                "bd2_m": s.alarm_levels_m[1],
                "bd3_m": s.alarm_levels_m[2],
            }
            for s in registry.stations.values()
        ],
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if connect:
            ctx.pool = AsyncConnectionPool(
                settings.database_url,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": 5},
                name="ioc-api",
            )
            await ctx.pool.open(wait=False)
            ctx.feed.start()
        log.info("API started (feed %s)", "on" if connect else "off")
        try:
            yield
        finally:
            await ctx.feed.stop()
            if ctx.pool is not None:
                await ctx.pool.close()

    app = FastAPI(
        title="Nghệ An IOC API",
        summary="KPIs, history and the live feed of the provincial smart operations centre.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.ioc = ctx

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
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
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/api/kpis", tags=["kpis"])
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

    @app.get("/api/kpis/history", tags=["kpis"])
    async def kpi_history(
        caller: Caller,
        kpi: str | None = None,
        scope: str | None = None,
        window: str | None = None,
        start: Annotated[str | None, Query(alias="from", description="ISO 8601; default: 24 h before `to`")] = None,
        end: Annotated[str | None, Query(alias="to", description="ISO 8601; default: now")] = None,
        bucket: Annotated[str | None, Query(description="1m, 5m, 1h, 1d ...; default: fits the range")] = None,
    ) -> dict[str, Any]:
        """A KPI's time series, one point per bucket (its last value, with min, max and mean)."""
        try:
            q = history.build_query(kpi, scope, window, start, end, bucket)
        except history.HistoryQueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        if not caller.can_see_kpi(q.kpi, q.scope):
            raise HTTPException(403, f"{q.kpi} at {q.scope} is outside your rights")
        if ctx.pool is None:
            raise HTTPException(503, "the database is not connected")
        try:
            async with ctx.pool.connection(timeout=5) as conn:
                storage = await _storage(ctx, conn)
                cur = await conn.execute(history.sql_for(storage), history.sql_params(q))
                rows = await cur.fetchall()
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise HTTPException(503, "the database is unreachable") from exc
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

    @app.get("/api/units", tags=["registries"])
    async def units(caller: Caller) -> dict[str, Any]:
        """The province's communes (xã, phường)."""
        return {"items": ctx.units_json, "count": len(ctx.units_json)}

    @app.get("/api/stations", tags=["registries"])
    async def stations(caller: Caller) -> dict[str, Any]:
        """Environmental stations, with flood alarm levels BĐ I–III for water gauges."""
        return {"items": ctx.stations_json, "count": len(ctx.stations_json)}

    @app.get("/wall", include_in_schema=False)
    async def wall() -> FileResponse:
        return FileResponse(STATIC_DIR / "wall.html", media_type="text/html", headers=WALL_HEADERS)

    app.add_api_websocket_route("/ws", websocket_endpoint)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve(settings: Settings | None = None) -> None:
    """Run the API with uvicorn (``ioc api``); blocks until interrupted."""
    import uvicorn

    settings = settings or Settings()
    limits = WsLimits()
    uvicorn.run(
        create_app(settings, ws_limits=limits),
        host=settings.api_host,
        port=settings.api_port,
        ws="websockets-sansio",
        ws_max_size=limits.max_frame_bytes,
        ws_ping_interval=limits.ping_interval_s,
        ws_ping_timeout=limits.ping_interval_s,
        log_config=None,
        proxy_headers=True,
        server_header=False,
    )
