"""Floods on a real socket: a thousand clients at once, unauthenticated and idle ones, oversized frames, message
storms and half-sent handshakes. The API keeps answering a health check and serving a subscriber that was there
before, and once the flood is gone nothing of it is left (clients gauge, subscribers, channels).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from api.alert_store import MemoryAlertStore
from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster
from api.ws.frames import WsLimits
from ioc.settings import Settings
from tests.api_world import World, apply_to_memory, build_world, snapshot
from tests.live_server import LiveServer, offline_settings

pytestmark = pytest.mark.integration

#: The contract's limits, but a 1 s wait for the first message so idle sockets are dealt with quickly.
LIMITS = WsLimits(auth_timeout_s=1.0)
CROWD = 1_000
UNAUTHENTICATED = 600
IDLE = 300
HALF_OPEN = 300


@pytest.fixture
def api() -> Iterator[tuple[LiveServer, Settings, World]]:
    world = build_world(seed=3, alerts=30)
    settings = offline_settings()
    store = MemoryAlertStore()
    app = create_app(
        settings, connect=False, alert_store=store, broadcaster=Broadcaster(seq_origin=0), ws_limits=LIMITS
    )
    apply_to_memory(world, app.state.ioc.live, store)
    with LiveServer(app, settings, LIMITS) as server:
        yield server, settings, world
        assert server.errors.lines() == []


def connect(url: str, token: str | None = None, **kwargs: Any) -> Any:
    protocols = ["bearer", token] if token else None
    return websockets.connect(url, subprotocols=protocols, compression=None, proxy=None, open_timeout=60,  # type: ignore[arg-type]
                              close_timeout=5, ping_interval=None, **kwargs)  # fmt: skip


async def receive(ws: ClientConnection, kind: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if message["type"] == kind:
            return message


async def closed_with(ws: ClientConnection, timeout: float = 30) -> int | None:
    """The close code the server sent (None: the connection ended without one)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


def clients_gauge(server: LiveServer) -> float:
    registry = server.ctx.metrics.registry
    return sum(
        s.value
        for m in registry.collect()
        if m.name == "ioc_ws_clients"
        for s in m.samples
        if s.name == "ioc_ws_clients"
    )


async def served_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics", timeout=30)).text
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def released(server: LiveServer, channels: int, timeout: float = 30) -> None:
    """Nothing of the flood left: no client counted, no subscriber, no channel beyond those with data."""
    deadline = time.monotonic() + timeout
    while (
        clients_gauge(server)
        or server.ctx.broadcaster.subscriber_count
        or server.ctx.broadcaster.channel_count > channels
    ):
        assert time.monotonic() < deadline, (
            f"left behind: {clients_gauge(server)} counted, {server.ctx.broadcaster.subscriber_count} subscribers,"
            f" {server.ctx.broadcaster.channel_count} channels (had {channels})"
        )
        await asyncio.sleep(0.1)


@asynccontextmanager
async def witness(server: LiveServer, settings: Settings, world: World) -> AsyncIterator[ClientConnection]:
    """A subscriber connected before the flood, on the province channel."""
    async with connect(server.ws_url, create_token(settings, "operator")) as ws:
        await receive(ws, "auth_ok")
        await ws.send(json.dumps({"type": "subscribe", "channels": ["kpi:province"]}))
        await receive(ws, "snapshot")
        yield ws


async def still_served(
    server: LiveServer, ws: ClientConnection, http: httpx.AsyncClient, world: World, seq: int
) -> None:
    """During the flood: a health check is answered, and the witness gets a fresh province update."""
    assert (await http.get("/healthz", timeout=30)).json() == {"status": "ok"}
    s = next(s for s in world.snapshots if s.scope == "province")

    async def publish() -> None:
        server.ctx.live.apply_snapshot(snapshot(s.kpi, s.scope, s.window, 42.0, seq, world.now))

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(publish(), server.loop))
    update = await receive(ws, "update")
    assert (update["item"]["kpi"], update["item"]["seq"]) == (s.kpi, seq)


async def test_a_thousand_clients_at_once_are_served_then_released(api: tuple[LiveServer, Settings, World]) -> None:
    server, settings, world = api
    rng = random.Random(5)
    communes = sorted(world.registry.units)
    channels_before = server.ctx.broadcaster.channel_count
    operator = create_token(settings, "operator")
    tokens = {c: create_token(settings, "commune", c) for c in communes}
    opened = asyncio.Event()
    ready: list[int] = []

    async def client(n: int) -> int:
        token = operator if rng.random() < 0.25 else tokens[rng.choice(communes)]
        async with connect(server.ws_url, token) as ws:
            ok = await receive(ws, "auth_ok")
            # operators also name two agencies nobody publishes on: channels made up by clients
            own = ([f"kpi:commune:{ok['commune']}"] if ok["commune"] else
                   ["kpi:province", f"kpi:agency:FLOOD-{n}", f"kpi:agency:FLOOD-{n}-b"])  # fmt: skip
            await ws.send(json.dumps({"type": "subscribe", "channels": own}))
            for _ in own:
                await receive(ws, "snapshot")
            ready.append(n)
            await opened.wait()
            await ws.send(json.dumps({"type": "ping"}))
            await receive(ws, "pong")
        return n

    async with witness(server, settings, world) as ws, httpx.AsyncClient(base_url=server.http_url) as http:
        crowd = [asyncio.create_task(client(n)) for n in range(CROWD)]
        deadline = time.monotonic() + 120
        while len(ready) < CROWD:
            assert time.monotonic() < deadline, f"only {len(ready)} of {CROWD} clients served"
            assert not any(t.done() and t.exception() for t in crowd), [t.exception() for t in crowd if t.done()]
            await asyncio.sleep(0.1)
        # everyone is connected at once: counted, and the API still answers
        assert clients_gauge(server) == CROWD + 1
        metrics = await served_metrics(http)
        assert sum(v for k, v in metrics.items() if k.startswith("ioc_ws_clients[")) == CROWD + 1
        await still_served(server, ws, http, world, 5_000_001)
        opened.set()
        assert sorted(await asyncio.gather(*crowd)) == list(range(CROWD))
        await still_served(server, ws, http, world, 5_000_002)
    await released(server, channels_before)
    print(f"floods: {CROWD} concurrent clients served and released")


