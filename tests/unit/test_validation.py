"""Validation before processing: every malformed or impossible record is refused with a reason."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from ioc.errors import InvalidEvent
from ioc.registry import load_registry
from streams.engine import Engine

REGISTRY = load_registry()
ENGINE = Engine(REGISTRY, 0)
T = "2026-11-22T08:00:00+07:00"

DOSSIER = {
    "schema": "ioc.dossier.v1",
    "event_id": "e1",
    "dossier_id": "D1",
    "type": "received",
    "occurred_at": T,
    "agency_code": "000.00.16.H40",
    "commune_code": "16681",
    "channel": "online",
    "full_online": True,
    "due_at": "2026-11-25T08:00:00+07:00",
}
INCIDENT = {
    "schema": "ioc.incident.v1",
    "event_id": "c1",
    "incident_id": "I1",
    "type": "detected",
    "occurred_at": T,
    "severity": "high",
    "category": "ddos",
    "system": "dichvucong.nghean.gov.vn",
    "system_level": 3,
    "agency_code": "000.00.16.H40",
    "source_ip": "203.0.113.7",
}
READING = {
    "schema": "ioc.sensor.v1",
    "event_id": "s1",
    "station_id": "AIR-16681",
    "kind": "air",
    "observed_at": T,
    "values": {"pm25": 35.2, "pm10": 60.0},
}


def parse(topic: str, doc: Any) -> Any:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return ENGINE.parse(topic, raw)


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    doc = {**base, **changes}
    return {k: v for k, v in doc.items() if v is not ...}


def test_valid_events_pass() -> None:
    assert parse("ioc.dossier.events", DOSSIER)[0] == "D1"
    assert parse("ioc.cyber.incidents", INCIDENT)[0] == "I1"
    assert parse("ioc.sensor.readings", READING)[0] == "AIR-16681"


@pytest.mark.parametrize(
    ("topic", "doc", "needle"),
    [
        ("ioc.dossier.events", b"{not json", "JSON"),
        ("ioc.dossier.events", b"\xff\xfe{}", "JSON"),
        ("ioc.dossier.events", with_(DOSSIER, schema="ioc.dossier.v2"), "schema"),
        ("ioc.dossier.events", with_(DOSSIER, type="teleported"), "type"),
        ("ioc.dossier.events", with_(DOSSIER, channel=...), "channel"),
        ("ioc.dossier.events", with_(DOSSIER, due_at=...), "due_at"),
        ("ioc.dossier.events", with_(DOSSIER, occurred_at="2026-11-22T08:00:00"), "offset"),
        ("ioc.dossier.events", with_(DOSSIER, occurred_at="1970-01-01T00:00:00+00:00"), "outside"),
        ("ioc.dossier.events", with_(DOSSIER, commune_code="99999"), "unknown commune"),
        ("ioc.dossier.events", with_(DOSSIER, due_at="2026-11-21T08:00:00+07:00"), "before"),
        ("ioc.dossier.events", with_(DOSSIER, full_online="yes"), "bool"),
        ("ioc.dossier.events", [DOSSIER], "object"),
        ("ioc.cyber.incidents", with_(INCIDENT, severity=...), "severity"),
        ("ioc.cyber.incidents", with_(INCIDENT, severity="apocalyptic"), "severity"),
        ("ioc.cyber.incidents", with_(INCIDENT, system_level=6), "1–5"),
        ("ioc.cyber.incidents", with_(INCIDENT, source_ip="300.1.1.1"), "IPv4"),
        ("ioc.cyber.incidents", with_(INCIDENT, title="x" * 501), "500"),
        ("ioc.sensor.readings", with_(READING, station_id="NOPE"), "unknown station"),
        ("ioc.sensor.readings", with_(READING, kind="water"), "air station"),
        ("ioc.sensor.readings", with_(READING, values={"pm25": -1}), "outside"),
        ("ioc.sensor.readings", json.dumps(READING).replace("35.2", "1e999").encode(), "out of range"),
        ("ioc.sensor.readings", json.dumps(READING).replace("35.2", "NaN").encode(), "JSON"),
        ("ioc.sensor.readings", with_(READING, values={"pm25": "high"}), "float"),
        ("ioc.sensor.readings", with_(READING, values={"rain_mm": 3}), "not a air value"),
        ("ioc.sensor.readings", with_(READING, values={}), "no values"),
        ("ioc.sensor.readings", b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        ("ioc.sensor.readings", b"{" + b'"x":1,' * 20000 + b'"y":2}', "exceeds"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(topic: str, doc: Any, needle: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse(topic, doc)
    assert needle.lower() in str(info.value).lower()
    assert info.value.stage in ("decode", "schema", "validate")


def test_events_later_than_a_day_after_production_are_refused() -> None:
    produced = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    with pytest.raises(InvalidEvent, match="more than a day"):
        ENGINE.parse("ioc.dossier.events", json.dumps(DOSSIER).encode(), int(produced.timestamp()) * 1_000_000)
