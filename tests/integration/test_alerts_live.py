"""Alerts live, end to end: real worker and API processes, a security user's WebSocket, a webhook.

Critical incidents fire once each; the one acknowledged through the API is not escalated, the other
is escalated on time (the escalation delay is shortened to 20 s through a rules file, the way an
operator overrides the shipped rules with IOC_ALERT_RULES); a commune user sees none of it; the
webhook receives signed notifications."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from aiokafka import AIOKafkaProducer

from alerts.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_CYBER, Settings
from tests.integration.conftest import env_for, free_port

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
SECRET = "webhook-secret-0123456789abcdef0123456789"
ESCALATE_AFTER_S = 20


class Hook:
    """A real HTTP server on loopback collecting webhook deliveries."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        headers = {}
        for line in head.decode().split("\r\n")[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.received.append((headers, body))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


def _rules(tmp_path: Path) -> Path:
    text = resources.files("alerts").joinpath("default_rules.yaml").read_text(encoding="utf-8")
    marker = "    rule: cyber.incident_critical\n    after: 15m\n"
    assert marker in text
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace(marker, f"    rule: cyber.incident_critical\n    after: {ESCALATE_AFTER_S}s\n"))
    return path


def _incident(incident_id: str, category: str) -> bytes:
    return json.dumps({
        "schema": "ioc.incident.v1", "event_id": f"{incident_id}-d", "incident_id": incident_id, "type": "detected",
        "occurred_at": dt.datetime.now(VN).isoformat(), "severity": "critical", "category": category,
        "system": "dichvucong.nghean.gov.vn", "system_level": 3, "agency_code": "000.00.16.H40",
    }).encode()  # fmt: skip


async def _collect(ws: Any, into: list[dict[str, Any]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            message = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
        except TimeoutError:
            continue
        if message["type"] == "alert":
            into.append(message["item"])


async def _scenario(settings: Settings, procs: list[subprocess.Popen[bytes]], hook: Hook) -> dict[str, Any]:
    base = f"http://127.0.0.1:{settings.api_port}"
    security = create_token(settings, "security", subject="soc.analyst")
    commune = create_token(settings, "commune", commune="16681", subject="thanh-vinh")
    seen_security: list[dict[str, Any]] = []
    seen_commune: list[dict[str, Any]] = []
    stop = asyncio.Event()
    async with (
        websockets.connect(f"ws://127.0.0.1:{settings.api_port}/ws", subprotocols=["bearer", security]) as ws1,  # type: ignore[list-item]
        websockets.connect(f"ws://127.0.0.1:{settings.api_port}/ws", subprotocols=["bearer", commune]) as ws2,  # type: ignore[list-item]
    ):
        for ws in (ws1, ws2):
            await ws.send(json.dumps({"type": "subscribe", "channels": ["alerts"]}))
        tasks = [
            asyncio.create_task(_collect(ws1, seen_security, stop)),
            asyncio.create_task(_collect(ws2, seen_commune, stop)),
        ]
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
        await producer.start()
        for incident_id, category in (("SOC-LIVE-1", "ddos"), ("SOC-LIVE-2", "intrusion")):
            await producer.send_and_wait(
                settings.topic(TOPIC_CYBER), _incident(incident_id, category), key=incident_id.encode()
            )
        await producer.stop()

        def firing(incident_id: str) -> dict[str, Any] | None:
            return next((a for a in seen_security if a["state"] == "firing" and incident_id in a["triggered_by"]), None)

        deadline = time.monotonic() + 45
        while not (firing("SOC-LIVE-1") and firing("SOC-LIVE-2")):
            assert all(p.poll() is None for p in procs)
            assert time.monotonic() < deadline, f"alerts not delivered: {seen_security}"
            await asyncio.sleep(0.2)
        first = firing("SOC-LIVE-1")
        assert first is not None
        async with httpx.AsyncClient() as client:
            r = await client.post(
                f"{base}/api/alerts/{first['alert_id']}/ack",
                json={"reason": "on it"},
                headers={"Authorization": f"Bearer {security}"},
            )
        assert r.status_code == 200, r.text
        # until the other one escalated, and the acknowledged one's escalation time (plus a margin) passed
        acked_due = dt.datetime.fromisoformat(first["at"]) + dt.timedelta(seconds=ESCALATE_AFTER_S + 2)
        deadline = time.monotonic() + ESCALATE_AFTER_S + 30
        while not (
            any(a["state"] == "escalated" and "SOC-LIVE-2" in a["triggered_by"] for a in seen_security)
            and dt.datetime.now(VN) >= acked_due
        ):
            assert all(p.poll() is None for p in procs)
            assert time.monotonic() < deadline, f"no escalation: {seen_security}"
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
    return {"security": seen_security, "commune": seen_commune, "acked": first["alert_id"]}


def test_alerts_reach_security_once_each_escalate_on_time_and_stop_when_acknowledged(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    hook = Hook()
    loop = asyncio.new_event_loop()
    loop.run_until_complete(hook.start())
    settings = make_settings(api_port=free_port())
    ensure_topics(settings)
    env = {
        **env_for(settings),
        "IOC_ALERT_RULES": str(_rules(tmp_path)),
        "IOC_ALERT_WEBHOOKS": json.dumps(
            [{"name": "soc", "url": f"http://127.0.0.1:{hook.port}/hook", "secret": SECRET}]
        ),
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", "entrypoints.cli", n], env=env, stdin=subprocess.DEVNULL)
        for n in ("worker", "api")
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{settings.api_port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        time.sleep(2)  # the worker's consumer group settles
        result = loop.run_until_complete(_scenario(settings, procs, hook))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)
        loop.close()
    seen = result["security"]
    by_alert: dict[str, list[str]] = {}
    for a in seen:
        by_alert.setdefault(a["alert_id"], []).append(a["state"])
    acked = result["acked"]
    other = next(
        k for k in by_alert if k != acked and any("SOC-LIVE-2" in a["triggered_by"] for a in seen if a["alert_id"] == k)
    )
    assert by_alert[acked].count("firing") == 1 and by_alert[other].count("firing") == 1  # once each
    assert "acknowledged" in by_alert[acked] and "escalated" not in by_alert[acked]
    assert "escalated" in by_alert[other]
    fired = next(dt.datetime.fromisoformat(a["at"]) for a in seen if a["alert_id"] == other and a["state"] == "firing")
    escalated = next(
        dt.datetime.fromisoformat(a["at"]) for a in seen if a["alert_id"] == other and a["state"] == "escalated"
    )
    assert abs((escalated - fired).total_seconds() - ESCALATE_AFTER_S) < 3
    assert result["commune"] == []  # a commune user sees no provincial cyber alert
    assert hook.received, "no webhook delivery"
    for headers, body in hook.received:
        assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER.lower()], body, headers[SIGNATURE_HEADER.lower()])
