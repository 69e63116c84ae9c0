"""One authenticated ``/ws`` client: its receive loop and limits, and where its frames leave (``Connection._write``).

A frame is written at once when the socket takes it (through ``ioc.compat.uvicorn``'s plain-call
write, else Starlette's ``send_text`` driven by hand, ``ioc.compat.starlette``); only a client that
is not reading gets a flush task. Messages from the client are answered by :mod:`api.ws.commands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter as PromCounter
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketState

from api.auth import Principal
from api.broadcaster import CLOSE_TOO_SLOW, Subscriber, frame_type
from api.ws import commands
from api.ws.frames import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TIMEOUT_S,
    CLOSE_TOO_BIG,
    CLOSE_UNAUTHORIZED,
    FLUSH_BEFORE_CLOSE_S,
    SLOW_GRACE_S,
    WsLimits,
    error,
)
from ioc.compat.starlette import Resume, send_text_now
from ioc.compat.uvicorn import lean_socket
from ioc.metrics import ApiMetrics

if TYPE_CHECKING:
    from api.context import ApiContext

log = logging.getLogger(__name__)


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
            commands.handle(self, raw)
        except Exception:  # a bug, not the client's fault: say so, rather than a silent normal close
            log.exception("websocket message could not be handled")
            self._end(CLOSE_INTERNAL, "internal error")
            return False
        return True
