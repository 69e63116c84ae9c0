"""Fuzzing the ``/ws`` protocol on a real socket: whatever a client sends, the server answers with an error
frame or closes with a code the contract names, never leaks a channel or an item, and keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.alert_store import MemoryAlertStore
from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster
from api.live import LiveState
from api.ws.frames import WsLimits
from ioc.settings import Settings
from tests.api_world import Viewer, World, apply_to_memory, build_world, snapshot, viewer
from tests.live_server import LiveServer, offline_settings

pytestmark = pytest.mark.integration

LIMITS = WsLimits()
EXAMPLES = 400
#: Close codes the contract gives for what a fuzzed client can provoke: rate (1008), size (1009), auth (4401);
#: 1007 is RFC 6455's answer to a text frame that is not UTF-8 (the protocol layer's, before the app sees it).
CLOSE_OVERSIZE, CLOSE_BAD_UTF8, CLOSE_POLICY, CLOSE_UNAUTHORIZED = 1009, 1007, 1008, 4401
ERROR_CODES = {"bad_request", "forbidden", "unknown_channel", "too_many_channels", "unauthorized", "too_large",
               "rate_limited"}  # fmt: skip


@dataclass
class Live:
    server: LiveServer
    settings: Settings
    world: World
    tokens: dict[tuple[str, str | None], str] = field(default_factory=dict)

    def token(self, role: str, commune: str | None) -> str:
        key = (role, commune)
        if key not in self.tokens:
            self.tokens[key] = create_token(self.settings, role, commune)
        return self.tokens[key]


async def churn(live: LiveState, world: World, stop: threading.Event) -> None:
    """Keep updates and alert events flowing on every kind of channel while clients fuzz."""
    rng = random.Random(7)
    seq = 10_000_000
    while not stop.is_set():
        s = rng.choice(world.snapshots)
        seq += 1
        live.apply_snapshot(snapshot(s.kpi, s.scope, s.window, rng.uniform(0, 100), seq, world.now))
        events = rng.choice(world.alert_events)
        live.apply_alert({**msgspec.to_builtins(rng.choice(events)), "repeat": seq})
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    world = build_world(seed=11)
    settings = offline_settings()
    store = MemoryAlertStore()
    app = create_app(
        settings, connect=False, broadcaster=Broadcaster(seq_origin=0), alert_store=store, ws_limits=LIMITS
    )
    apply_to_memory(world, app.state.ioc.live, store)
    stop = threading.Event()
    with LiveServer(app, settings, LIMITS) as server:
        running = asyncio.run_coroutine_threadsafe(churn(server.ctx.live, world, stop), server.loop)
        try:
            yield Live(server, settings, world)
        finally:
            stop.set()
            running.result(10)


# --- what a client may send ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def channels(world: World) -> st.SearchStrategy[Any]:
    communes = sorted(world.registry.units)
    stations = sorted(world.registry.stations)
    one = st.one_of(
        st.sampled_from(["alerts", "kpi:province", "kpi:", "kpi:commune:", "KPI:province", "kpi:province ",
                         "alerts\x00", "kpi:agency:" + "a" * 65, "kpi:station:../../etc/passwd", "kpi:agency:A.1"]),
        st.sampled_from(communes).map(lambda c: f"kpi:commune:{c}"),
        st.sampled_from(stations).map(lambda s: f"kpi:station:{s}"),
        st.sampled_from(communes).map(lambda c: f"kpi:commune:{c}:x"),
        st.text(max_size=24),
    )  # fmt: skip
    huge = st.integers(450, 1200).map(lambda n: [f"kpi:agency:F{i}" for i in range(n)])
    return st.one_of(st.lists(one, max_size=8), st.lists(st.one_of(one, json_values), max_size=6), huge, json_values)


def messages(world: World, tokens: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    chans = channels(world)
    resume = st.one_of(
        st.dictionaries(st.sampled_from(["alerts", "kpi:province", "kpi:commune:16681"]),
                        st.one_of(st.integers(-5, 3000), st.integers(), st.booleans(), json_values), max_size=3),
        json_values,
    )  # fmt: skip
    junk = st.dictionaries(st.text(max_size=6), json_values, max_size=3)
    return st.one_of(
        st.builds(lambda c, r, j: {**j, "type": "subscribe", "channels": c, **r}, chans,
                  st.one_of(st.just({}), resume.map(lambda v: {"resume": v})), junk),
        st.builds(lambda c, j: {**j, "type": "unsubscribe", "channels": c}, chans, junk),
        st.builds(lambda j: {**j, "type": "ping"}, junk),
        st.builds(lambda j: {**j, "type": "pong"}, junk),
        st.builds(lambda i: {"type": "ack", "id": i}, json_values),
        st.builds(lambda t: {"type": "auth", "token": t}, tokens),
        st.builds(lambda t, j: {**j, "type": t}, st.one_of(st.text(max_size=10), json_values), junk),
        junk,
        json_values,
    )  # fmt: skip


def invalid_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


class Frame:
    """One WebSocket frame to send: ``kind`` is "text", "binary" or "bad-utf8" (a text frame that is not UTF-8)."""

    __slots__ = ("data", "kind")

    def __init__(self, kind: str, data: str | bytes) -> None:
        self.kind = kind
        self.data = data

    def __repr__(self) -> str:  # a failing example stays readable (and cheap) with 64 KiB frames in it
        text = repr(self.data)
        return f"Frame({self.kind}, {len(self.data)} long: {text[:120]}{'...' if len(text) > 120 else ''})"

    @property
    def terminal(self) -> bool:
        return self.oversized or self.kind == "bad-utf8"

    @property
    def oversized(self) -> bool:
        size = len(self.data.encode("utf-8", "surrogatepass") if isinstance(self.data, str) else self.data)
        return size > LIMITS.max_frame_bytes


def frames(world: World, tokens: st.SearchStrategy[Any]) -> st.SearchStrategy[Frame]:
    msgs = messages(world, tokens)
    return st.one_of(
        msgs.map(lambda m: Frame("text", json.dumps(m))),
        msgs.map(lambda m: Frame("text", json.dumps(m))),
        msgs.map(lambda m: Frame("binary", json.dumps(m).encode())),
        st.text(max_size=80).map(lambda t: Frame("text", t)),
        st.binary(max_size=80).map(lambda b: Frame("binary", b)),
        st.binary(min_size=1, max_size=40).filter(invalid_utf8).map(lambda b: Frame("bad-utf8", b)),
        st.integers(1, 30_000).map(lambda d: Frame("text", "[" * d + "]" * d)),
        st.integers(1, 6_000).map(lambda d: Frame("text", '{"type":' * d + "1" + "}" * d)),
        st.integers(0, 3).map(lambda n: Frame("text", json.dumps({"type": "ping", "pad": "x" * (LIMITS.max_frame_bytes - 40 + n * 20)}))),
        st.integers(1, 1000).map(lambda n: Frame("text", "x" * (LIMITS.max_frame_bytes + n))),
        st.integers(1, 1000).map(lambda n: Frame("binary", b"x" * (LIMITS.max_frame_bytes + n))),
        # within the limit as sent, but three times as long once its bytes are read as (replaced) UTF-8
        st.integers(LIMITS.max_frame_bytes // 3, LIMITS.max_frame_bytes).map(lambda n: Frame("binary", b"\xff" * n)),
    )  # fmt: skip


# --- the client side and its checks ----------------------------------------------------------------------


@dataclass
class Observed:
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    timed_out: bool = False
    leaks: list[str] = field(default_factory=list)


def check(who: Viewer, message: dict[str, Any], seen: Observed) -> None:
    """Record anything ``who`` should not have received."""
    kind, channel = message.get("type"), message.get("channel")
    if kind in ("snapshot", "update", "alert", "resumed"):
        if not isinstance(channel, str) or not who.may_subscribe(channel):
            seen.leaks.append(f"{kind} on channel {channel!r}")
            return
        items = message.get("items", []) if kind == "snapshot" else [message["item"]] if "item" in message else []
        for item in items:
            if channel == "alerts":
                if not who.sees_alert(item):
                    seen.leaks.append(f"alert {item.get('alert_id')} of {item.get('scope')}")
            elif not who.sees_kpi(item["kpi"], item["scope"]) or f"kpi:{item['scope']}" != channel:
                seen.leaks.append(f"{item['kpi']} at {item['scope']} on {channel}")
    elif kind == "error" and message.get("code") not in ERROR_CODES:
        seen.leaks.append(f"unexpected error code {message.get('code')!r}")


def receive_until(ws: ClientConnection, who: Viewer, seen: Observed, kind: str, timeout: float = 10.0) -> bool:
    """Read (and check) frames until one of ``kind``; False when the connection closed first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            raw = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as closed:
            seen.close_code = closed.rcvd.code if closed.rcvd else None
            return False
        except TimeoutError:
            seen.timed_out = True
            return False
        message = json.loads(raw)
        seen.frames.append(message)
        check(who, message, seen)
        if message.get("type") == kind:
            return True


