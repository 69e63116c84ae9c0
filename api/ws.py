"""The ``/ws`` live feed (CONTRACT §7): authentication, subscriptions, limits, pings.

Close codes: 4401 authentication failed or token expired, 4403 Origin not allowed (refused
before the handshake completes, i.e. HTTP 403), 4008 too slow (see ``api.broadcaster``),
1008 message rate exceeded, 1009 frame too large, 1011 a message the server failed to handle (a
bug, logged). Errors that do not end the connection are ``{"type": "error", "code": ...,
"message": ...}`` frames (codes ``forbidden``, ``unknown_channel``, ``bad_request``,
``too_many_channels``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.auth import Principal, verify_token
from api.broadcaster import CLOSE_TOO_SLOW, Subscriber, dumps, frame_type
from api.live import channel_exists, item_filter
from ioc.errors import AuthError
from ioc.metrics import ApiMetrics

if TYPE_CHECKING:
    from api.app import ApiContext

log = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_ORIGIN: Final = 4403
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
SUBPROTOCOL: Final = "bearer"
#: How long a closed-for-slowness client's sender may take to flush the ``too_slow`` error
#: before the connection is cut anyway (a client that stopped reading never lets it finish).
SLOW_GRACE_S: Final = 1.0
#: Longest wait for a close frame to go out to a client that may not be reading.
CLOSE_TIMEOUT_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class WsLimits:
    """Per-connection limits of the live feed."""

    max_frame_bytes: int = 64 * 1024
    #: Client messages per second allowed on average, and the burst above it.
    rate_per_s: float = 10.0
    burst: int = 40
    max_channels: int = 500
    auth_timeout_s: float = 10.0
    ping_interval_s: float = 20.0


class RateLimit:
    """A token bucket: ``burst`` messages at once, refilled at ``rate_per_s``."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.at = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def origin_allowed(origin: str | None, host: str | None, allowed: Collection[str]) -> bool:
    """No Origin (not a browser), the API's own origin, or one of the configured ones."""
    if not origin:
        return True
    origin = origin.rstrip("/")
    if origin in {o.rstrip("/") for o in allowed}:
        return True
    return bool(host) and origin in (f"http://{host}", f"https://{host}")


def bearer_subprotocol(offered: list[str]) -> str | None:
    """The token of a ``bearer, <token>`` subprotocol pair, or None when not offered."""
    if SUBPROTOCOL not in offered:
        return None
    others = [p for p in offered if p != SUBPROTOCOL]
    return others[0] if others else ""


def error(code: str, message: str, **extra: Any) -> str:
    return dumps({"type": "error", "code": code, "message": message, **extra})


def auth_ok(principal: Principal) -> str:
    return dumps(
        {
            "type": "auth_ok",
            "sub": principal.subject,
            "role": principal.role,
            "commune": principal.commune,
            "expires_at": principal.expires_at.isoformat() if principal.expires_at else None,
        }
    )


async def send_counted(ws: WebSocket, metrics: ApiMetrics, text: str) -> None:
    """Send one frame straight to the socket (before a Connection exists), counting it by type."""
    await ws.send_text(text)
    metrics.ws_messages.labels(frame_type(text)).inc()


