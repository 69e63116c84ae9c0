"""The HTTP and WebSocket edge (CONTRACT §7): ``create_app`` builds it, ``serve`` runs it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import psycopg
from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter as PromCounter
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.alert_store import AlertPublisher, AlertStore, KafkaAlertPublisher, PostgresAlertStore
from api.broadcaster import Broadcaster
from api.context import ApiContext
from api.feed import Feed
from api.ingest import install as install_ingest
from api.live import LiveState
from api.routes import alerts, kpis, operations, registries, reports, wall
from api.routes.wall import STATIC_DIR
from api.ws.frames import WsLimits
from api.ws.handshake import websocket_endpoint
from ioc.compat.uvicorn import DirectWebSocketRoute
from ioc.loop import settle_heap
from ioc.metrics import ApiMetrics
from ioc.registry import Registry, load_registry
from ioc.settings import Settings

log = logging.getLogger(__name__)

POOL_RECONNECT_TIMEOUT_S: Final = 10.0
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


#: The rule for the middleware bypass: the direct WebSocket route (``/ws``, served by
#: ``ioc.compat.uvicorn`` straight from the socket in production, through the app under other servers and
#: the test client) skips all of the app's middleware, and this says why each needs none of it. A
#: middleware added to the app must be named here with its reason, or tests/unit/test_compat.py fails.
DIRECT_ROUTE_SKIPS: Final = {
    "ServerErrorMiddleware": "turns an exception into a 500 response; the endpoint closes with 1011 itself",
    "ExceptionTelemetryMiddleware": "FastAPI's telemetry of HTTP exceptions; /ws logs its own errors",
    "AppBodyLimitMiddleware": "limits HTTP request bodies; /ws limits frames (ws_max_size = WsLimits.max_frame_bytes)",
    "HttpMetrics": "counts HTTP requests only; /ws is counted by ioc_ws_clients and ioc_ws_messages_total",
    "ExceptionMiddleware": "the app's HTTP exception handlers; a WebSocket has no response for them to shape",
    "AsyncExitStackMiddleware": "closes request dependencies' exit stacks; the /ws endpoint takes no dependencies",
}
#: The paths served as direct WebSocket routes (nothing else skips the middleware).
DIRECT_ROUTES: Final = ("/ws",)


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

    app.include_router(operations.router(ctx, connect=connect))
    app.include_router(kpis.router(ctx))
    app.include_router(registries.router(ctx))
    app.include_router(alerts.router(ctx))
    app.include_router(reports.router(ctx))
    app.state.ingest = install_ingest(app, settings, registry, metrics.registry, connect=connect)

    app.include_router(wall.router())
    # served by ioc.compat.uvicorn straight from the socket, without the middleware and router above it (see there)
    app.router.routes.append(DirectWebSocketRoute(DIRECT_ROUTES[0], websocket_endpoint))
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
        "ws": "ioc.compat.uvicorn:LeanWebSocketProtocol",
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
