"""The worker's alerting: a critical incident fires an alert (audited, on `ioc.alerts`); an operator's
acknowledgement arriving on `ioc.alerts` reaches the engine."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from alerts import AlertEvent, AlertState
from alerts.engine import operator_event
from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import TOPIC_ALERTS, TOPIC_CYBER, Settings
from streams.worker import Ingest

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))


async def _scenario(settings: Settings) -> tuple[list[AlertEvent], AlertState | None]:
    now = dt.datetime.now(VN)
    incident = {
        "schema": "ioc.incident.v1", "event_id": "e-crit-1", "incident_id": "SOC-TEST-1", "type": "detected",
        "occurred_at": (now - dt.timedelta(seconds=5)).isoformat(), "severity": "critical", "category": "ddos",
        "system": "dichvucong.nghean.gov.vn", "system_level": 3, "agency_code": "000.00.16.H40",
        "source_ip": "203.0.113.9", "title": "DDoS on the public-service portal",
    }  # fmt: skip
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    watcher = AIOKafkaConsumer(
        settings.topic(TOPIC_ALERTS), bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest"
    )
    await watcher.start()
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    listening = asyncio.create_task(ingest.alerting.listen())
    try:
        await producer.send_and_wait(settings.topic(TOPIC_CYBER), json.dumps(incident).encode(), key=b"SOC-TEST-1")
        assert ingest.consumer is not None
        while ingest.stats["records"] < 1:
            batch = await ingest.gather(500)
            if batch:
                await ingest.process(batch)
        await ingest.drain()
        await ingest.emit()
        seen: list[AlertEvent] = []
        deadline = asyncio.get_running_loop().time() + 20
        while not any(e.state is AlertState.FIRING and "SOC-TEST-1" in e.triggered_by for e in seen):
            assert asyncio.get_running_loop().time() < deadline, f"no firing alert on ioc.alerts: {seen}"
            for records in (await watcher.getmany(timeout_ms=500)).values():
                seen.extend(msgspec.json.decode(r.value, type=AlertEvent) for r in records)
        fired = next(e for e in seen if e.state is AlertState.FIRING and "SOC-TEST-1" in e.triggered_by)
        # The API's acknowledgement: built with operator_event, published to ioc.alerts.
        alert = ingest.alerting.engine.get(fired.alert_id)
        assert alert is not None
        ack = operator_event(alert, AlertState.ACKNOWLEDGED, "soc.analyst", dt.datetime.now(VN), "looking into it")
        await producer.send_and_wait(
            settings.topic(TOPIC_ALERTS), msgspec.json.encode(ack), key=ack.fingerprint.encode()
        )
        state = None
        for _ in range(40):
            current = ingest.alerting.engine.get(fired.alert_id)
            state = current.state if current else None
            if state is AlertState.ACKNOWLEDGED:
                break
            await asyncio.sleep(0.25)
        return seen, state
    finally:
        listening.cancel()
        await ingest.stop()
        await watcher.stop()
        await producer.stop()


def test_critical_incident_fires_an_audited_alert_and_an_ack_from_the_api_reaches_the_engine(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    seen, state = asyncio.run(_scenario(settings))
    assert state is AlertState.ACKNOWLEDGED
    fired = next(e for e in seen if e.state is AlertState.FIRING and "SOC-TEST-1" in e.triggered_by)
    assert fired.severity.value == "critical" and fired.domain == "cyber" and fired.by == "system"
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT state, by FROM alert_event WHERE alert_id = %s ORDER BY at", (fired.alert_id,)
        ).fetchall()
        current = conn.execute(
            "SELECT state, rule FROM alert_current WHERE alert_id = %s", (fired.alert_id,)
        ).fetchone()
    assert ("firing", "system") in rows
    assert current is not None and current[1] == fired.rule


async def _second_lifetime(settings: Settings) -> tuple[int, list[str]]:
    """A worker that starts after the first: it re-reads the incident (a new consumer group) and
    restores the open alert from the database."""
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    try:
        assert ingest.consumer is not None
        while ingest.stats["records"] < 1:
            batch = await ingest.gather(500)
            if batch:
                await ingest.process(batch)
        await ingest.drain()
        await ingest.emit()
        return len(ingest.alerting.engine.active()), [e.state.value for e in ingest.alerting.take()]
    finally:
        await ingest.stop()


def test_a_restarted_worker_restores_open_alerts_instead_of_firing_them_again(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    seen, _ = asyncio.run(_scenario(settings))
    firing = [e for e in seen if e.state is AlertState.FIRING and "SOC-TEST-1" in e.triggered_by]
    assert len(firing) == 1
    again = settings.model_copy(update={"consumer_group": settings.consumer_group + "-2"})
    open_alerts, new_events = asyncio.run(_second_lifetime(again))
    assert open_alerts >= 1
    assert "firing" not in new_events
    with psycopg.connect(settings.database_url) as conn:
        fired = conn.execute(
            "SELECT count(*) FROM alert_event WHERE state = 'firing' AND event->'triggered_by' ? 'SOC-TEST-1'"
        ).fetchone()
    assert fired == (1,)