class Connection:
    """One authenticated client: its subscriber queue, and the loops that read, write and ping."""

    def __init__(self, ctx: ApiContext, ws: WebSocket, principal: Principal) -> None:
        self.ctx = ctx
        self.ws = ws
        self.principal = principal
        self.metrics: ApiMetrics = ctx.metrics
        self.limits: WsLimits = ctx.ws_limits
        self.sub: Subscriber = ctx.broadcaster.connect()
        self.rate = RateLimit(self.limits.rate_per_s, self.limits.burst)
        self.close_code = 1000
        self.close_reason = ""

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._send_loop(), name="ws-send"),
            asyncio.create_task(self._receive_loop(), name="ws-receive"),
            asyncio.create_task(self._ping_loop(), name="ws-ping"),
            asyncio.create_task(self._watch_slow(), name="ws-slow"),
        ]
        clients = self.metrics.ws_clients.labels(self.principal.role)
        clients.inc()
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            clients.dec()
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self.ctx.broadcaster.disconnect(self.sub)
            await self._close(self.close_code, self.close_reason)

    def _end(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED and self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code, reason), CLOSE_TIMEOUT_S)

    async def _watch_slow(self) -> None:
        """End the connection once the broadcaster gave up on it, even if a send is stuck."""
        reason = await self.sub.wait_closed()
        await asyncio.sleep(SLOW_GRACE_S)  # normally the send loop ends first, after telling the client
        self._end(CLOSE_TOO_SLOW, "too slow")
        log.info("websocket cut while stuck sending: %s", reason)

    async def _send_loop(self) -> None:
        messages = self.metrics.ws_messages
        while True:
            frames = await self.sub.next_frames()
            if not frames:
                self._end(CLOSE_TOO_SLOW, "too slow")
                with contextlib.suppress(Exception):
                    await send_counted(self.ws, self.metrics, error("too_slow", self.sub.closed or "too slow"))
                return
            sent: Counter[str] = Counter()
            try:
                for frame in frames:
                    await self.ws.send_text(frame)
                    sent[frame_type(frame)] += 1
            finally:
                for kind, n in sent.items():
                    messages.labels(kind).inc(n)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.ping_interval_s)
            expires = self.principal.expires_at
            if expires is not None and expires <= dt.datetime.now(dt.UTC):
                self.sub.offer(error("token_expired", "the token has expired; authenticate again"))
                await asyncio.sleep(0.1)  # let the sender flush the error first
                self._end(CLOSE_UNAUTHORIZED, "token expired")
                return
            self.sub.offer(dumps({"type": "ping", "ts": dt.datetime.now(dt.UTC).isoformat()}))

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw, data = message.get("text"), message.get("bytes")
            # the size as sent: decoding a binary frame with replacement can triple it
            size = len(data) if raw is None and data is not None else len((raw or "").encode())
            if raw is None:
                raw = (data or b"").decode("utf-8", "replace")
            if size > self.limits.max_frame_bytes:
                self.metrics.ws_refused.labels("frame").inc()
                self.sub.offer(error("too_large", f"frames are limited to {self.limits.max_frame_bytes} bytes"))
                await asyncio.sleep(0.1)
                self._end(CLOSE_TOO_BIG, "frame too large")
                return
            if not self.rate.allow():
                self.metrics.ws_refused.labels("rate").inc()
                self.sub.offer(error("rate_limited", f"at most {self.limits.rate_per_s:g} messages per second"))
                await asyncio.sleep(0.1)
                self._end(CLOSE_POLICY, "message rate exceeded")
                return
            try:
                self._handle(raw)
            except Exception:  # a bug, not the client's fault: say so, rather than a silent normal close
                log.exception("websocket message could not be handled")
                self._end(CLOSE_INTERNAL, "internal error")
                return

    def _handle(self, raw: str) -> None:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.sub.offer(error("bad_request", "messages are JSON objects"))
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "subscribe":
            self._subscribe(msg)
        elif kind == "unsubscribe":
            channels = msg.get("channels")
            if not isinstance(channels, list):
                self.sub.offer(error("bad_request", "unsubscribe needs channels (a list)"))
                return
            for channel in channels:
                if isinstance(channel, str):
                    self.ctx.broadcaster.unsubscribe(self.sub, channel)
        elif kind == "ping":
            self.sub.offer(dumps({"type": "pong"}))
        elif kind == "pong":
            pass
        elif kind == "auth":
            self._reauthenticate(msg.get("token"))
        else:
            self.sub.offer(error("bad_request", f"unknown message type {kind!r}"))

    def _reauthenticate(self, token: Any) -> None:
        """A fresh token on an open connection, to outlive the first one; same rights only."""
        try:
            fresh = verify_token(self.ctx.settings, token if isinstance(token, str) else None)
        except AuthError as exc:
            self.metrics.ws_refused.labels("auth").inc()
            self.sub.offer(error("unauthorized", str(exc)))
            return
        if (fresh.role, fresh.commune) != (self.principal.role, self.principal.commune):
            self.metrics.ws_refused.labels("forbidden").inc()
            self.sub.offer(error("forbidden", "a new token must carry the same role and commune"))
            return
        self.principal = fresh
        self.sub.offer(auth_ok(fresh))

    def _subscribe(self, msg: dict[str, Any]) -> None:
        channels, resume = msg.get("channels"), msg.get("resume") or {}
        if not isinstance(channels, list) or not isinstance(resume, dict):
            self.sub.offer(
                error(
                    "bad_request",
                    "subscribe needs channels (a list) and optional resume (an object)",
                )
            )
            return
        names = dict.fromkeys(c for c in channels if isinstance(c, str))  # other items are answered below
        new = [c for c in names if c not in self.sub.filters]
        if len(self.sub.filters) + len(new) > self.limits.max_channels:
            self.sub.offer(
                error(
                    "too_many_channels",
                    f"at most {self.limits.max_channels} channels per connection",
                )
            )
            return
        registry, live = self.ctx.registry, self.ctx.live
        for channel in channels:
            if not isinstance(channel, str):
                self.sub.offer(error("bad_request", "channel names are strings"))
                continue
            if not self.principal.can_subscribe(channel):
                self.metrics.ws_refused.labels("forbidden").inc()
                self.sub.offer(error("forbidden", "outside your rights", channel=channel))
                continue
            if not channel_exists(channel, registry.units, registry.stations):
                self.sub.offer(error("unknown_channel", "no such channel", channel=channel))
                continue
            position = resume.get(channel)
            self.ctx.broadcaster.subscribe(
                self.sub,
                channel,
                live.snapshot_items(channel, self.principal),
                accept=item_filter(channel, self.principal, live.station_communes),
                resume_from=position if isinstance(position, int) and not isinstance(position, bool) else None,
            )


