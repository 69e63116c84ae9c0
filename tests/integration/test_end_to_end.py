"""End to end: simulator → embedded broker → `ioc worker` → PostgreSQL → `ioc api` → a WebSocket client."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import psycopg
import pytest
import websockets

from api.auth import create_token
from ioc.settings import Settings
from simulators.producer import run as simulate

pytestmark = pytest.mark.integration


async def _receive(ws: Any, kind: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {kind!r} message in {timeout} s"
        message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
        if message["type"] == kind:
            return message


async def test_simulated_events_reach_a_websocket_client_and_the_database(system: Settings) -> None:
    settings = system
    token = create_token(settings, "operator", subject="e2e")
    url = f"ws://127.0.0.1:{settings.api_port}/ws"
    async with websockets.connect(url, subprotocols=["bearer", token]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "subscribe", "channels": ["kpi:province"]}))
        snapshot = await _receive(ws, "snapshot", 10)
        assert snapshot["channel"] == "kpi:province"
        sim = asyncio.create_task(simulate(settings, rate=200, duration=8, seed=7, progress=False, bad_rate=0.02))
        received: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 45
        while "dossier.received|province|today" not in received or received["dossier.received|province|today"][
            "value"
        ] in (None, 0):
            assert time.monotonic() < deadline, f"no dossier KPI update; got {sorted(received)[:10]}"
            update = await _receive(ws, "update", 45)
            item = update["item"]
            assert update["seq"] > 0 and item["scope"] == "province"
            received[f"{item['kpi']}|{item['scope']}|{item['window']}"] = item
        stats = await sim
    assert stats.sent > 0 and stats.malformed > 0
    # The same KPI is in the database and served over REST, scoped to the caller.
    with psycopg.connect(settings.database_url) as conn:
        deadline = time.monotonic() + 20
        while True:
            row = conn.execute(
                "SELECT value FROM kpi_latest WHERE kpi = 'dossier.received' AND scope = 'province' AND win = 'today'"
            ).fetchone()
            if row and row[0]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        states = conn.execute("SELECT count(*) FROM dossier_state").fetchone()
    assert states and states[0] > 0
    r = httpx.get(
        f"http://127.0.0.1:{settings.api_port}/api/kpis",
        params={"kpi": "dossier.received", "scope": "province"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200
    assert any(item["window"] == "today" and item["value"] for item in r.json()["items"])
    assert httpx.get(f"http://127.0.0.1:{settings.api_port}/api/kpis").status_code == 401