def send(ws: ClientConnection, frame: Frame) -> None:
    if frame.kind == "bad-utf8":
        ws.send(frame.data, text=True)
    else:
        ws.send(frame.data)


def open_socket(url: str, protocols: list[str] | None = None) -> ClientConnection:
    return connect(url, subprotocols=protocols, compression=None, proxy=None, open_timeout=10, close_timeout=2,  # type: ignore[arg-type]
                   max_size=8 * 1024 * 1024)  # fmt: skip


def allowed_closes(sent: list[Frame]) -> set[int | None]:
    codes: set[int | None] = {CLOSE_POLICY} if len(sent) > LIMITS.burst else set()
    if any(f.oversized for f in sent):
        # the server closes on reading the frame's length; the rest of the frame, still arriving, can make the
        # server's kernel reset the connection before the client reads the close frame (no code at all)
        codes |= {CLOSE_OVERSIZE, None}
    if any(f.kind == "bad-utf8" for f in sent):
        codes.add(CLOSE_BAD_UTF8)
    return codes


def fresh_connection_works(live: Live, who: Viewer) -> bool:
    own = "kpi:province" if who.role != "commune" else f"kpi:commune:{who.commune}"
    seen = Observed()
    with open_socket(live.server.ws_url, ["bearer", live.token(who.role, who.commune)]) as ws:
        receive_until(ws, who, seen, "auth_ok")
        ws.send(json.dumps({"type": "subscribe", "channels": [own]}))
        ok = receive_until(ws, who, seen, "snapshot")
    return ok and not seen.leaks


