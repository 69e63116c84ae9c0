"""The API on the embedded broker and PostgreSQL: startup load, live feed, history, readiness."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import create_token
from api.context import ApiContext
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_KPI, Settings
from ioc.snapshot import Snapshot, encode

pytestmark = pytest.mark.integration

VN = dt.timezone(dt.timedelta(hours=7))


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def insert_latest(url: str, kpi: str, scope: str, window: str, value: float, seq: int, as_of: dt.datetime) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO kpi_latest (kpi, scope, win, value, unit, numerator, denominator, target,"
            " status, as_of, seq)"
            " VALUES (%s, %s, %s, %s, '', NULL, NULL, NULL, NULL, %s, %s)",
            (kpi, scope, window, value, as_of, seq),
        )


def receive_until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = ws.receive_json()
        if message["type"] == kind:
            return message


def test_api_serves_database_values_then_live_updates_from_the_topic(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(VN).replace(microsecond=0)
    insert_latest(settings.database_url, "dossier.received", "province", "today", 41, 7, now)
    app = create_app(settings)
    ctx: ApiContext = app.state.ioc
    token = create_token(settings, "operator")
    with TestClient(app) as client:
        wait_for(lambda: ctx.feed.consuming)
        items = client.get("/api/kpis", headers={"Authorization": f"Bearer {token}"}).json()["items"]
        assert [(i["kpi"], i["value"], i["seq"]) for i in items] == [("dossier.received", 41.0, 7)]
        assert client.get("/readyz").status_code == 200

        with client.websocket_connect("/ws", subprotocols=["bearer", token]) as ws:
            receive_until(ws, "auth_ok")
            ws.send_json({"type": "subscribe", "channels": ["kpi:province"]})
            snapshot = receive_until(ws, "snapshot")
            assert [i["value"] for i in snapshot["items"]] == [41.0]

            newer = Snapshot(
                kpi="dossier.received",
                scope="province",
                window="today",
                value=42,
                unit="",
                numerator=None,
                denominator=None,
                target=None,
                status=None,
                as_of=now + dt.timedelta(seconds=5),
                seq=8,
            )

            async def produce() -> None:
                producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
                await producer.start()
                try:
                    await producer.send_and_wait(settings.topic(TOPIC_KPI), encode(newer), key=newer.key.encode())
                finally:
                    await producer.stop()

            assert client.portal is not None
            client.portal.call(produce)
            update = receive_until(ws, "update")
            assert update["item"]["value"] == 42 and update["item"]["seq"] == 8
            assert update["seq"] == snapshot["seq"] + 1


def test_history_is_downsampled_in_the_database(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(kafka_bootstrap="127.0.0.1:1")
    start = dt.datetime.now(VN).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        for minute in range(0, 180, 10):
            conn.execute(
                "INSERT INTO kpi_history"
                " (as_of, kpi, scope, win, value, numerator, denominator, status, seq)"
                " VALUES (%s, 'env.aqi', 'province', 'now', %s, NULL, NULL, NULL, %s)",
                (start + dt.timedelta(minutes=minute), float(minute), minute + 1),
            )
        storage = conn.execute("SELECT value FROM ioc_meta WHERE key = 'storage'").fetchone()
    app = create_app(settings)
    headers = {"Authorization": f"Bearer {create_token(settings, 'operator')}"}
    with TestClient(app) as client:
        response = client.get(
            "/api/kpis/history",
            headers=headers,
            params={
                "kpi": "env.aqi",
                "scope": "province",
                "window": "now",
                "bucket": "1h",
                "from": start.isoformat(),
                "to": (start + dt.timedelta(hours=3)).isoformat(),
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["storage"] == (storage[0] if storage else None)
        assert [(p["value"], p["min"], p["samples"]) for p in body["points"]] == [
            (50.0, 0.0, 6),
            (110.0, 60.0, 6),
            (170.0, 120.0, 6),
        ]
        assert body["points"][0]["t"] == start.isoformat()
        forbidden = client.get(
            "/api/kpis/history",
            params={"kpi": "env.aqi", "scope": "province", "window": "now"},
            headers={"Authorization": f"Bearer {create_token(settings, 'security')}"},
        )
        assert forbidden.status_code == 403
        assert client.get("/readyz").status_code == 503
