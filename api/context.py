"""What the routes and the WebSocket handler of one app share: `ApiContext`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from api.alert_store import AlertPublisher, AlertStore
from api.broadcaster import Broadcaster
from api.feed import Feed
from api.live import LiveState
from api.ws.frames import WsLimits
from ioc.contract import TZ
from ioc.metrics import ApiMetrics
from ioc.registry import Registry
from ioc.settings import Settings


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