async def test_unauthenticated_and_idle_crowds_are_refused_and_cost_nothing(
    api: tuple[LiveServer, Settings, World],
) -> None:
    server, settings, world = api
    channels_before = server.ctx.broadcaster.channel_count
    now = int(time.time())
    bad = jwt.encode({"sub": "x", "role": "operator", "iat": now, "exp": now + 600}, "another-signing-key-" + "x" * 30,
                     algorithm="HS256", headers={"kid": settings.signing_key_id})  # fmt: skip

    async def refused(n: int) -> int | None:
        kind = n % 3
        async with connect(server.ws_url, bad if kind == 0 else None) as ws:
            if kind == 1:  # a first message that is not an auth
                await ws.send(json.dumps({"type": "subscribe", "channels": ["kpi:province"]}))
            # kind 2 says nothing at all and waits to be dropped
            return await closed_with(ws, timeout=LIMITS.auth_timeout_s + 30)

    async with witness(server, settings, world) as ws, httpx.AsyncClient(base_url=server.http_url) as http:
        refused_before = (await served_metrics(http)).get("ioc_ws_refused_total[('reason', 'auth')]", 0)
        flood = [asyncio.create_task(refused(n)) for n in range(UNAUTHENTICATED + IDLE)]
        await asyncio.sleep(0.2)
        await still_served(server, ws, http, world, 6_000_001)
        codes = await asyncio.gather(*flood)
        assert codes == [4401] * len(flood)
        assert clients_gauge(server) == 1  # only the witness was ever counted
        refused_after = (await served_metrics(http))["ioc_ws_refused_total[('reason', 'auth')]"]
        assert refused_after - refused_before == len(flood)
        await still_served(server, ws, http, world, 6_000_002)
    await released(server, channels_before)


async def test_half_sent_handshakes_do_not_starve_the_api(api: tuple[LiveServer, Settings, World]) -> None:
    """Slowloris: connections that never finish their request headers."""
    server, settings, world = api
    channels_before = server.ctx.broadcaster.channel_count
    writers: list[asyncio.StreamWriter] = []
    for n in range(HALF_OPEN):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n")
        if n % 2:
            writer.write(b"Sec-WebSocket-Version: 13\r\nX-Slow: " + b"a" * 1000)  # no end of line, no blank line
        writers.append(writer)
    await asyncio.gather(*(w.drain() for w in writers))
    try:
        async with witness(server, settings, world) as ws, httpx.AsyncClient(base_url=server.http_url) as http:
            await still_served(server, ws, http, world, 7_000_001)
            # a header line that never ends is cut at uvicorn's limit, not buffered for ever
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
                for _ in range(64):
                    writer.write(b"b" * 4096)
                    await writer.drain()
                answer = await asyncio.wait_for(reader.read(), 30)
            except ConnectionError:
                answer = b""
            finally:
                writer.close()
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:100]
            await still_served(server, ws, http, world, 7_000_002)
    finally:
        for w in writers:
            w.close()
    await released(server, channels_before)


async def test_oversized_frames_and_message_storms_close_only_their_sender(
    api: tuple[LiveServer, Settings, World],
) -> None:
    server, settings, world = api
    channels_before = server.ctx.broadcaster.channel_count
    token = create_token(settings, "operator")
    limit = LIMITS.max_frame_bytes

    async def send_then_close_code(frames: list[str | bytes | list[str]], authenticated: bool = True) -> int | None:
        async with connect(server.ws_url, token if authenticated else None, max_size=None) as ws:
            if authenticated:
                await receive(ws, "auth_ok")
            try:
                for frame in frames:
                    await ws.send(frame)
            except ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
            return await closed_with(ws)

    async def at_the_limit_is_fine() -> str:
        async with connect(server.ws_url, token) as ws:
            await receive(ws, "auth_ok")
            await ws.send(json.dumps({"type": "ping", "pad": "x" * (limit - 32)})[:limit])
            return str((await receive(ws, "pong"))["type"])

    huge = "x" * (limit + 1)
    async with witness(server, settings, world) as ws, httpx.AsyncClient(base_url=server.http_url) as http:
        cases = {
            "text over the limit": [huge],
            "binary over the limit": [huge.encode()],
            "1 MiB": ["y" * (1 << 20)],
            "fragments adding up over the limit": [["z" * (limit // 4)] * 5],  # type: ignore[list-item]
        }
        results = await asyncio.gather(
            *(send_then_close_code(frames) for frames in cases.values() for _ in range(25)),
            *(send_then_close_code([huge], authenticated=False) for _ in range(25)),
            *(send_then_close_code([json.dumps({"type": "ping"})] * (LIMITS.burst * 3)) for _ in range(25)),
        )
        oversized, before_auth, storms = results[: 4 * 25], results[4 * 25 : 5 * 25], results[5 * 25 :]
        # 1009; or, when the server closed while the rest of the frame was still arriving, a reset (no code)
        assert set(oversized) <= {1009, None} and oversized.count(1009) >= len(oversized) // 2, oversized
        assert set(before_auth) <= {1009, None}, before_auth
        assert storms == [1008] * 25
        assert await at_the_limit_is_fine() == "pong"
        await still_served(server, ws, http, world, 8_000_001)
    await released(server, channels_before)
