"""The alert routes on the embedded PostgreSQL and broker: an acknowledgement is recorded and published."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from fastapi.testclient import TestClient

from alerts.engine import alert_id_for
from alerts.model import Alert, AlertEvent, AlertState, Audience, Severity, fingerprint
from api.app import create_app
from api.auth import create_token
from api.context import ApiContext
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_ALERTS, Settings

pytestmark = pytest.mark.integration

VN = dt.timezone(dt.timedelta(hours=7))


def fired_at(started: dt.datetime, commune: str = "17935") -> AlertEvent:
    fp = fingerprint("water.alarm_2", "station:WL-NAMDAN")
    return AlertEvent(
        alert_id=alert_id_for(fp, started),
        fingerprint=fp,
        rule="water.alarm_2",
        scope="station:WL-NAMDAN",
        severity=Severity.HIGH,
        state=AlertState.FIRING,
        domain="water",
        audience=(Audience.OPERATOR, Audience.COMMUNE),
        commune_code=commune,
        message_vi="Nam Đàn: vượt báo động II",
        message_en="Nam Dan: above alarm level II",
        at=started,
        value=7.1,
        labels={"kpi": "water.level_m", "station": "WL-NAMDAN"},
    )


def record_as_the_worker_does(url: str, event: AlertEvent) -> None:
    alert = Alert.open(event)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO alert_event (alert_id, fingerprint, state, at, by, event) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING",
            (event.alert_id, event.fingerprint, event.state.value, event.at, event.by,
             msgspec.json.encode(event).decode()),
        )  # fmt: skip
        conn.execute(
            "INSERT INTO alert_current (alert_id, fingerprint, rule, scope, severity, state, domain, commune_code,"
            " started_at, updated_at, alert) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (alert.alert_id, alert.fingerprint, alert.rule, alert.scope, alert.severity.value, alert.state.value,
             alert.domain, alert.commune_code, alert.started_at, alert.updated_at,
             msgspec.json.encode(alert).decode()),
        )  # fmt: skip


async def read_alert_events(settings: Settings, count: int) -> list[tuple[bytes | None, AlertEvent]]:
    consumer = AIOKafkaConsumer(
        settings.topic(TOPIC_ALERTS),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        found: list[tuple[bytes | None, AlertEvent]] = []
        deadline = time.monotonic() + 30
        while len(found) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                found += [(r.key, msgspec.json.decode(r.value or b"", type=AlertEvent)) for r in records]
        return found
    finally:
        await consumer.stop()


def test_acknowledging_over_http_writes_the_audit_row_and_publishes_the_event(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    started = dt.datetime.now(VN).replace(microsecond=0) - dt.timedelta(minutes=5)
    fired = fired_at(started)
    other = fired_at(started - dt.timedelta(hours=1), commune="16681")
    other = msgspec.structs.replace(other, alert_id="another-commune1", scope="commune:16681")
    for event in (fired, other):
        record_as_the_worker_does(settings.database_url, event)
    app = create_app(settings)
    ctx: ApiContext = app.state.ioc
    subject = "nguyen.van.an@namdan"
    commune = {"Authorization": f"Bearer {create_token(settings, 'commune', commune='17935', subject=subject)}"}
    with TestClient(app) as client:
        listed = client.get("/api/alerts?state=active", headers=commune).json()
        assert [a["alert_id"] for a in listed["items"]] == [fired.alert_id]  # not the other commune's
        assert client.post(f"/api/alerts/{other.alert_id}/ack", headers=commune).status_code == 404

        response = client.post(f"/api/alerts/{fired.alert_id}/ack", json={"reason": "đã cử đội"}, headers=commune)
        assert response.status_code == 200, response.text
        assert client.post(f"/api/alerts/{fired.alert_id}/ack", headers=commune).status_code == 409

        detail = client.get(f"/api/alerts/{fired.alert_id}", headers=commune).json()
        assert detail["alert"]["state"] == "acknowledged" and detail["alert"]["acknowledged_by"] == subject
        assert [(e["state"], e["by"]) for e in detail["events"]] == [("firing", "system"), ("acknowledged", subject)]

        # the API's own feed sees the event come back from the topic, for the walls
        deadline = time.monotonic() + 30
        while not any(a.get("by") == subject for a in ctx.live.recent_alerts):
            assert time.monotonic() < deadline, "the acknowledgement never reached the live feed"
            time.sleep(0.05)

    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state, by, at, event->>'reason' FROM alert_event WHERE alert_id = %s ORDER BY at",
            (fired.alert_id,),
        ).fetchall()
        current = conn.execute(
            "SELECT state, alert->>'acknowledged_by', updated_at FROM alert_current WHERE alert_id = %s",
            (fired.alert_id,),
        ).fetchone()
    assert [(r[0], r[1], r[3]) for r in rows] == [("firing", "system", None), ("acknowledged", subject, "đã cử đội")]
    acked_at = rows[1][2]
    assert started < acked_at <= dt.datetime.now(dt.UTC)
    assert current == ("acknowledged", subject, acked_at)

    ((key, event),) = asyncio.run(read_alert_events(settings, 1))
    assert key == fired.fingerprint.encode()
    assert (event.alert_id, event.state, event.by, event.reason, event.at) == (
        fired.alert_id, AlertState.ACKNOWLEDGED, subject, "đã cử đội", acked_at
    )  # fmt: skip


def test_silences_are_stored_listed_and_expired_with_who_and_when(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ensure_topics(settings)
    app = create_app(settings)
    operator = {"Authorization": f"Bearer {create_token(settings, 'operator', subject='truc.ban')}"}
    starts = dt.datetime.now(VN).replace(microsecond=0).isoformat()
    body = {"matchers": {"rule": "env.*", "scope": "commune:17935"}, "starts_at": starts, "duration": "2h",
            "reason": "bảo trì trạm"}  # fmt: skip
    with TestClient(app) as client:
        created = client.post("/api/silences", json=body, headers=operator)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        again = client.post("/api/silences", json=body, headers=operator)  # the same content is the same silence
        assert again.status_code == 200 and again.json()["id"] == sid
        assert [s["id"] for s in client.get("/api/silences", headers=operator).json()["items"]] == [sid]
        expired = client.delete(f"/api/silences/{sid}", headers=operator).json()
        assert expired["status"] == "expired" and expired["expired_by"] == "truc.ban"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT matchers, created_by, reason, expired_by, expired_at IS NOT NULL, ends_at - starts_at"
            " FROM alert_silence WHERE id = %s",
            (sid,),
        ).fetchone()
    assert row == (
        {"rule": ["env.*"], "scope": ["commune:17935"]}, "truc.ban", "bảo trì trạm", "truc.ban", True,
        dt.timedelta(hours=2),
    )  # fmt: skip
