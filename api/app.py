"""The HTTP and WebSocket edge (CONTRACT §7): ``create_app`` builds it, ``serve`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import Counter as PromCounter
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import history, schemas
from api.alert_routes import alert_router
from api.alert_store import AlertPublisher, AlertStore, KafkaAlertPublisher, PostgresAlertStore
from api.auth import Caller
from api.broadcaster import Broadcaster
from api.feed import Feed
from api.ingest import install as install_ingest
from api.live import LiveState, snapshot_item
from api.report_routes import report_router
from api.workers import WorkerGroup
from api.ws import WsLimits, websocket_endpoint
from api.ws_protocol import DirectWebSocketRoute
from ioc.loop import settle_heap
from ioc.metrics import ApiMetrics
from ioc.registry import Registry, load_registry
from ioc.settings import Settings
from streams.windows import TZ

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
POOL_RECONNECT_TIMEOUT_S: Final = 10.0
READY_TIMEOUT_S: Final = 2.0
DESCRIPTION: Final = """\
REST and WebSocket interface of Nghệ An's provincial smart operations centre (CONTRACT §7).

Every route but `/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <token>`
(`ioc token create`). A caller never sees data outside its role (`operator`, `admin`,
`security`, `commune`) and, for a commune, its own `commune:<code>` scope: a request naming a
scope outside its rights is answered 403, unnamed ones are filtered out. Errors are
`{"detail": "..."}`; unknown paths answer 404 with the same body.

The live feed is `WS /ws` (not listed here): see `docs/asyncapi.yaml` and `docs/api.md`.
"""
TAGS: Final = [
    {"name": "kpis", "description": "Current KPI snapshots and their history (CONTRACT §4–5)."},
    {
        "name": "alerts",
        "description": "Alerts, their audit trail, acknowledgement and resolution, and silences (CONTRACT §2, §7).",
    },
    {"name": "registries", "description": "Communes and environmental stations."},
    {"name": "reports", "description": "Monthly and quarterly reports as PDF, XLSX, CSV or JSON (docs/reports.md)."},
    {"name": "ingest", "description": "Events from systems that cannot speak Kafka; producer tokens only (CONTRACT §7)."},
    {"name": "operations", "description": "Liveness, readiness and Prometheus metrics; no token needed."},
]


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
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    #: Where alerts are read and operator actions recorded (None: no database, the routes answer 503).
    alerts: AlertStore | None = None
    #: Where operator actions are published for the worker (``ioc.alerts``).
    alert_publisher: AlertPublisher | None = None
    #: The time of an operator action (a parameter so tests can fix it).
    clock: Callable[[], dt.datetime] = field(default=lambda: dt.datetime.now(TZ))


class HttpMetrics:
    """Counts HTTP requests by route template (never the raw path: bounded labels) and status."""

    def __init__(self, app: ASGIApp, requests: PromCounter, routes: list[BaseRoute]) -> None:
        self.app = app
        self.requests = requests
        self.routes = routes

    def _route(self, scope: Scope, request: Scope) -> str:
        # FastAPI's router names its own routes in the scope; for mounts and the OpenAPI page,
        # match the request as it arrived (routing rewrites path and root_path on the way down)
        path = getattr(scope.get("route"), "path", None)
        if path:
            return str(path)
        for route in self.routes:
            if route.matches(request)[0] is Match.FULL:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        request = {k: scope[k] for k in ("type", "path", "root_path", "method") if k in scope}

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.requests.labels(self._route(scope, request), str(status)).inc()


class ValidationErrorResponse(JSONResponse):
    """A 422 body. It echoes the input, and a JSON body may carry unpaired surrogates (``"\\ud800"``), which
    UTF-8 cannot encode: then every non-ASCII character is escaped instead."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


async def _invalid_request(request: Request, exc: Exception) -> Response:
    errors = exc.errors() if isinstance(exc, RequestValidationError) else [{"msg": str(exc)}]
    return ValidationErrorResponse({"detail": jsonable_encoder(errors)}, status_code=422)


