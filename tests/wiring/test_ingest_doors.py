"""The ingest doors without services: checks at the door, producer tokens, the Wazuh mapping, limits, the route's answers."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import create_token, verify_token
from api.ingest import TokenBucket
from ioc.errors import ConfigurationError, InvalidEvent
from ioc.ingest import Overloaded, RecentIds
from ioc.registry import load_registry
from ioc.settings import Settings
from streams import door, wazuh

REGISTRY = load_registry(None, None, None)
NOW = dt.datetime.now(dt.timezone(dt.timedelta(hours=7))).replace(microsecond=0)
NOW_US = int(NOW.timestamp() * 1_000_000)
SENSOR = "ioc.sensor.readings"
DOSSIER = "ioc.dossier.events"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://nobody@127.0.0.1:1/x")


def dossier(event_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": "ioc.dossier.v1",
        "event_id": event_id,
        "dossier_id": f"D-{event_id}",
        "type": "received",
        "occurred_at": NOW.isoformat(),
        "commune_code": "17935",
        "agency_code": "A1",
        "channel": "online",
        "full_online": True,
        "due_at": (NOW + dt.timedelta(days=3)).isoformat(),
        **fields,
    }


# --- checks at the door -------------------------------------------------------------------------


def test_compact_reading_takes_station_from_topic_and_kind_from_registry() -> None:
    payload = orjson.dumps({"t": NOW.isoformat(), "v": {"water_level_m": 6.1}})
    checked, value = door.sensor_from_mqtt("ioc/sensors/WL-NAMDAN", payload, REGISTRY, NOW_US)
    event = orjson.loads(value)
    assert (checked.key, event["kind"], event["station_id"]) == ("WL-NAMDAN", "water", "WL-NAMDAN")
    assert checked.event_id == door.compact_event_id("WL-NAMDAN", NOW_US)


def test_compact_reading_resent_keeps_its_event_id() -> None:
    payload = orjson.dumps({"t": NOW.isoformat(), "v": {"water_level_m": 6.1}})
    first, _ = door.sensor_from_mqtt("ioc/sensors/WL-NAMDAN", payload, REGISTRY, NOW_US)
    again, _ = door.sensor_from_mqtt("ioc/sensors/WL-NAMDAN", payload, REGISTRY, NOW_US + 5_000_000)
    assert first.event_id == again.event_id


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("ioc/sensors/WL-NAMDAN", b"{not json", "not valid UTF-8 JSON"),
        ("ioc/sensors/NOPE", b'{"t": "2026-12-05T10:00:00+07:00", "v": {"water_level_m": 1}}', "unknown station"),
        ("ioc/sensors/WL-NAMDAN", b'{"t": "2026-12-05T10:00:00+07:00", "v": {"water_level_m": -1}}', "outside"),
        ("ioc/sensors/WL-NAMDAN", b'{"t": "2026-12-05T10:00:00", "v": {"water_level_m": 1}}', "no UTC offset"),
        ("ioc/sensors/WL-NAMDAN", b'{"t": "2026-12-05T10:00:00+07:00", "v": {"pm25": 1}}', "not a water value"),
        ("ioc/other/WL-NAMDAN", b"{}", "not a sensor topic"),
        ("ioc/sensors/WL-NAMDAN", b"x" * 70_000, "exceeds"),
    ],
)
def test_bad_mqtt_readings_are_refused_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        door.sensor_from_mqtt(topic, payload, REGISTRY, NOW_US)


def test_a_station_publishing_on_another_stations_topic_is_refused() -> None:
    full = {
        "schema": "ioc.sensor.v1",
        "event_id": "e1",
        "station_id": "WL-DUA",
        "kind": "water",
        "observed_at": NOW.isoformat(),
        "values": {"water_level_m": 20.0},
    }
    with pytest.raises(InvalidEvent, match="published on the topic of station 'WL-NAMDAN'"):
        door.sensor_from_mqtt("ioc/sensors/WL-NAMDAN", orjson.dumps(full), REGISTRY, NOW_US)
    checked, value = door.sensor_from_mqtt("ioc/sensors/WL-DUA", orjson.dumps(full), REGISTRY, NOW_US)
    assert (checked.key, value) == ("WL-DUA", orjson.dumps(full))


def test_split_ndjson_skips_blank_lines() -> None:
    assert door.split_ndjson(b'{"a":1}\r\n\n  \n{"b":2}') == [b'{"a":1}', b'{"b":2}']


# --- Wazuh ------------------------------------------------------------------------------------

ALERT = {
    "timestamp": "2026-12-05T03:04:05.123+0000",
    "rule": {
        "level": 10,
        "description": "sshd: brute force",
        "id": "5712",
        "groups": ["sshd", "authentication_failures"],
    },
    "agent": {"id": "003", "name": "dichvucong.nghean.gov.vn"},
    "manager": {"name": "wm1"},
    "id": "1764903845.1234567",
    "data": {"srcip": "203.0.113.9"},
}


def test_wazuh_alert_maps_to_a_detected_incident_the_worker_accepts() -> None:
    raw = wazuh.incident_from_alert(ALERT, agency_code="STTTT")
    event = orjson.loads(raw)
    assert event["incident_id"] == "wazuh:wm1:1764903845.1234567"
    assert (event["severity"], event["category"], event["source_ip"]) == ("medium", "brute_force", "203.0.113.9")
    assert event["occurred_at"] == "2026-12-05T10:04:05.123000+07:00"
    checked = door.check("ioc.cyber.incidents", raw, REGISTRY, NOW_US + 10**13)
    assert checked.key == event["incident_id"]


def test_wazuh_alert_wrapped_by_the_shuffle_integration_maps_the_same() -> None:
    wrapped = {"severity": 3, "title": "x", "id": ALERT["id"], "all_fields": ALERT}
    assert wazuh.incident_from_alert(wrapped) == wazuh.incident_from_alert(ALERT)


@pytest.mark.parametrize(
    ("level", "severity"), [(0, "low"), (6, "low"), (7, "medium"), (11, "medium"), (12, "high"), (15, "critical")]
)
def test_wazuh_levels_map_to_severities(level: int, severity: str) -> None:
    assert wazuh.severity_of(level) == severity


def test_wazuh_alert_without_a_level_is_refused() -> None:
    with pytest.raises(InvalidEvent, match=r"rule\.level"):
        wazuh.incident_from_alert({**ALERT, "rule": {"description": "x"}})


# --- tokens and limits ------------------------------------------------------------------------


def test_producer_token_names_its_source_topics_and_stations(settings: Settings) -> None:
    token = create_token(settings, "producer", source="hydro", topics=[SENSOR], stations=["WL-NAMDAN"])
    p = verify_token(settings, token)
    assert (p.subject, p.source, p.topics, p.stations) == ("producer:hydro", "hydro", (SENSOR,), ("WL-NAMDAN",))
    assert p.may_write(SENSOR) and not p.may_write(DOSSIER)
    assert p.may_report_for("WL-NAMDAN") and not p.may_report_for("WL-DUA")
    assert not p.can_see_scope("province")


@pytest.mark.parametrize(
    "claims",
    [
        {"topics": [DOSSIER]},
        {"source": "x", "topics": []},
        {"source": "x", "topics": ["ioc.kpi.updates"]},
        {"source": "x", "topics": [SENSOR]},
    ],
)
def test_bad_producer_tokens_are_not_issued(settings: Settings, claims: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        create_token(settings, "producer", **claims)


def test_token_bucket_refuses_beyond_the_burst_and_refills_at_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    assert bucket.take(20, now=bucket.at) == 0.0
    assert bucket.take(5, now=bucket.at) == pytest.approx(0.5)
    assert bucket.take(5, now=bucket.at + 0.5) == 0.0


def test_recent_ids_forget_the_oldest() -> None:
    recent = RecentIds(2)
    for i in range(3):
        recent.add(("t", str(i)))
    assert ("t", "0") not in recent and ("t", "2") in recent and len(recent) == 2


# --- the route, with a sink standing in for the broker ----------------------------------------


class FakeSink:
    def __init__(self, max_in_flight: int = 1000, fail: bool = False) -> None:
        self.recent = RecentIds(100)
        self.pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.sent: list[tuple[str, bytes | None, bytes]] = []
        self.in_flight = 0
        self.max_in_flight = max_in_flight
        self.fail = fail

    def reserve(self, n: int) -> None:
        if self.in_flight + n > self.max_in_flight:
            raise Overloaded(self.in_flight, self.max_in_flight)
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Any = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(RuntimeError("broker down"))
        else:
            self.sent.append((topic, key, value))
            future.set_result(None)
        return future


def client_with(settings: Settings, sink: FakeSink) -> TestClient:
    app = create_app(settings, connect=False)
    app.state.ingest.sink = sink
    return TestClient(app)


def post(client: TestClient, token: str, topic: str, body: bytes, ndjson: bool = True) -> Any:
    kind = "application/x-ndjson" if ndjson else "application/json"
    return client.post(
        f"/api/ingest/{topic}", content=body, headers={"Authorization": f"Bearer {token}", "Content-Type": kind}
    )


def test_a_batch_is_answered_per_record_and_only_valid_records_are_sent(settings: Settings) -> None:
    sink = FakeSink()
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    lines = [orjson.dumps(dossier("a")), orjson.dumps(dossier("a")), b"{oops", orjson.dumps(dossier("b", type="bogus"))]
    with client_with(settings, sink) as client:
        r = post(client, token, DOSSIER, b"\n".join(lines))
        again = post(client, token, DOSSIER, lines[0])
    assert r.status_code == 200
    body = r.json()
    assert [x["status"] for x in body["results"]] == ["accepted", "duplicate", "rejected", "rejected"]
    assert (body["results"][2]["stage"], body["results"][3]["stage"]) == ("decode", "schema")
    assert len(sink.sent) == 1 and sink.sent[0][1] == b"D-a"
    assert again.json()["duplicate"] == 1 and len(sink.sent) == 1


def test_a_single_rejected_event_is_a_422_with_the_reason(settings: Settings) -> None:
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    with client_with(settings, FakeSink()) as client:
        r = post(client, token, DOSSIER, orjson.dumps(dossier("a", channel=None)), ndjson=False)
    assert r.status_code == 422
    assert r.json()["results"][0]["reason"] == "channel: required on a received event"


def test_rights_limits_and_content_types(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        kafka_bootstrap="127.0.0.1:1",
        database_url="postgresql://nobody@127.0.0.1:1/x",
        ingest_max_body_bytes=4096,
        ingest_max_records=3,
        ingest_rate=1,
        ingest_burst=5,
    )
    producer = create_token(settings, "producer", source="hydro", topics=[SENSOR], stations=["WL-NAMDAN"])
    operator = create_token(settings, "operator")
    reading = {
        "schema": "ioc.sensor.v1",
        "event_id": "r1",
        "station_id": "WL-DUA",
        "kind": "water",
        "observed_at": NOW.isoformat(),
        "values": {"water_level_m": 20.0},
    }
    sink = FakeSink()
    with client_with(settings, sink) as client:
        assert post(client, operator, SENSOR, b"{}").status_code == 403
        assert post(client, producer, DOSSIER, b"{}").status_code == 403
        assert post(client, producer, "ioc.kpi.updates", b"{}").status_code == 404
        assert client.get("/api/kpis", headers={"Authorization": f"Bearer {producer}"}).status_code == 403
        assert (
            client.post(
                f"/api/ingest/{SENSOR}",
                content=b"{}",
                headers={"Authorization": f"Bearer {producer}", "Content-Type": "text/plain"},
            ).status_code
            == 415
        )
        assert post(client, producer, SENSOR, b"x" * 5000).status_code == 413
        assert post(client, producer, SENSOR, b"{}\n" * 4).status_code == 413
        r = post(client, producer, SENSOR, orjson.dumps(reading), ndjson=False)
        assert r.status_code == 422 and r.json()["results"][0]["stage"] == "rights"
        r = post(client, producer, SENSOR, b"{}\n{}\n{}")  # of the burst of 5: 1 + 3 taken, 1 left
        limited = post(client, producer, SENSOR, b"{}\n{}\n{}")
    assert r.status_code == 200
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert sink.sent == []


def test_a_reading_of_an_unknown_station_is_rejected_even_for_every_station(settings: Settings) -> None:
    token = create_token(settings, "producer", source="hydro", topics=[SENSOR], stations=["*"])
    reading = {"schema": "ioc.sensor.v1", "event_id": "u1", "station_id": "NOPE", "kind": "water",
               "observed_at": NOW.isoformat(), "values": {"water_level_m": 1.0}}  # fmt: skip
    sink = FakeSink()
    with client_with(settings, sink) as client:
        r = post(client, token, SENSOR, orjson.dumps(reading), ndjson=False)
        ok = post(client, token, SENSOR, orjson.dumps({**reading, "station_id": "WL-DUA"}), ndjson=False)
    assert r.status_code == 422 and "unknown station 'NOPE'" in r.json()["results"][0]["reason"]
    assert ok.status_code == 200 and [k for _, k, _ in sink.sent] == [b"WL-DUA"]


def test_a_full_in_flight_queue_is_a_429_and_a_broker_failure_a_503(settings: Settings) -> None:
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    with client_with(settings, FakeSink(max_in_flight=0)) as client:
        full = post(client, token, DOSSIER, orjson.dumps(dossier("a")))
    with client_with(settings, FakeSink(fail=True)) as client:
        failed = post(client, token, DOSSIER, orjson.dumps(dossier("a")))
        assert failed.status_code == 503 and failed.json()["results"][0]["status"] == "failed"
        # not remembered: the retry is sent again, not answered duplicate
        assert post(client, token, DOSSIER, orjson.dumps(dossier("a"))).json()["failed"] == 1
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"


def test_ioc_token_create_issues_a_producer_token(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from entrypoints import cli

    monkeypatch.setenv("IOC_SIGNING_KEY", settings.signing_key.get_secret_value())
    argv = ["token", "create", "--role", "producer", "--source", "hydro", "--topics", SENSOR, "--stations", "WL-DUA"]
    assert cli.main(argv) == 0
    p = verify_token(settings, capsys.readouterr().out.strip())
    assert (p.role, p.source, p.topics, p.stations) == ("producer", "hydro", (SENSOR,), ("WL-DUA",))
    assert cli.main([*argv[:-1], "NOPE"]) == 2
    assert "unknown station 'NOPE'" in capsys.readouterr().err


def test_a_batch_larger_than_the_sources_burst_is_a_413_not_a_429(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        kafka_bootstrap="127.0.0.1:1",
        database_url="postgresql://nobody@127.0.0.1:1/x",
        ingest_source_limits={"motcua": {"burst": 2}},
    )
    token = create_token(settings, "producer", source="motcua", topics=[DOSSIER])
    with client_with(settings, FakeSink()) as client:
        r = post(client, token, DOSSIER, b"{}\n{}\n{}")
    assert r.status_code == 413 and "burst of 2" in r.json()["detail"]
