"""`ioc replay` prints alert events: deterministic, independent of line order and duplicates, with the
rule, scope, severity, state and what triggered them."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

from ioc.registry import load_registry
from streams.replay import replay

ICT = dt.timezone(dt.timedelta(hours=7))
T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=ICT)
REGISTRY = load_registry(today=T0.date())


def incident(event_id: str, incident_id: str, type_: str, minute: float, **fields: Any) -> dict[str, Any]:
    value = {
        "schema": "ioc.incident.v1",
        "event_id": event_id,
        "incident_id": incident_id,
        "type": type_,
        "occurred_at": (T0 + dt.timedelta(minutes=minute)).isoformat(),
        "agency_code": "000.00.16.H40",
        **fields,
    }
    return {"topic": "ioc.cyber.incidents", "value": value}


def water(event_id: str, minute: float, level: float) -> dict[str, Any]:
    value = {
        "schema": "ioc.sensor.v1",
        "event_id": event_id,
        "station_id": "WL-NAMDAN",
        "kind": "water",
        "observed_at": (T0 + dt.timedelta(minutes=minute)).isoformat(),
        "values": {"water_level_m": level},
    }
    return {"topic": "ioc.sensor.readings", "value": value}


LINES = [
    incident("c1", "SOC-1", "detected", 0, severity="critical", category="ddos", system="dichvucong.nghean.gov.vn"),
    incident("c2", "SOC-2", "detected", 2, severity="high", category="phishing", system="nghean.gov.vn"),
    incident("c3", "SOC-2", "acknowledged", 5),
    *(water(f"w{i}", i * 2, 5.0 + 0.1 * i) for i in range(20)),  # Nam Đàn rising past BĐ I (5.40) and II (6.90)
]


def run(tmp_path: Path, lines: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    path = tmp_path / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    _, _, alerts = replay(path, REGISTRY, T0 + dt.timedelta(minutes=40))
    return [
        {"rule": a.rule, "scope": a.scope, "severity": a.severity.value, "state": a.state.value, "at": a.at,
         "triggered_by": a.triggered_by, "commune": a.commune_code}
        for a in alerts
    ]  # fmt: skip


def test_unacknowledged_critical_incident_escalates_after_15_minutes_and_the_acknowledged_one_does_not(
    tmp_path: Path,
) -> None:
    alerts = run(tmp_path, LINES, "a.jsonl")
    critical = [a for a in alerts if "SOC-1" in a["triggered_by"]]
    assert [a["state"] for a in critical][:2] == ["firing", "escalated"]
    assert critical[1]["at"] - critical[0]["at"] == dt.timedelta(minutes=15)
    high = [a for a in alerts if "SOC-2" in a["triggered_by"]]
    assert "escalated" not in [a["state"] for a in high]


def test_water_alarm_alerts_name_the_gauge_and_its_commune(tmp_path: Path) -> None:
    alerts = run(tmp_path, LINES, "a.jsonl")
    water_alerts = [a for a in alerts if a["rule"].startswith("water.") and a["state"] == "firing"]
    assert water_alerts, alerts
    assert any(a["scope"] == "station:WL-NAMDAN" and a["commune"] == "17935" for a in water_alerts)


def test_alert_output_does_not_depend_on_line_order_or_duplicates(tmp_path: Path) -> None:
    reference = run(tmp_path, LINES, "a.jsonl")
    shuffled = LINES + LINES[::3]
    random.Random(4).shuffle(shuffled)
    assert run(tmp_path, shuffled, "b.jsonl") == reference
