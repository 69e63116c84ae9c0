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
import functools
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from prometheus_client import Counter as PromCounter
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from api.auth import Principal, verify_token
from api.broadcaster import CLOSE_TOO_SLOW, Subscriber, dumps, frame_type
from api.live import channel_exists, item_filter
from ioc.compat.starlette import Resume, send_text_now
from ioc.compat.uvicorn import lean_socket
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
#: How long a connection ending for a reason it explains (rate, frame size, expired token) waits
#: for that error frame to go out before closing.
FLUSH_BEFORE_CLOSE_S: Final = 0.1
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

    __slots__ = ("at", "burst", "clock", "rate", "tokens")

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
    message_tally(metrics.ws_messages).add(frame_type(text))


class MessageTally:
    """``ioc_ws_messages_total`` counted in bulk: a fan-out of one update to 10,000 clients adds
    10,000 to a plain dict and increments the Prometheus counter once per type, on the next loop turn
    (``labels().inc()`` per frame per client is a measurable share of a fan-out)."""

    __slots__ = ("family", "pending")

    def __init__(self, family: PromCounter) -> None:
        self.family = family
        self.pending: dict[str, int] = {}

    def add(self, kind: str) -> None:
        pending = self.pending
        if kind in pending:
            pending[kind] += 1
            return
        if not pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no event loop running (never so in the server): count at once
                self.family.labels(kind).inc()
                return
        pending[kind] = 1

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for kind, n in pending.items():
            self.family.labels(kind).inc(n)


@functools.lru_cache(maxsize=64)
def message_tally(family: PromCounter) -> MessageTally:
    """The tally of one app's ``ioc_ws_messages_total`` (one per metrics registry)."""
    return MessageTally(family)


