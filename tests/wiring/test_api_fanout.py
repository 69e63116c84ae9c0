"""The fan-out path of the live feed: one frame for every client, written at once, one heartbeat, lean sockets."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from api.app import create_app, server_options
from api.auth import create_token, verify_token
from api.broadcaster import Broadcaster
from api.context import ApiContext
from api.ws.connection import Connection, MessageTally
from api.ws.frames import CLOSE_UNAUTHORIZED, WsLimits
from ioc.compat.starlette import Resume
from ioc.compat.uvicorn import (
    DirectWebSocketRoute,
    FrameCache,
    LeanWebSocketProtocol,
    ReceiveQueue,
    WriteGate,
    direct_routes,
)
from ioc.settings import Settings
from tests.factories import snap
from tests.fake_ws import FakeSocket
from tests.waiting import until

SUBSCRIBE = {"type": "websocket.receive", "text": '{"type": "subscribe", "channels": ["kpi:province"]}'}


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://nobody@127.0.0.1:1/none")


def context(settings: Settings, **limits: Any) -> ApiContext:
    app = create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0), ws_limits=WsLimits(**limits))
    ctx: ApiContext = app.state.ioc
    return ctx


async def connected(
    ctx: ApiContext, settings: Settings, n: int, **kw: Any
) -> tuple[list[FakeSocket], list[asyncio.Task[None]]]:
    principal = verify_token(settings, create_token(settings, "operator", subject="wall"))
    sockets = [FakeSocket(**kw) for _ in range(n)]
    runs = []
    for ws in sockets:
        ws.inbox.put_nowait(SUBSCRIBE)
        runs.append(asyncio.create_task(Connection(ctx, ws, principal).run()))  # type: ignore[arg-type]
    await until(lambda: len(ctx.broadcaster.channel("kpi:province").subscribers) == n, what="every client subscribed")
    return sockets, runs


async def hang_up(sockets: list[FakeSocket], runs: list[asyncio.Task[None]]) -> None:
    for ws in sockets:
        ws.inbox.put_nowait({"type": "websocket.disconnect"})
    await asyncio.wait_for(asyncio.gather(*runs), 5)


async def test_an_update_is_written_to_every_client_during_publish_as_one_shared_str(settings: Settings) -> None:
    ctx = context(settings)
    sockets, runs = await connected(ctx, settings, 3)
    ctx.live.apply_snapshot(snap("dossier.received", "province", value=7, seq=1))
    # no await in between: written by the publisher itself, not by a task per client woken later
    updates = [ws.of_type("update") for ws in sockets]
    assert [len(u) for u in updates] == [1, 1, 1]
    assert updates[0][0] is updates[1][0] is updates[2][0]  # encoded once, the same object for all
    await hang_up(sockets, runs)


async def test_connections_run_no_task_of_their_own_and_share_one_heartbeat(settings: Settings) -> None:
    ctx = context(settings)
    before = len(asyncio.all_tasks())
    sockets, runs = await connected(ctx, settings, 5)
    ctx.live.apply_snapshot(snap("dossier.received", "province", value=7, seq=1))
    extra = {t.get_name() for t in asyncio.all_tasks()} - {r.get_name() for r in runs}
    assert len(asyncio.all_tasks()) - before == len(runs) + 1
    assert "ws-heartbeat" in extra
    await hang_up(sockets, runs)
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "ws-heartbeat" and not t.done()]


async def test_the_heartbeat_pings_every_client_with_one_frame(settings: Settings) -> None:
    ctx = context(settings, ping_interval_s=0.02)
    sockets, runs = await connected(ctx, settings, 3)
    await until(lambda: all(len(ws.of_type("ping")) >= 2 for ws in sockets), what="two pings to every client")
    pings = [ws.of_type("ping") for ws in sockets]
    assert all(len(p) >= 2 for p in pings)
    assert pings[0][0] is pings[1][0] is pings[2][0]
    await hang_up(sockets, runs)


async def test_the_heartbeat_ends_a_connection_whose_token_expired(settings: Settings) -> None:
    ctx = context(settings)
    expired = verify_token(settings, create_token(settings, "operator", subject="wall"))
    fresh = verify_token(settings, create_token(settings, "operator", subject="wall", ttl=dt.timedelta(days=2)))
    old, new = FakeSocket(), FakeSocket()
    runs = [
        asyncio.create_task(Connection(ctx, ws, p).run())  # type: ignore[arg-type]
        for ws, p in ((old, expired), (new, fresh))
    ]
    await until(lambda: ctx.broadcaster.subscriber_count == 2, what="both connections running")
    assert expired.expires_at is not None
    assert ctx.broadcaster.ping(expired.expires_at + dt.timedelta(seconds=1)) == 1
    await asyncio.wait_for(runs[0], 5)
    assert old.close_code == CLOSE_UNAUTHORIZED
    assert json.loads(old.texts[-1])["code"] == "token_expired" and old.of_type("ping") == []
    assert len(new.of_type("ping")) == 1 and not runs[1].done()
    await hang_up([new], runs[1:])


async def test_a_stuck_client_gets_a_flush_task_only_while_it_lags(settings: Settings) -> None:
    ctx = context(settings)
    (slow,), runs = await connected(ctx, settings, 1, stuck=True)
    base = len(asyncio.all_tasks())
    for v in range(1, 4):
        ctx.live.apply_snapshot(snap("dossier.received", "province", value=v, seq=v))
    assert len(asyncio.all_tasks()) == base  # the snapshot's send is already the one waiting
    slow.gate.set()
    await until(lambda: slow.of_type("update"), what="the stuck send to finish")
    await until(lambda: not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Connection._flush"], what="the flush task to end")  # type: ignore[union-attr]
    assert [json.loads(t)["item"]["value"] for t in slow.of_type("update")] == [3]  # coalesced
    flushing = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "Connection._flush"]  # type: ignore[union-attr]
    assert flushing == []
    ctx.live.apply_snapshot(snap("dossier.received", "province", value=4, seq=4))
    assert json.loads(slow.texts[-1])["item"]["value"] == 4  # caught up: written at once again
    await hang_up([slow], runs)


async def finish(resume: Resume) -> None:
    await resume


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_send_started_by_hand_is_finished_by_a_task_once(cancel: bool) -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def send() -> None:
        steps.append("start")
        try:
            await gate
            steps.append("sent")
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise

    coro = send()
    task = asyncio.create_task(finish(Resume(coro, coro.send(None))))
    await asyncio.sleep(0)
    if cancel:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert steps == ["start", "cancelled"]
    else:
        gate.set_result(None)
        await task
        assert steps == ["start", "sent"]


async def test_receive_queue_hands_out_messages_in_order_and_waits_when_empty() -> None:
    queue = ReceiveQueue()
    assert queue.empty()
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert not queue.empty()
    assert [await queue.get(), await queue.get()] == [1, 2]
    waiting = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    queue.put_nowait(3)
    assert await asyncio.wait_for(waiting, 1) == 3
    assert queue.empty()


def test_a_text_frame_is_framed_once_for_every_connection_sent_the_same_str() -> None:
    cache = FrameCache()
    text = json.dumps({"type": "update", "channel": "kpi:province", "item": {"v": "Nghệ An"}, "seq": 1})
    first = cache.text_frame(text)
    assert cache.text_frame(text) is first
    assert first == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
    other = cache.text_frame(text.replace("1}", "2}"))
    assert other is not first and other.endswith(b'"seq": 2}')


def test_message_counts_reach_prometheus_once_per_loop_turn(settings: Settings) -> None:
    metrics = context(settings).metrics
    tally = MessageTally(metrics.ws_messages)

    def sent(kind: str) -> float | None:
        return metrics.registry.get_sample_value("ioc_ws_messages_total", {"type": kind})

    async def fan_out() -> None:
        for _ in range(1000):
            tally.add("update")
        tally.add("ping")
        assert sent("update") is None  # not yet: one increment per type after this turn
        await asyncio.sleep(0)

    asyncio.run(fan_out())
    assert (sent("update"), sent("ping")) == (1000, 1)
    tally.add("pong")  # outside an event loop: at once
    assert sent("pong") == 1


def test_the_live_feed_is_found_as_a_direct_route_behind_uvicorns_middleware(settings: Settings) -> None:
    app = create_app(settings, connect=False)
    routes = direct_routes(ProxyHeadersMiddleware(app))  # what uvicorn serves with proxy_headers on
    assert set(routes) == {"/ws"}
    assert direct_routes(object()) == {}  # not a Starlette app: everything goes through the app


def test_a_direct_route_takes_no_path_parameters() -> None:
    async def endpoint(ws: Any) -> None:
        pass

    with pytest.raises(ValueError, match="path parameters"):
        DirectWebSocketRoute("/ws/{name}", endpoint)


async def test_the_lean_protocol_keeps_uvicorns_state_in_slots_not_a_dict(settings: Settings) -> None:
    config = uvicorn.Config(create_app(settings, connect=False), **server_options(settings, WsLimits()))
    config.load()
    protocol = LeanWebSocketProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    assert vars(protocol) == {}  # an attribute uvicorn added (an upgrade) would land here: add it to __slots__
    assert isinstance(protocol, asyncio.BufferedProtocol)  # reads into the shared buffer, no 256 KiB per read


async def test_the_write_gate_holds_senders_while_the_transport_pushes_back() -> None:
    gate = WriteGate()
    assert gate.is_set() and await gate.wait()
    gate.clear()
    waiters = [asyncio.create_task(gate.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not gate.is_set() and not any(w.done() for w in waiters)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True]
