"""The API as a real process (uvicorn, real sockets): keys, Origin, isolation and /metrics end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
import websockets
from aiokafka import AIOKafkaProducer
from websockets.exceptions import ConnectionClosed, InvalidStatus

from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_KPI, Settings
from ioc.snapshot import Snapshot, encode
from tests.integration.conftest import env_for, free_port, start_components, stop_components

pytestmark = pytest.mark.integration

COMMUNE = "16681"
OTHER = "16690"
RETIRED_KEY = "retired-signing-key-" + "r" * 40
VN = dt.timezone(dt.timedelta(hours=7))


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[Settings]:
    """``ioc api`` alone, with a retired key still trusted and one allowed browser Origin."""
    settings = make_settings(
        api_port=free_port(),
        signing_keys_previous={"k0": RETIRED_KEY},
        allowed_origins=["https://wall.nghean.gov.vn"],
    )
    ensure_topics(settings)
    env = {
        **env_for(settings),
        "IOC_SIGNING_KEYS_PREVIOUS": json.dumps({"k0": RETIRED_KEY}),
        "IOC_ALLOWED_ORIGINS": json.dumps(settings.allowed_origins),
    }
    procs = start_components(env, ("api",), settings.api_port)
    try:
        yield settings
    finally:
        stop_components(procs)


def signed(key: str, kid: str, ttl_s: int = 600, **claims: Any) -> str:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    return jwt.encode(
        {"sub": "it", "role": "operator", "iat": now, "exp": now + ttl_s, **claims},
        key,
        algorithm="HS256",
        headers={"kid": kid},
    )


async def receive(ws: Any, kind: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if message["type"] == kind:
            return message


async def closed_with(ws: Any) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return closed.value.rcvd.code if closed.value.rcvd else None


async def test_keys_origin_and_url_tokens_on_a_real_server(api: Settings) -> None:
    url = f"ws://127.0.0.1:{api.api_port}/ws"
    current = api.effective_signing_key()
    retired = signed(RETIRED_KEY, "k0", role="commune", commune=COMMUNE)
    async with websockets.connect(url, subprotocols=["bearer", retired]) as ws:  # type: ignore[list-item]
        ok = await receive(ws, "auth_ok")
        assert ok["commune"] == COMMUNE
    refused = {
        "expired": signed(current, api.signing_key_id, ttl_s=-3600),
        "wrong signature": signed("another-key-" + "x" * 40, api.signing_key_id),
        "unknown kid": signed(current, "k9"),
        "retired kid, forged": signed("another-key-" + "x" * 40, "k0"),
    }
    for case, bad in refused.items():
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "auth", "token": bad}))
            assert (await receive(ws, "error"))["code"] == "unauthorized", case
            assert await closed_with(ws) == 4401, case
    good = create_token(api, "operator")
    async with websockets.connect(f"{url}?token={good}") as ws:
        await ws.send(json.dumps({"type": "subscribe", "channels": ["kpi:province"]}))
        assert (await receive(ws, "error"))["message"] == "missing token"
        assert await closed_with(ws) == 4401
    with pytest.raises(InvalidStatus) as rejected:
        async with websockets.connect(url, subprotocols=["bearer", good], origin="https://evil.example"):  # type: ignore[list-item,arg-type]
            pass
    assert rejected.value.response.status_code == 403
    async with websockets.connect(url, subprotocols=["bearer", good], origin="https://wall.nghean.gov.vn") as ws:  # type: ignore[list-item,arg-type]
        await receive(ws, "auth_ok")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.api_port}") as http:
        assert (await http.get("/api/kpis", params={"token": good})).status_code == 401
        assert (await http.get("/api/kpis", headers={"Authorization": f"Bearer {retired}"})).status_code == 200
        metrics = (await http.get("/metrics")).text
    assert 'ioc_ws_refused_total{reason="auth"} 5.0' in metrics
    assert 'ioc_ws_refused_total{reason="origin"} 1.0' in metrics
    assert 'ioc_http_requests_total{route="/api/kpis",status="401"} 1.0' in metrics


async def test_a_commune_client_receives_only_its_commune_from_the_topic(api: Settings) -> None:
    url = f"ws://127.0.0.1:{api.api_port}/ws"
    token = create_token(api, "commune", commune=COMMUNE)
    now = dt.datetime.now(VN).replace(microsecond=0)
    async with websockets.connect(url, subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
        await receive(ws, "auth_ok")
        channels = [
            f"kpi:commune:{OTHER}",
            f"kpi:station:AIR-{OTHER}",
            "kpi:province",
            "kpi:agency:000.01.70.H40",
            f"kpi:commune:{COMMUNE}",
        ]
        await ws.send(json.dumps({"type": "subscribe", "channels": channels}))
        for channel in channels[:-1]:
            error = await receive(ws, "error")
            assert (error["code"], error["channel"]) == ("forbidden", channel)
        await receive(ws, "snapshot")
        producer = AIOKafkaProducer(bootstrap_servers=api.kafka_bootstrap)
        await producer.start()
        try:
            for seq, scope in enumerate(
                ["province", f"commune:{OTHER}", f"station:AIR-{OTHER}", "agency:000.01.70.H40", f"commune:{COMMUNE}"],
                start=1,
            ):
                snapshot = Snapshot(
                    kpi="dossier.received",
                    scope=scope,
                    window="today",
                    value=float(seq),
                    unit="",
                    numerator=None,
                    denominator=None,
                    target=None,
                    status=None,
                    as_of=now,
                    seq=seq,
                )
                await producer.send_and_wait(api.topic(TOPIC_KPI), encode(snapshot), key=snapshot.key.encode())
        finally:
            await producer.stop()
        update = await receive(ws, "update", timeout=30)
        assert update["item"]["scope"] == f"commune:{COMMUNE}" and update["item"]["value"] == 5.0
        await ws.send(json.dumps({"type": "ping"}))
        later = []
        while (message := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "pong":
            later.append(message)
        assert [m for m in later if m["type"] != "ping"] == []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.api_port}") as http:
        metrics = (await http.get("/metrics")).text
    assert 'ioc_feed_updates_total{topic="ioc.kpi.updates"} 5.0' in metrics
    assert 'ioc_ws_refused_total{reason="forbidden"} 4.0' in metrics