class Connection:
    """One authenticated client: its subscriber, the loop that reads its messages, and its sends.

    Whoever produces a frame (the broadcaster, the shared heartbeat, this connection's answers)
    writes it through :meth:`_write`, which sends it at once when the socket takes it (nearly
    always: the same ``str`` for every client, no task switch). Only when a send cannot finish (the
    client is not reading) does a flush task exist: it finishes that send, then the frames the
    subscriber queued and coalesced meanwhile, and ends when the client has caught up. So a
    connection costs no task of its own beyond the one the server runs the endpoint in.
    """

    __slots__ = (
        "_ending",
        "_flushing",
        "_socket",
        "_tally",
        "_task",
        "close_code",
        "close_reason",
        "ctx",
        "principal",
        "rate",
        "sub",
        "ws",
    )

    def __init__(self, ctx: ApiContext, ws: WebSocket, principal: Principal) -> None:
        self.ctx = ctx
        self.ws = ws
        #: The server's connection when it writes frames by a plain call (our uvicorn protocol), else None.
        self._socket = lean_socket(ws)
        #: The counter of frames sent, looked up once per connection rather than per frame.
        self._tally = message_tally(ctx.metrics.ws_messages)
        self.principal = principal
        limits: WsLimits = ctx.ws_limits
        self.rate = RateLimit(limits.rate_per_s, limits.burst)
        self.close_code = 1000
        self.close_reason = ""
        self._task: asyncio.Task[Any] | None = None
        self._flushing: asyncio.Task[None] | None = None
        #: Set once the connection is ending: nothing more is written, the receive loop stops.
        self._ending = False
        self.sub: Subscriber = ctx.broadcaster.connect()
        self.sub.sink = self._write
        self.sub.on_close = self._too_slow
        self.sub.on_ping = self._before_ping

    async def run(self) -> None:
        task = self._task = asyncio.current_task()
        broadcaster = self.ctx.broadcaster
        broadcaster.start_heartbeat(self.ctx.ws_limits.ping_interval_s)
        clients = self.ctx.metrics.ws_clients.labels(self.principal.role)
        clients.inc()
        try:
            await self._receive_loop()
        except asyncio.CancelledError:
            # ``_stop`` cancels the wait for the client's next message; anything else is the server's
            if not self._ending or task is None or task.uncancel() > 0:
                raise
        finally:
            clients.dec()
            self._ending = True
            flushing = self._flushing
            if flushing is not None:
                flushing.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await flushing
            broadcaster.disconnect(self.sub)
            self.sub.sink = self.sub.on_close = self.sub.on_ping = None  # no cycle keeps the connection alive
            await self._close(self.close_code, self.close_reason)

    def _end(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason

    def _stop(self) -> None:
        """End the connection from outside the receive loop, which is waiting for the client."""
        if self._ending:
            return
        self._ending = True
        task = self._task
        # the loop itself notices ``_ending``; a task cannot take back a cancellation of itself (3.11)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED and self.ws.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code, reason), CLOSE_TIMEOUT_S)

    # -- sending --------------------------------------------------------------------------------

    def _count(self, text: str) -> None:
        self._tally.add(frame_type(text))

    def _write(self, text: str) -> bool:
        """The subscriber's sink: send ``text`` now; False while an earlier send is still going."""
        if self._flushing is not None:
            return False
        if self._ending:
            return True  # dropped: the connection is closing
        socket = self._socket
        if socket is not None and socket.write_text(text):
            self._count(text)
            return True
        try:
            rest = send_text_now(self.ws, text)
        except Exception:  # the client is gone
            self._stop()
            return True
        if rest is None:
            self._count(text)
            return True
        self._flushing = asyncio.get_running_loop().create_task(self._flush(rest, text))
        return True

    async def _flush(self, started: Resume | None = None, text: str = "") -> None:
        """Finish a send that could not complete at once, then what was queued meanwhile, until caught up."""
        sub = self.sub
        try:
            if started is not None:
                await started
                self._count(text)
            while sub.closed is None:
                frames = sub.drain()
                if not frames:
                    return
                for frame in frames:
                    await self.ws.send_text(frame)
                    self._count(frame)
            # the broadcaster gave up on this client: tell it why, then end
            await send_counted(self.ws, self.ctx.metrics, error("too_slow", sub.closed))
            self._stop()
        except Exception:
            self._stop()
        finally:
            self._flushing = None

    def _too_slow(self, reason: str) -> None:
        """The broadcaster gave up on this client: say so after what is being sent, and end."""
        self._end(CLOSE_TOO_SLOW, "too slow")
        loop = asyncio.get_running_loop()
        # a client that stopped reading never lets the error out: cut it after a grace period anyway
        loop.call_later(SLOW_GRACE_S, self._cut, reason)
        if self._flushing is None and not self._ending:
            self._flushing = loop.create_task(self._flush())

    def _cut(self, reason: str) -> None:
        if not self._ending:
            log.info("websocket cut while stuck sending: %s", reason)
            self._stop()

    def _before_ping(self, now: dt.datetime) -> bool:
        """Asked by the heartbeat before each ping: an expired token ends the connection instead."""
        if self._ending:
            return False
        expires = self.principal.expires_at
        if expires is None or expires > now:
            return True
        self.sub.offer(error("token_expired", "the token has expired; authenticate again"))
        self._end(CLOSE_UNAUTHORIZED, "token expired")
        asyncio.get_running_loop().call_later(FLUSH_BEFORE_CLOSE_S, self._stop)  # let the error go out first
        return False

    async def _settle(self) -> None:
        """Give a frame just queued (the error that explains a close) a moment to go out."""
        flushing = self._flushing
        if flushing is not None:
            await asyncio.wait({flushing}, timeout=FLUSH_BEFORE_CLOSE_S)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        # the message is handled in a frame of its own: the last one is not held while waiting for the next
        while not self._ending and await self._take(await self.ws.receive()):
            pass

    async def _take(self, message: Message) -> bool:
        """Handle one message from the client; False when the connection is to end."""
        if message["type"] == "websocket.disconnect":
            return False
        limits, metrics = self.ctx.ws_limits, self.ctx.metrics
        raw, data = message.get("text"), message.get("bytes")
        # the size as sent: decoding a binary frame with replacement can triple it
        size = len(data) if raw is None and data is not None else len((raw or "").encode())
        if raw is None:
            raw = (data or b"").decode("utf-8", "replace")
        if size > limits.max_frame_bytes:
            metrics.ws_refused.labels("frame").inc()
            self.sub.offer(error("too_large", f"frames are limited to {limits.max_frame_bytes} bytes"))
            await self._settle()
            self._end(CLOSE_TOO_BIG, "frame too large")
            return False
        if not self.rate.allow():
            metrics.ws_refused.labels("rate").inc()
            self.sub.offer(error("rate_limited", f"at most {limits.rate_per_s:g} messages per second"))
            await self._settle()
            self._end(CLOSE_POLICY, "message rate exceeded")
            return False
        try:
            self._handle(raw)
        except Exception:  # a bug, not the client's fault: say so, rather than a silent normal close
            log.exception("websocket message could not be handled")
            self._end(CLOSE_INTERNAL, "internal error")
            return False
        return True

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
            self.ctx.metrics.ws_refused.labels("auth").inc()
            self.sub.offer(error("unauthorized", str(exc)))
            return
        if (fresh.role, fresh.commune) != (self.principal.role, self.principal.commune):
            self.ctx.metrics.ws_refused.labels("forbidden").inc()
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
        if len(self.sub.filters) + len(new) > self.ctx.ws_limits.max_channels:
            self.sub.offer(
                error(
                    "too_many_channels",
                    f"at most {self.ctx.ws_limits.max_channels} channels per connection",
                )
            )
            return
        registry, live = self.ctx.registry, self.ctx.live
        for channel in channels:
            if not isinstance(channel, str):
                self.sub.offer(error("bad_request", "channel names are strings"))
                continue
            if not self.principal.can_subscribe(channel):
                self.ctx.metrics.ws_refused.labels("forbidden").inc()
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


def forget_handshake(ws: WebSocket) -> None:
    """Drop the request headers and offered subprotocols (the token) once authentication is done:
    nothing reads them later, and the scope lives as long as the connection (~1.7 KiB each)."""
    scope = ws.scope
    for key in ("headers", "subprotocols"):
        held = scope.get(key)
        if isinstance(held, list):
            held.clear()  # in place: a Headers object the WebSocket cached refers to the same list


async def websocket_endpoint(ws: WebSocket) -> None:
    """``WS /ws``: check the Origin, authenticate, then serve subscriptions until the end."""
    ctx: ApiContext = ws.app.state.ioc
    principal = await _open(ctx, ws)
    if principal is not None:
        # in a frame of its own: what authentication used (the token) is not held for the connection's life
        await Connection(ctx, ws, principal).run()


async def _open(ctx: ApiContext, ws: WebSocket) -> Principal | None:
    """Refuse a foreign Origin, accept, authenticate; the principal, or None once refused and closed."""
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), ctx.settings.allowed_origins):
        log.info("websocket refused: origin not allowed")
        ctx.metrics.ws_refused.labels("origin").inc()
        await ws.close(CLOSE_ORIGIN)
        return None
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
        return None
    forget_handshake(ws)
    await send_counted(ws, ctx.metrics, auth_ok(principal))
    log.debug("websocket open: %s (%s)", principal.subject, principal.role)
    return principal


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