async def websocket_endpoint(ws: WebSocket) -> None:
    """``WS /ws``: check the Origin, authenticate, then serve subscriptions until the end."""
    ctx: ApiContext = ws.app.state.ioc
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), ctx.settings.allowed_origins):
        log.info("websocket refused: origin not allowed")
        ctx.metrics.ws_refused.labels("origin").inc()
        await ws.close(CLOSE_ORIGIN)
        return
    token = bearer_subprotocol(list(ws.scope.get("subprotocols") or ()))
    if token is not None:
        await ws.accept(subprotocol=SUBPROTOCOL)
    else:
        await ws.accept()
        token = await _first_message_token(ws, ctx.ws_limits)
    try:
        principal = verify_token(ctx.settings, token)
    except AuthError as exc:
        ctx.metrics.ws_refused.labels("auth").inc()
        with contextlib.suppress(Exception):
            await send_counted(ws, ctx.metrics, error("unauthorized", str(exc)))
            await ws.close(CLOSE_UNAUTHORIZED, "unauthorized")
        return
    await send_counted(ws, ctx.metrics, auth_ok(principal))
    log.debug("websocket open: %s (%s)", principal.subject, principal.role)
    await Connection(ctx, ws, principal).run()


async def _first_message_token(ws: WebSocket, limits: WsLimits) -> str | None:
    try:
        message = await asyncio.wait_for(ws.receive(), limits.auth_timeout_s)
    except (TimeoutError, WebSocketDisconnect):
        return None
    raw = message.get("text") or ""
    if not raw or len(raw) > limits.max_frame_bytes:
        return None
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(msg, dict) and msg.get("type") == "auth" and isinstance(msg.get("token"), str):
        token: str = msg["token"]
        return token
    return None