async def _database_unreachable(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unreachable (%s)", request.method, request.url.path, type(exc).__name__)
    return JSONResponse({"detail": "the database is unreachable"}, status_code=503)


async def _context(request: Request) -> ApiContext:  # a coroutine: no thread-pool hop (see current_principal)
    ctx: ApiContext = request.app.state.ioc
    return ctx


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
    metrics: ApiMetrics | None = None,
    alert_store: AlertStore | None = None,
    alert_publisher: AlertPublisher | None = None,
    clock: Callable[[], dt.datetime] | None = None,
) -> FastAPI:
    """A fresh API app; ``connect=False`` opens neither database nor broker (tests).

    ``metrics`` (a fresh registry by default) also counts for a given ``broadcaster`` that has none.
    ``alert_store`` and ``alert_publisher`` default to the database and the broker when connecting.
    """
    registry = registry or load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    metrics = metrics or (broadcaster.metrics if broadcaster is not None else None) or ApiMetrics()
    broadcaster = broadcaster or Broadcaster(metrics=metrics)
    if broadcaster.metrics is None:
        broadcaster.metrics = metrics
    station_communes = {s.station_id: s.commune_code for s in registry.stations.values()}
    live = LiveState(broadcaster, station_communes=station_communes)
    ctx = ApiContext(
        settings=settings,
        registry=registry,
        broadcaster=broadcaster,
        live=live,
        feed=Feed(settings, live, metrics=metrics),
        ws_limits=ws_limits or WsLimits(),
        metrics=metrics,
        alerts=alert_store,
        alert_publisher=alert_publisher,
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

    if clock is not None:
        ctx.clock = clock

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_publisher: KafkaAlertPublisher | None = None
        if connect:
            ctx.pool = AsyncConnectionPool(
                settings.database_url,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": 5},
                name="ioc-api",
                # A connection broken while idle (database restarted, network cut) is replaced at
                # checkout instead of failing a request.
                check=AsyncConnectionPool.check_connection,
                # The pool's reconnection backoff doubles up to this, then starts afresh: after an
                # outage the API is back within seconds, not after a minute of backoff.
                reconnect_timeout=POOL_RECONNECT_TIMEOUT_S,
            )
            await ctx.pool.open(wait=False)
            if ctx.alerts is None:
                ctx.alerts = PostgresAlertStore(ctx.pool)
            if ctx.alert_publisher is None:
                ctx.alert_publisher = own_publisher = KafkaAlertPublisher(settings)
            ctx.feed.start()
        log.info("API started (feed %s)", "on" if connect else "off")
        try:
            yield
        finally:
            await ctx.feed.stop()
            if own_publisher is not None:
                await own_publisher.close()
            if ctx.pool is not None:
                await ctx.pool.close()

    app = FastAPI(
        title="Nghệ An IOC API",
        summary="KPIs, history and the live feed of the provincial smart operations centre.",
        description=DESCRIPTION,
        version="1.0.0",
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.ioc = ctx
    app.add_exception_handler(RequestValidationError, _invalid_request)
    # Any route: the database unreachable or not answering is a 503 with a reason, never a 500.
    app.add_exception_handler(PoolTimeout, _database_unreachable)
    app.add_exception_handler(psycopg.OperationalError, _database_unreachable)
    app.add_middleware(HttpMetrics, requests=metrics.http_requests, routes=app.router.routes)

    @app.get(
        "/healthz", tags=["operations"], response_model=None, responses=schemas.ok(schemas.Health, {"status": "ok"})
    )
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    worker_group = WorkerGroup(settings)

    @app.get(
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

    @app.get(
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

    @app.get(
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

    @app.get(
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

    @app.get(
        "/api/units",
        tags=["registries"],
        response_model=None,
        responses={**schemas.ok(schemas.UnitList, schemas.UNITS_EXAMPLE), **schemas.errors(401)},
    )
    async def units(caller: Caller) -> dict[str, Any]:
        """The province's communes (xã, phường)."""
        return {"items": ctx.units_json, "count": len(ctx.units_json)}

    @app.get(
        "/api/stations",
        tags=["registries"],
        response_model=None,
        responses={**schemas.ok(schemas.StationList, schemas.STATIONS_EXAMPLE), **schemas.errors(401)},
    )
    async def stations(caller: Caller) -> dict[str, Any]:
        """Environmental stations, with flood alarm levels BĐ I–III for water gauges."""
        return {"items": ctx.stations_json, "count": len(ctx.stations_json)}

    app.include_router(alert_router(ctx))
    app.include_router(report_router(ctx))
    app.state.ingest = install_ingest(app, settings, registry, metrics.registry, connect=connect)

    @app.get("/wall", include_in_schema=False)
    async def wall() -> FileResponse:
        return FileResponse(STATIC_DIR / "wall.html", media_type="text/html", headers=WALL_HEADERS)

    # served by api.ws_protocol straight from the socket, without the middleware and router above it (see there)
    app.router.routes.append(DirectWebSocketRoute("/ws", websocket_endpoint))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def server_options(settings: Settings, limits: WsLimits) -> dict[str, Any]:
    """How ``ioc api`` runs under uvicorn: the keywords of ``uvicorn.run`` (and ``uvicorn.Config``, with which
    tests start the same server in-process)."""
    return {
        "host": settings.api_host,
        "port": settings.api_port,
        # uvicorn's websockets-sansio protocol without what it keeps per connection and never reads
        # again (handshake headers, an asyncio.Queue): ~6 KiB of ~36 per live-feed client
        "ws": "api.ws_protocol:LeanWebSocketProtocol",
        "ws_max_size": limits.max_frame_bytes,
        "ws_ping_interval": limits.ping_interval_s,
        "ws_ping_timeout": limits.ping_interval_s,
        # permessage-deflate keeps a compressor per connection (~80 KiB each, measured with
        # `ioc bench --only fanout`): at thousands of wall and user clients memory matters more.
        "ws_per_message_deflate": False,
        "log_config": None,
        "proxy_headers": True,
        "server_header": False,
    }


def serve(settings: Settings | None = None) -> None:
    """Run the API with uvicorn (``ioc api``); blocks until interrupted."""
    import uvicorn

    settings = settings or Settings()
    limits = WsLimits()
    app = create_app(settings, ws_limits=limits)
    settle_heap()  # modules and the app live as long as the process: out of the collector's full passes
    uvicorn.run(app, **server_options(settings, limits))
