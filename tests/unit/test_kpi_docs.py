"""docs/kpis.md documents every KPI the code can publish, so the reference cannot fall behind the code."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from ioc.registry import load_registry
from streams import cyber, dossier
from streams.engine import Engine

DOCS = Path(__file__).resolve().parents[2] / "docs" / "kpis.md"
ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=ICT)
REGISTRY = load_registry(today=NOW.date())
TOPIC = "ioc.sensor.readings"
#: One valid reading of each sensor kind the station registry holds.
VALUES: dict[str, dict[str, float]] = {
    "air": {"pm25": 40.0, "pm10": 80.0, "o3": 100.0, "no2": 50.0, "so2": 30.0, "co": 5000.0},
    "water": {"water_level_m": 7.0},
    "rain": {"rain_mm": 2.5},
    "weather": {"temp_c": 24.0, "humidity_pct": 80.0, "wind_ms": 3.0},
}


def us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def sensor_kpis() -> set[str]:
    """KPI names the engine publishes from a few valid readings of each kind of station in the registry."""
    engine = Engine(REGISTRY, us(NOW))
    kinds: dict[str, list[str]] = {}
    for sid, station in sorted(REGISTRY.stations.items()):
        kinds.setdefault(station.kind, []).append(sid)
    assert {"air", "water", "rain"} <= kinds.keys()
    for kind, sids in kinds.items():
        for sid in sids[:3]:
            for minutes_ago in (5, 65, 125):
                event: dict[str, Any] = {
                    "schema": "ioc.sensor.v1",
                    "event_id": f"{sid}-{minutes_ago}",
                    "station_id": sid,
                    "kind": kind,
                    "observed_at": (NOW - dt.timedelta(minutes=minutes_ago)).isoformat(),
                    "values": VALUES[kind],
                }
                key, parsed = engine.parse(TOPIC, json.dumps(event).encode())
                engine.apply(TOPIC, key, parsed)
    return {s.kpi for s in engine.snapshots(changed_only=False)}


def code_kpis() -> set[str]:
    return {spec.name for spec in (*dossier.KPIS, *cyber.KPIS)} | sensor_kpis()


def documented() -> set[str]:
    """Backticked names in the `### ` headings of docs/kpis.md."""
    names: set[str] = set()
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            names.update(re.findall(r"`([^`]+)`", line))
    return names


def test_the_sensor_probe_reaches_every_sensor_kpi() -> None:
    assert {"env.aqi", "env.pm25", "water.level_m", "water.alarm_level", "rain.mm", "sensor.offline"} <= sensor_kpis()


def test_every_kpi_the_code_publishes_has_a_section() -> None:
    missing = sorted(code_kpis() - documented())
    assert not missing, f"docs/kpis.md has no `### ` section for: {missing}"


def test_every_documented_kpi_exists_in_the_code() -> None:
    stale = sorted(documented() - code_kpis())
    assert not stale, f"docs/kpis.md documents KPIs the code does not publish: {stale}"
