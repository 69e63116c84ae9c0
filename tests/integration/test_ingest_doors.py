"""Both doors end to end with clients no one here wrote: `curl` for HTTP ingest, Debian's `mosquitto_pub` for MQTT.

The worker, the API and the MQTT bridge run as processes (as `ioc dev` runs them) against the
session's broker and database and a real mosquitto. Counts are exact: each accepted record reaches
its topic once and moves the KPIs once; each rejected one is answered (HTTP) or dead-lettered (MQTT).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from entrypoints.embedded.mosquitto import BRIDGE_USER, DEV_USER, EmbeddedMosquitto
from ioc.settings import Settings
from tests.integration.conftest import env_for, free_port, start_components, stop_components

pytestmark = pytest.mark.integration

VN = dt.timezone(dt.timedelta(hours=7))
DOSSIER = "ioc.dossier.events"
SENSOR = "ioc.sensor.readings"
CYBER = "ioc.cyber.incidents"
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def mosquitto() -> Iterator[EmbeddedMosquitto]:
    with EmbeddedMosquitto() as broker:
        yield broker


@pytest.fixture
def doors(make_settings: Callable[..., Settings], mosquitto: EmbeddedMosquitto) -> Iterator[Settings]:
    """Worker, API and MQTT bridge processes; the settings carry the API port and the bridge's MQTT URL."""
    settings = make_settings(
        api_port=free_port(),
        mqtt_url=mosquitto.url(BRIDGE_USER),
        mqtt_client_id=f"bridge-{time.monotonic_ns()}",
        ingest_max_body_bytes=256 * 1024,
        ingest_max_records=500,
        ingest_rate=200,
        ingest_burst=400,
    )
    ensure_topics(settings)
    env = env_for(settings)
    env.update(
        IOC_MQTT_URL=mosquitto.url(BRIDGE_USER),
        IOC_MQTT_CLIENT_ID=settings.mqtt_client_id,
        IOC_MQTT_BRIDGE_METRICS_PORT="0",
        IOC_INGEST_MAX_BODY_BYTES=str(settings.ingest_max_body_bytes),
        IOC_INGEST_MAX_RECORDS=str(settings.ingest_max_records),
        IOC_INGEST_RATE=str(settings.ingest_rate),
        IOC_INGEST_BURST=str(settings.ingest_burst),
    )
    procs = start_components(env, ("worker", "api", "mqtt-bridge"), settings.api_port)
    try:
        _wait_subscribed(mosquitto, settings.mqtt_client_id)
        yield settings
    finally:
        stop_components(procs)


def _wait_subscribed(mosquitto: EmbeddedMosquitto, client_id: str) -> None:
    """Until the broker logs the bridge's subscription (readings published before it would be dropped)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if f"{client_id} 1 ioc/sensors/+" in mosquitto.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"the bridge did not subscribe; broker log:\n{mosquitto.log_path.read_text()[-2000:]}")


def curl(url: str, token: str, body: bytes, content_type: str, tmp: Path) -> tuple[int, dict[str, Any], str]:
    """POST with curl; (status, JSON body, the raw response headers)."""
    data, head = tmp / f"body-{time.monotonic_ns()}", tmp / f"head-{time.monotonic_ns()}"
    data.write_bytes(body)
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", url, "-H", f"Authorization: Bearer {token}", "-H", f"Content-Type: {content_type}",
         "--data-binary", f"@{data}", "-D", str(head), "-w", "\n%{http_code}"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    text, _, status = out.stdout.decode().rpartition("\n")
    return int(status), json.loads(text) if text.strip() else {}, head.read_text()


def mosquitto_pub(
    broker: EmbeddedMosquitto, topic: str, payload: bytes | None = None, *, lines: bytes | None = None
) -> None:
    """Publish at QoS 1 as the development user (``lines``: one message per line, ``-l``)."""
    tool = shutil.which("mosquitto_pub")
    assert tool, "mosquitto_pub missing: install mosquitto-clients (scripts/setup)"
    cmd = [tool, "-h", broker.host, "-p", str(broker.port), "-u", DEV_USER, "-P", broker.passwords[DEV_USER],
           "-q", "1", "-t", topic]  # fmt: skip
    if lines is not None:
        subprocess.run([*cmd, "-l"], input=lines, check=True, timeout=60)
    else:
        assert payload is not None
        subprocess.run([*cmd, "-s"], input=payload, check=True, timeout=60)


def operator(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(settings, 'operator')}"}


def wait_kpi(settings: Settings, kpi: str, scope: str, window: str, want: float) -> float | None:
    """The KPI's value once it equals ``want`` (or the last value seen at the deadline)."""
    deadline, value = time.monotonic() + DEADLINE_S, None
    url = f"http://127.0.0.1:{settings.api_port}/api/kpis"
    while time.monotonic() < deadline:
        items = httpx.get(
            url, params={"kpi": kpi, "scope": scope, "window": window}, headers=operator(settings)
        ).json()["items"]
        value = items[0]["value"] if items else None
        if value == want:
            return value
        time.sleep(0.3)
    return value