ROLES = st.sampled_from(["operator", "admin", "security", "commune", "commune", "commune"])


def test_fuzzed_messages_get_errors_or_contract_closes_and_never_leak(live: Live) -> None:
    world = live.world
    communes = sorted(world.registry.units)
    token_values = st.one_of(
        st.builds(lambda r, c: live.token(r, c if r == "commune" else None), ROLES, st.sampled_from(communes)),
        st.text(max_size=40),
        json_values,
    )
    examples = {"n": 0, "closed": 0, "frames": 0, "answers": 0}

    @given(
        role=ROLES,
        commune=st.sampled_from(communes),
        sent=st.lists(frames(world, token_values), min_size=1, max_size=5),
    )
    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def fuzz(role: str, commune: str, sent: list[Frame]) -> None:
        who = viewer(world, role, commune if role == "commune" else None)
        seen = Observed()
        examples["n"] += 1
        examples["frames"] += len(sent)
        # an oversized or non-UTF-8 frame ends the connection: what would follow it is never read
        end = next((i for i, f in enumerate(sent) if f.terminal), len(sent) - 1)
        sent = sent[: end + 1]
        with open_socket(live.server.ws_url, ["bearer", live.token(who.role, who.commune)]) as ws:
            assert receive_until(ws, who, seen, "auth_ok")
            for frame in sent:
                send(ws, frame)
            if sent[-1].terminal:
                alive = receive_until(ws, who, seen, "never", timeout=5)
            else:
                ws.send(json.dumps({"type": "ping"}))
                alive = receive_until(ws, who, seen, "pong")
        examples["answers"] += len(seen.frames)
        assert seen.leaks == [], seen.leaks
        if not alive:
            examples["closed"] += 1
            assert seen.close_code in allowed_closes(sent), (seen.close_code, role, sent, seen.frames[-3:])
            assert fresh_connection_works(live, who)

    fuzz()
    print(f"ws fuzz: {examples}")
    assert live.server.errors.lines() == []
    deadline = time.monotonic() + 10
    while live.server.ctx.broadcaster.subscriber_count:
        assert time.monotonic() < deadline, "subscribers left behind"
        time.sleep(0.05)


def test_fuzzed_first_messages_authenticate_or_close_4401(live: Live) -> None:
    """Without the subprotocol, the first message must be a valid ``auth``; anything else is a 4401."""
    world = live.world
    communes = sorted(world.registry.units)
    good = st.builds(lambda r, c: {"type": "auth", "token": live.token(r, c if r == "commune" else None)},
                     ROLES, st.sampled_from(communes))  # fmt: skip
    first = st.one_of(good.map(lambda m: Frame("text", json.dumps(m))), frames(world, st.text(max_size=40)))
    counts = {"n": 0, "authenticated": 0}

    @given(frame=first)
    @hypothesis.settings(
        max_examples=EXAMPLES // 3,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def fuzz(frame: Frame) -> None:
        counts["n"] += 1
        seen = Observed()
        anyone = Viewer("commune", None)  # sees nothing: any data frame before auth_ok is a leak
        with open_socket(live.server.ws_url) as ws:
            send(ws, frame)
            authenticated = receive_until(ws, anyone, seen, "auth_ok", timeout=LIMITS.auth_timeout_s + 5)
        claims = json.loads(frame.data) if frame.kind == "text" and frame.data.startswith('{"type": "auth"') else {}
        valid = isinstance(claims.get("token"), str) and claims["token"] in live.tokens.values()
        assert authenticated is valid, (frame.kind, str(frame.data)[:80])
        assert seen.leaks == []
        if authenticated:
            counts["authenticated"] += 1
        else:
            expected = {CLOSE_UNAUTHORIZED} | allowed_closes([frame])
            assert seen.close_code in expected, (seen.close_code, frame.kind, str(frame.data)[:80])

    fuzz()
    print(f"ws first-message fuzz: {counts}")
    assert live.server.errors.lines() == []
