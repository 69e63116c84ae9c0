"""What a client of ``/ws`` may ask once authenticated: subscribe, unsubscribe, ping, pong, a fresh token.

Each answer (a snapshot, an error, ``pong``, ``auth_ok``) is offered to the connection's subscriber,
which sends it in order with the updates (:mod:`api.ws.connection`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import orjson

from api.auth import Principal, verify_token
from api.broadcaster import Subscriber, dumps
from api.live import channel_exists, item_filter
from api.ws.frames import auth_ok, error
from ioc.errors import AuthError

if TYPE_CHECKING:
    from api.context import ApiContext


class Client(Protocol):
    """What a command reads and changes of a connection (`api.ws.connection.Connection`)."""

    ctx: ApiContext
    sub: Subscriber
    principal: Principal


def handle(conn: Client, raw: str) -> None:
    """Answer one message of the client (JSON text); an unknown or malformed one gets an error frame."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        conn.sub.offer(error("bad_request", "messages are JSON objects"))
        return
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "subscribe":
        _subscribe(conn, msg)
    elif kind == "unsubscribe":
        channels = msg.get("channels")
        if not isinstance(channels, list):
            conn.sub.offer(error("bad_request", "unsubscribe needs channels (a list)"))
            return
        for channel in channels:
            if isinstance(channel, str):
                conn.ctx.broadcaster.unsubscribe(conn.sub, channel)
    elif kind == "ping":
        conn.sub.offer(dumps({"type": "pong"}))
    elif kind == "pong":
        pass
    elif kind == "auth":
        _reauthenticate(conn, msg.get("token"))
    else:
        conn.sub.offer(error("bad_request", f"unknown message type {kind!r}"))


def _reauthenticate(conn: Client, token: Any) -> None:
    """A fresh token on an open connection, to outlive the first one; same rights only."""
    try:
        fresh = verify_token(conn.ctx.settings, token if isinstance(token, str) else None)
    except AuthError as exc:
        conn.ctx.metrics.ws_refused.labels("auth").inc()
        conn.sub.offer(error("unauthorized", str(exc)))
        return
    if (fresh.role, fresh.commune) != (conn.principal.role, conn.principal.commune):
        conn.ctx.metrics.ws_refused.labels("forbidden").inc()
        conn.sub.offer(error("forbidden", "a new token must carry the same role and commune"))
        return
    conn.principal = fresh
    conn.sub.offer(auth_ok(fresh))


def _subscribe(conn: Client, msg: dict[str, Any]) -> None:
    channels, resume = msg.get("channels"), msg.get("resume") or {}
    if not isinstance(channels, list) or not isinstance(resume, dict):
        conn.sub.offer(
            error(
                "bad_request",
                "subscribe needs channels (a list) and optional resume (an object)",
            )
        )
        return
    names = dict.fromkeys(c for c in channels if isinstance(c, str))  # other items are answered below
    new = [c for c in names if c not in conn.sub.filters]
    if len(conn.sub.filters) + len(new) > conn.ctx.ws_limits.max_channels:
        conn.sub.offer(
            error(
                "too_many_channels",
                f"at most {conn.ctx.ws_limits.max_channels} channels per connection",
            )
        )
        return
    registry, live = conn.ctx.registry, conn.ctx.live
    for channel in channels:
        if not isinstance(channel, str):
            conn.sub.offer(error("bad_request", "channel names are strings"))
            continue
        if not conn.principal.can_subscribe(channel):
            conn.ctx.metrics.ws_refused.labels("forbidden").inc()
            conn.sub.offer(error("forbidden", "outside your rights", channel=channel))
            continue
        if not channel_exists(channel, registry.units, registry.stations):
            conn.sub.offer(error("unknown_channel", "no such channel", channel=channel))
            continue
        position = resume.get(channel)
        conn.ctx.broadcaster.subscribe(
            conn.sub,
            channel,
            live.snapshot_items(channel, conn.principal),
            accept=item_filter(channel, conn.principal, live.station_communes),
            resume_from=position if isinstance(position, int) and not isinstance(position, bool) else None,
        )