async def _read(settings: Settings, topic: str) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        name = settings.topic(topic)
        if name in await consumer.topics() and consumer.partitions_for_topic(name) is None:
            # Kafka's answer to the bootstrap lists no topics (api/feed.py): load every topic's metadata.
            await consumer._client.force_metadata_update()
        parts = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or [])]
        if not parts:
            return []
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        records: list[Any] = []
        for tp in parts:
            consumer.seek(tp, 0)
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for recs in batch.values():
                records.extend(recs)
        # the embedded broker's end offsets were seen to lag what it holds: take what is left
        for recs in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(recs)
        return records
    finally:
        await consumer.stop()


def records_of(settings: Settings, topic: str, want: int) -> list[Any]:
    """The topic's records once it holds ``want`` (or what it holds at the deadline)."""
    deadline, found = time.monotonic() + DEADLINE_S, []
    while time.monotonic() < deadline:
        found = asyncio.run(_read(settings, topic))
        if len(found) >= want:
            return found
        time.sleep(0.3)
    return found


def dossier(i: int, now: dt.datetime, **fields: Any) -> bytes:
    return orjson.dumps(
        {
            "schema": "ioc.dossier.v1",
            "event_id": f"curl-{i}",
            "dossier_id": f"CURL-{i:04d}",
            "type": "received",
            "occurred_at": now.isoformat(),
            "commune_code": "17935",
            "agency_code": "A-CURL",
            "channel": "online",
            "full_online": True,
            "due_at": (now + dt.timedelta(days=5)).isoformat(),
            **fields,
        }
    )


def test_http_ingest_with_curl_counts_each_accepted_dossier_once(doors: Settings, tmp_path: Path) -> None:
    settings, now = doors, dt.datetime.now(VN)
    url = f"http://127.0.0.1:{settings.api_port}/api/ingest/{DOSSIER}"
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    good = [dossier(i, now) for i in range(20)]
    hostile = [b'{"schema": "ioc.dossier.v1", "event_id": ', dossier(99, now, commune_code="99999"), b"[]"]
    body = b"\n".join([*good[:10], good[3], *hostile, *good[10:]])
    status, answer, _ = curl(url, token, body, "application/x-ndjson", tmp_path)
    assert status == 200, answer
    assert (answer["accepted"], answer["duplicate"], answer["rejected"]) == (20, 1, 3)
    rejected = [r for r in answer["results"] if r["status"] == "rejected"]
    assert [r["index"] for r in rejected] == [11, 12, 13]
    assert "not valid UTF-8 JSON" in rejected[0]["reason"] and "unknown commune '99999'" in rejected[1]["reason"]

    # the retry of the whole request changes nothing; a malformed single event is a 422 with the reason
    status, again, _ = curl(url, token, body, "application/x-ndjson", tmp_path)
    assert (status, again["accepted"], again["duplicate"], again["rejected"]) == (200, 0, 21, 3)
    status, bad, _ = curl(url, token, b'{"schema": "ioc.dossier.v1"', "application/json", tmp_path)
    assert status == 422 and bad["results"][0]["stage"] == "decode"

    assert wait_kpi(settings, "dossier.received", "commune:17935", "today", 20) == 20
    assert len(records_of(settings, DOSSIER, 20)) == 20  # rejected records never reached the topic
    assert records_of(settings, "ioc.deadletter", 0) == []


