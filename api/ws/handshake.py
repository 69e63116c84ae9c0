"""The ``/ws`` handshake: the Origin check, the token (subprotocol or first message), authentication.

Then the connection is handed to :class:`api.ws.connection.Connection` for the rest of its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from api.auth import Principal, verify_token
from api.ws.connection import Connection, send_counted
from api.ws.frames import CLOSE_ORIGIN, CLOSE_UNAUTHORIZED, SUBPROTOCOL, WsLimits, auth_ok, error
from ioc.errors import AuthError

if TYPE_CHECKING:
    from api.context import ApiContext

log = logging.getLogger(__name__)


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
