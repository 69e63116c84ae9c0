"""Whatever bytes arrive, validation either accepts an event or refuses it with `InvalidEvent`: never
another exception (which would be a bug the worker has to catch)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioc.errors import InvalidEvent
from ioc.registry import load_registry
from streams.engine import KINDS, Engine

ENGINE = Engine(load_registry(), 0)
TOPICS = sorted(KINDS)
FIELDS = ["schema", "event_id", "dossier_id", "incident_id", "station_id", "type", "kind", "occurred_at",
          "observed_at", "due_at", "values", "severity", "category", "commune_code", "agency_code", "channel",
          "full_online", "system_level", "source_ip", "title"]  # fmt: skip
VALID = {
    "ioc.dossier.events": {"schema": "ioc.dossier.v1", "event_id": "e", "dossier_id": "D", "type": "received",
                           "occurred_at": "2026-11-22T08:00:00+07:00", "agency_code": "A", "commune_code": "16681",
                           "channel": "online", "full_online": True, "due_at": "2026-11-23T08:00:00+07:00"},
    "ioc.cyber.incidents": {"schema": "ioc.incident.v1", "event_id": "e", "incident_id": "I", "type": "detected",
                            "occurred_at": "2026-11-22T08:00:00+07:00", "severity": "high", "category": "ddos"},
    "ioc.sensor.readings": {"schema": "ioc.sensor.v1", "event_id": "e", "station_id": "AIR-16681", "kind": "air",
                            "observed_at": "2026-11-22T08:00:00+07:00", "values": {"pm25": 10.0}},
}  # fmt: skip

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
    st.sampled_from(["2026-11-22T08:00:00+07:00", "2026-11-22T08:00:00", "1969-12-31T23:59:59Z", "9999-12-31T00:00:00Z",
                     "NaN", "-1", "16681", "99999", "AIR-16681", "online", "critical"]),
)  # fmt: skip
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _refused_or_accepted(topic: str, raw: bytes) -> None:
    try:
        ENGINE.parse(topic, raw)
    except InvalidEvent as exc:
        assert exc.stage in ("decode", "schema", "validate") and str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from(TOPICS), raw=st.binary(max_size=300))
def test_arbitrary_bytes_are_refused_with_a_reason_or_accepted(topic: str, raw: bytes) -> None:
    _refused_or_accepted(topic, raw)


@settings(max_examples=400, deadline=None)
@given(topic=st.sampled_from(TOPICS), field=st.sampled_from(FIELDS), value=json_value, drop=st.booleans())
def test_any_field_mutated_to_any_json_value_is_refused_with_a_reason_or_accepted(
    topic: str, field: str, value: Any, drop: bool
) -> None:
    doc = dict(VALID[topic])
    if drop:
        doc.pop(field, None)
    else:
        doc[field] = value
    _refused_or_accepted(topic, json.dumps(doc).encode())


@settings(max_examples=100, deadline=None)
@given(topic=st.sampled_from(TOPICS), doc=json_value)
def test_any_json_document_is_refused_with_a_reason_or_accepted(topic: str, doc: Any) -> None:
    _refused_or_accepted(topic, json.dumps(doc).encode())