def test_http_hostile_input_is_answered_and_counts_nowhere(doors: Settings, tmp_path: Path) -> None:
    settings, now = doors, dt.datetime.now(VN)
    base = f"http://127.0.0.1:{settings.api_port}/api/ingest"
    token = create_token(settings, "producer", source="hydro", topics=[SENSOR], stations=["WL-NAMDAN"])
    reading = {"schema": "ioc.sensor.v1", "event_id": "h-1", "station_id": "WL-DUA", "kind": "water",
               "observed_at": now.isoformat(), "values": {"water_level_m": 20.0}}  # fmt: skip
    status, answer, _ = curl(f"{base}/{SENSOR}", token, orjson.dumps(reading), "application/json", tmp_path)
    assert status == 422 and answer["results"][0]["stage"] == "rights"  # another station's reading
    status, answer, _ = curl(f"{base}/{SENSOR}", token, b"x" * 300_000, "application/x-ndjson", tmp_path)
    assert status == 413 and "limit" in answer["detail"]
    status, answer, _ = curl(f"{base}/{SENSOR}", token, b"{}\n" * 501, "application/x-ndjson", tmp_path)
    assert status == 413 and "at most 500" in answer["detail"]
    status, answer, _ = curl(f"{base}/{DOSSIER}", token, b"{}", "application/json", tmp_path)
    assert status == 403
    # a flood, bounded: 10 requests of 100 readings against a bucket of 400 at 200/s
    accepted, limited = 0, 0
    for n in range(10):
        lines = b"\n".join(
            orjson.dumps({**reading, "event_id": f"flood-{n}-{i}", "station_id": "WL-NAMDAN",
                          "observed_at": (now - dt.timedelta(seconds=n * 100 + i)).isoformat(), "values": {"water_level_m": 5.0}})
            for i in range(100)
        )  # fmt: skip
        status, answer, headers = curl(f"{base}/{SENSOR}", token, lines, "application/x-ndjson", tmp_path)
        if status == 429:
            limited += 1
            assert "retry-after:" in headers.lower()
        else:
            assert status == 200 and answer["rejected"] == 0
            accepted += answer["accepted"]
    assert limited > 0 and accepted >= 400
    assert len(records_of(settings, SENSOR, accepted)) == accepted


def test_wazuh_alert_through_the_webhook_opens_an_incident(doors: Settings, tmp_path: Path) -> None:
    settings = doors
    url = f"http://127.0.0.1:{settings.api_port}/api/ingest/siem/wazuh?agency_code=STTTT"
    token = create_token(settings, "producer", source="wazuh", topics=[CYBER])
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
    alert = {"timestamp": stamp, "id": "1764903845.42", "manager": {"name": "wm1"},
             "rule": {"level": 12, "description": "Web attack", "id": "31106", "groups": ["web", "attack"]},
             "agent": {"id": "003", "name": "dichvucong.nghean.gov.vn"}, "data": {"srcip": "203.0.113.9"}}  # fmt: skip
    status, answer, _ = curl(url, token, orjson.dumps(alert), "application/json", tmp_path)
    assert (status, answer["accepted"]) == (200, 1), answer
    status, answer, _ = curl(url, token, orjson.dumps(alert), "application/json", tmp_path)
    assert (status, answer["duplicate"]) == (200, 1)
    status, answer, _ = curl(url, token, orjson.dumps({**alert, "rule": {}}), "application/json", tmp_path)
    assert status == 422 and answer["results"][0]["field"] == "rule.level"
    assert wait_kpi(settings, "cyber.open", "province", "now", 1) == 1
    [record] = records_of(settings, CYBER, 1)
    event = orjson.loads(record.value)
    assert (event["severity"], event["category"], event["agency_code"]) == ("high", "intrusion", "STTTT")


def test_mqtt_readings_with_mosquitto_pub_move_the_station_and_bad_ones_are_dead_lettered(
    doors: Settings, mosquitto: EmbeddedMosquitto
) -> None:
    settings, now = doors, dt.datetime.now(VN).replace(microsecond=0)
    compact = orjson.dumps({"t": now.isoformat(), "v": {"water_level_m": 6.1}})
    mosquitto_pub(mosquitto, "ioc/sensors/WL-NAMDAN", compact)
    assert wait_kpi(settings, "water.level_m", "station:WL-NAMDAN", "now", 6.1) == 6.1
    mosquitto_pub(mosquitto, "ioc/sensors/WL-NAMDAN", compact)  # re-sent: the same event_id

    full_dua = {"schema": "ioc.sensor.v1", "event_id": "mq-dua-1", "station_id": "WL-DUA", "kind": "water",
                "observed_at": now.isoformat(), "values": {"water_level_m": 21.5}}  # fmt: skip
    hostile = [
        ("ioc/sensors/WL-NAMDAN", b"{not json"),
        ("ioc/sensors/NO-SUCH-STATION", compact),
        ("ioc/sensors/WL-NAMDAN", orjson.dumps(full_dua)),  # WL-DUA's reading on WL-NAMDAN's topic
        ("ioc/sensors/WL-NAMDAN", orjson.dumps({"t": now.isoformat(), "v": {"water_level_m": -3}})),
        ("ioc/sensors/WL-NAMDAN", b'{"t": "' + b"x" * 70_000 + b'"}'),
    ]
    for topic, payload in hostile:
        mosquitto_pub(mosquitto, topic, payload)
    mosquitto_pub(mosquitto, "ioc/sensors/WL-DUA", orjson.dumps(full_dua))
    # a flood, bounded: 300 readings of one station in one mosquitto_pub -l
    flood = b"\n".join(
        orjson.dumps({"t": (now - dt.timedelta(minutes=10 + i)).isoformat(), "v": {"water_level_m": 5.0}})
        for i in range(300)
    )
    mosquitto_pub(mosquitto, "ioc/sensors/WL-NAMDAN", lines=flood)

    assert wait_kpi(settings, "water.level_m", "station:WL-DUA", "now", 21.5) == 21.5
    dead = records_of(settings, "ioc.deadletter", len(hostile))
    assert len(dead) == len(hostile)
    headers = [{k: v.decode() for k, v in r.headers} for r in dead]
    assert sorted(h["ioc.source.topic"] for h in headers) == sorted(t for t, _ in hostile)
    reasons = " | ".join(h["ioc.error.reason"] for h in headers)
    for part in (
        "not valid UTF-8 JSON",
        "unknown station 'NO-SUCH-STATION'",
        "published on the topic of station 'WL-NAMDAN'",
        "outside",
        "exceeds",
    ):
        assert part in reasons
    readings = records_of(settings, SENSOR, 302)
    assert len(readings) == 302  # 1 + WL-DUA's 1 + 300 flood; the re-sent one is not produced again
    assert {r.key for r in readings} == {b"WL-NAMDAN", b"WL-DUA"}
    assert wait_kpi(settings, "water.level_m", "station:WL-NAMDAN", "now", 6.1) == 6.1  # the flood was older


