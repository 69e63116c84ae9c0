"""Validation before processing: every malformed or impossible record is refused with a reason."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from zoneinfo import ZoneInfo

import hypothesis
import pytest
from hypothesis import strategies as st

from ioc.errors import InvalidEvent
from ioc.registry import load_registry
from streams import events
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


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    moment=st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 30)),
    offset_min=st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
)
def test_event_times_in_microseconds_match_datetime_arithmetic(moment: dt.datetime, offset_min: int) -> None:
    """`to_us` computes from the fields and a cached offset: the same as subtracting aware datetimes,
    whatever the offset, including after the offset's zone was seen before (the cache)."""
    zone = dt.timezone(dt.timedelta(minutes=offset_min))
    t = moment.replace(tzinfo=zone)
    expected = (t - events.EPOCH) // dt.timedelta(microseconds=1)
    assert events.to_us(t, "occurred_at") == expected
    assert events.to_us(t.replace(microsecond=(t.microsecond + 1) % 10**6), "occurred_at") != expected


def test_event_times_in_a_named_zone_use_that_days_offset() -> None:
    """A `zoneinfo` zone's offset changes with the date, so it is never cached by zone."""
    zone = ZoneInfo("Europe/Paris")
    winter, summer = dt.datetime(2026, 1, 15, 12, tzinfo=zone), dt.datetime(2026, 7, 15, 12, tzinfo=zone)
    assert events.to_us(winter, "t") == (winter - events.EPOCH) // dt.timedelta(microseconds=1)
    assert events.to_us(summer, "t") == (summer - events.EPOCH) // dt.timedelta(microseconds=1)
    assert events.to_us(winter, "t") == events.to_us(dt.datetime(2026, 1, 15, 11, tzinfo=dt.UTC), "t")
    assert events.to_us(summer, "t") == events.to_us(dt.datetime(2026, 7, 15, 10, tzinfo=dt.UTC), "t")


def test_event_times_without_an_offset_are_refused() -> None:
    with pytest.raises(InvalidEvent, match="no UTC offset"):
        events.to_us(dt.datetime(2026, 11, 22, 8), "occurred_at")