def test_mqtt_rain_resent_counts_once_in_the_sums(doors: Settings, mosquitto: EmbeddedMosquitto) -> None:
    settings, now = doors, dt.datetime.now(VN).replace(microsecond=0)
    first = orjson.dumps({"t": (now - dt.timedelta(minutes=10)).isoformat(), "v": {"rain_mm": 2.5}})
    second = orjson.dumps({"t": now.isoformat(), "v": {"rain_mm": 1.0}})
    for payload in (first, first, second, first):
        mosquitto_pub(mosquitto, "ioc/sensors/RAIN-16690", payload)
    assert wait_kpi(settings, "rain.mm", "station:RAIN-16690", "1h", 3.5) == 3.5
    assert len(records_of(settings, SENSOR, 2)) == 2


def test_simulator_sends_sensor_readings_over_mqtt(
    make_settings: Callable[..., Settings], mosquitto: EmbeddedMosquitto, tmp_path: Path
) -> None:
    settings = make_settings(database_url="postgresql://unused@127.0.0.1:1/x")
    ensure_topics(settings)
    tool = shutil.which("mosquitto_sub")
    assert tool, "mosquitto_sub missing: install mosquitto-clients (scripts/setup)"
    sub = subprocess.Popen(
        [tool, "-h", mosquitto.host, "-p", str(mosquitto.port), "-u", DEV_USER, "-P", mosquitto.passwords[DEV_USER],
         "-q", "1", "-t", "ioc/sensors/+", "-v", "-W", "60", "-C", "20", "-i", "sim-watch"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_subscribed(mosquitto, "sim-watch")
        env = {**env_for(settings), "IOC_MQTT_URL": mosquitto.url()}
        done = subprocess.run(
            [sys.executable, "-m", "entrypoints.cli", "simulate", "--sensors-via", "mqtt", "--rate", "20", "--duration", "2",
             "--history", "0.5", "--no-progress", "--seed", "7"],
            env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        out, _ = sub.communicate(timeout=60)
    finally:
        sub.kill()
    lines = out.decode().splitlines()
    assert len(lines) == 20
    for line in lines:
        topic, _, payload = line.partition(" ")
        event = orjson.loads(payload)
        assert topic == f"ioc/sensors/{event['station_id']}" and event["schema"] == "ioc.sensor.v1"


def test_the_api_starts_during_a_broker_outage_and_ingest_answers_503_until_it_ends(
    make_settings: Callable[..., Settings],
) -> None:
    """The door's producer connects in the background: the API serves its other routes meanwhile."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    settings = make_settings(kafka_bootstrap="127.0.0.1:1")
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=7))).replace(microsecond=0)
    event = {
        "schema": "ioc.dossier.v1", "event_id": "outage-1", "dossier_id": "D-outage-1", "type": "received",
        "occurred_at": now.isoformat(), "commune_code": "17935", "agency_code": "A1", "channel": "online",
        "full_online": True, "due_at": (now + dt.timedelta(days=3)).isoformat(),
    }  # fmt: skip
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        r = client.post(
            f"/api/ingest/{DOSSIER}",
            content=orjson.dumps(event),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After")
