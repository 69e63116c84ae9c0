"""Sensor KPIs from their definitions (CONTRACT §5, DOMAIN.md): flood alarm levels, rain, PM2.5, VN_AQI, offline."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest

from ioc.registry import Registry, Station, load_registry
from ioc.snapshot import Snapshot
from streams import aqi
from streams.engine import Engine

ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=ICT)
TOPIC = "ioc.sensor.readings"
REGISTRY = load_registry(today=NOW.date())


def _with_extra_stations(registry: Registry) -> Registry:
    """The packaged registry plus a second gauge, two rain stations and a second air station in Nam Đàn (17935)."""
    base = registry.stations["WL-NAMDAN"]
    extra = [
        dataclasses.replace(base, station_id="WL-NAMDAN-2", alarm_levels_m=(4.0, 5.0, 6.0)),
        Station("RAIN-17935A", "rain", "17935", 18.69, 105.5, 600),
        Station("RAIN-17935B", "rain", "17935", 18.70, 105.5, 600),
        Station("AIR-17935B", "air", "17935", 18.70, 105.5, 300),
    ]
    stations = {**registry.stations, **{s.station_id: s for s in extra}}
    return Registry(units=registry.units, stations=stations, targets=registry.targets, warn_band=registry.warn_band)


WIDE = _with_extra_stations(REGISTRY)

Snaps = dict[tuple[str, str, str], Snapshot]


def us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def at(minutes_ago: float) -> str:
    return (NOW - dt.timedelta(minutes=minutes_ago)).isoformat()


def reading(
    station_id: str, minutes_ago: float, event_id: str | None = None, registry: Registry = REGISTRY, **values: float
) -> dict[str, Any]:
    return {
        "schema": "ioc.sensor.v1",
        "event_id": event_id or f"{station_id}@{minutes_ago}",
        "station_id": station_id,
        "kind": registry.stations[station_id].kind,
        "observed_at": at(minutes_ago),
        "values": values,
    }


def feed(engine: Engine, events: list[dict[str, Any]]) -> list[bool]:
    applied = []
    for e in events:
        key, parsed = engine.parse(TOPIC, json.dumps(e).encode())
        applied.append(engine.apply(TOPIC, key, parsed))
    return applied


def run(events: list[dict[str, Any]], now: dt.datetime = NOW, registry: Registry = REGISTRY) -> Snaps:
    engine = Engine(registry, us(now))
    feed(engine, events)
    return {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}


def value(snaps: Snaps, kpi: str, scope: str, window: str = "now") -> float | None:
    return snaps[(kpi, scope, window)].value


def value_or_none(snaps: Snaps, kpi: str, scope: str, window: str = "now") -> float | None:
    """The value, or None when no snapshot is published for the key."""
    s = snaps.get((kpi, scope, window))
    return None if s is None else s.value


# --- water level and flood alarm levels --------------------------------------------------------

# Nam Đàn: BĐ I 5.40 m, BĐ II 6.90 m, BĐ III 7.90 m (Decision 05/2020, DOMAIN.md).
NAMDAN_CASES = [
    (0.0, 0),
    (5.39, 0),
    (5.40, 1),
    (5.41, 1),
    (6.89, 1),
    (6.90, 2),
    (7.89, 2),
    (7.90, 3),
    (9.0, 3),
]


@pytest.mark.parametrize(("level_m", "expected"), NAMDAN_CASES)
def test_nam_dan_alarm_level_is_the_highest_bd_level_reached(level_m: float, expected: int) -> None:
    snaps = run([reading("WL-NAMDAN", 10, water_level_m=level_m)])
    assert value(snaps, "water.level_m", "station:WL-NAMDAN") == level_m
    for scope in ("station:WL-NAMDAN", "commune:17935", "province"):
        assert value(snaps, "water.alarm_level", scope) == expected, scope


# Dừa: only BĐ III (24.50 m) is known, so below it the level is unknown, not 0.
DUA_CASES = [(10.0, None), (24.49, None), (24.50, 3), (30.0, 3)]


@pytest.mark.parametrize(("level_m", "expected"), DUA_CASES)
def test_dua_with_only_bd3_known_is_level_3_at_or_above_it_and_unknown_below(
    level_m: float, expected: int | None
) -> None:
    snaps = run([reading("WL-DUA", 10, water_level_m=level_m)])
    assert value(snaps, "water.level_m", "station:WL-DUA") == level_m
    assert value(snaps, "water.alarm_level", "station:WL-DUA") == expected
    assert value_or_none(snaps, "water.alarm_level", "commune:17329") == expected
    assert value_or_none(snaps, "water.alarm_level", "province") == expected


def test_commune_and_province_alarm_level_is_the_highest_gauge() -> None:
    snaps = run([reading("WL-NAMDAN", 10, water_level_m=7.0), reading("WL-DUA", 10, water_level_m=25.0)])
    assert value(snaps, "water.alarm_level", "commune:17935") == 2
    assert value(snaps, "water.alarm_level", "commune:17329") == 3
    province = snaps[("water.alarm_level", "province", "now")]
    assert province.value == 3
    assert province.extra is not None and province.extra["station"] == "WL-DUA"


def test_commune_alarm_level_is_the_max_over_its_gauges() -> None:
    # WL-NAMDAN at 6.0 m is BĐ I; the second gauge (BĐ III at 6.0 m) is at BĐ III.
    events = [
        reading("WL-NAMDAN", 10, registry=WIDE, water_level_m=6.0),
        reading("WL-NAMDAN-2", 10, registry=WIDE, water_level_m=6.0),
    ]
    snaps = run(events, registry=WIDE)
    assert value(snaps, "water.alarm_level", "station:WL-NAMDAN") == 1
    assert value(snaps, "water.alarm_level", "station:WL-NAMDAN-2") == 3
    commune = snaps[("water.alarm_level", "commune:17935", "now")]
    assert commune.value == 3
    assert commune.extra is not None and commune.extra["station"] == "WL-NAMDAN-2"


@pytest.mark.parametrize("arrival", ["in-order", "newest-first"])
def test_latest_water_reading_is_chosen_by_observed_at_not_arrival(arrival: str) -> None:
    older, newer = reading("WL-NAMDAN", 20, water_level_m=8.0), reading("WL-NAMDAN", 10, water_level_m=5.0)
    snaps = run([older, newer] if arrival == "in-order" else [newer, older])
    assert value(snaps, "water.level_m", "station:WL-NAMDAN") == 5.0
    assert value(snaps, "water.alarm_level", "station:WL-NAMDAN") == 0
    assert value(snaps, "water.alarm_level", "province") == 0


def test_water_reading_after_the_clock_is_not_the_latest_yet() -> None:
    snaps = run([reading("WL-NAMDAN", 10, water_level_m=5.0), reading("WL-NAMDAN", -10, water_level_m=8.0)])
    assert value(snaps, "water.level_m", "station:WL-NAMDAN") == 5.0


def published_stream(engine: Engine, published: dict[tuple[str, str, str], float | None]) -> None:
    for s in engine.snapshots(changed_only=True):
        published[(s.kpi, s.scope, s.window)] = s.value


def test_commune_and_province_alarm_level_stop_showing_bd3_once_dua_falls_below_it() -> None:
    # Dừa rises above BĐ III, then falls to 24.0 m where the level is unknown. A wall that follows
    # the changed-only stream must not keep showing BĐ III for the commune and the province.
    engine = Engine(REGISTRY, us(NOW))
    published: dict[tuple[str, str, str], float | None] = {}
    feed(engine, [reading("WL-DUA", 20, water_level_m=25.0)])
    published_stream(engine, published)
    assert published[("water.alarm_level", "commune:17329", "now")] == 3
    assert published[("water.alarm_level", "province", "now")] == 3

    feed(engine, [reading("WL-DUA", 10, water_level_m=24.0)])
    published_stream(engine, published)
    assert published[("water.alarm_level", "station:WL-DUA", "now")] is None
    assert published[("water.alarm_level", "commune:17329", "now")] is None
    assert published[("water.alarm_level", "province", "now")] is None


# --- rain ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("step_mm", [0.1, 0.2, 0.3, 0.7, 1.1])
def test_rain_sums_are_exact_over_1h_and_24h(step_mm: float) -> None:
    # One reading a minute for 25 hours: 60 fall in 1h (09:31–10:30), 1,440 in 24h.
    events = [reading("RAIN-16690", m, rain_mm=step_mm) for m in range(25 * 60)]
    snaps = run(events)
    step = Decimal(str(step_mm))
    assert value(snaps, "rain.mm", "station:RAIN-16690", "1h") == float(step * 60)
    assert value(snaps, "rain.mm", "station:RAIN-16690", "24h") == float(step * 1440)
    assert value(snaps, "rain.mm", "commune:16690", "1h") == float(step * 60)


@pytest.mark.parametrize(
    ("minutes_ago", "in_1h", "in_24h"),
    [(0, True, True), (59, True, True), (60, False, True), (1439, False, True), (1440, False, False)],
)
def test_rain_window_edges(minutes_ago: int, in_1h: bool, in_24h: bool) -> None:
    # A dry reading at 10:29:30 keeps the gauge reporting in both windows; 12.5 mm fell at the edge.
    snaps = run([reading("RAIN-16690", 0.5, rain_mm=0.0), reading("RAIN-16690", minutes_ago, rain_mm=12.5)])
    assert value(snaps, "rain.mm", "station:RAIN-16690", "1h") == (12.5 if in_1h else 0.0)
    assert value(snaps, "rain.mm", "station:RAIN-16690", "24h") == (12.5 if in_24h else 0.0)


def test_rain_of_a_gauge_silent_for_the_whole_window_is_null_not_zero() -> None:
    # The product's reading of "value is null where the denominator is 0" (CONTRACT §4): no reading, no sum.
    snaps = run([reading("RAIN-16690", 120, rain_mm=3.0)])
    assert value(snaps, "rain.mm", "station:RAIN-16690", "1h") is None
    assert value(snaps, "rain.mm", "station:RAIN-16690", "24h") == 3.0


def test_commune_rain_is_the_wettest_station_per_window() -> None:
    # A: 2.0 mm in the last hour, 30.0 mm over the day; B: 5.0 mm in the last hour, 6.0 mm over the day.
    events = [
        reading("RAIN-17935A", 10, registry=WIDE, rain_mm=2.0),
        reading("RAIN-17935A", 300, registry=WIDE, rain_mm=28.0),
        reading("RAIN-17935B", 20, registry=WIDE, rain_mm=5.0),
        reading("RAIN-17935B", 120, registry=WIDE, rain_mm=1.0),
    ]
    snaps = run(events, registry=WIDE)
    one_hour = snaps[("rain.mm", "commune:17935", "1h")]
    day = snaps[("rain.mm", "commune:17935", "24h")]
    assert (one_hour.value, one_hour.extra and one_hour.extra["station"]) == (5.0, "RAIN-17935B")
    assert (day.value, day.extra and day.extra["station"]) == (30.0, "RAIN-17935A")
    assert value(snaps, "rain.mm", "province", "24h") == 30.0


# --- PM2.5 and VN_AQI ----------------------------------------------------------------------------


def test_pm25_is_the_mean_of_readings_in_the_window() -> None:
    events = [
        reading("AIR-16681", 10, pm25=20.0),
        reading("AIR-16681", 30, pm25=40.0),
        reading("AIR-16681", 180, pm25=90.0),
        reading("AIR-16681", 25 * 60, pm25=500.0),  # outside both windows
    ]
    snaps = run(events)
    hour = snaps[("env.pm25", "station:AIR-16681", "1h")]
    day = snaps[("env.pm25", "station:AIR-16681", "24h")]
    assert (hour.value, hour.denominator) == (30.0, 2)
    assert (day.value, day.denominator) == (50.0, 3)


def test_pm25_is_null_without_readings_in_the_window() -> None:
    snaps = run([reading("AIR-16681", 180, pm25=90.0)])
    assert value(snaps, "env.pm25", "station:AIR-16681", "1h") is None
    assert value(snaps, "env.pm25", "station:AIR-16681", "24h") == 90.0


def test_pm25_mean_of_hundredths_is_exact() -> None:
    events = [reading("AIR-16681", m, pm25=p) for m, p in ((1, 0.1), (2, 0.2), (3, 0.3))]
    assert value(run(events), "env.pm25", "station:AIR-16681", "1h") == 0.2


# AIR-16681: 10:25 → 30, 10:10 → 50 (hour 10 mean 40); 09:20 → 60 (hour 9); 08:40 → 20 (hour 8).
AIR_16681 = [(5, 30.0), (20, 50.0), (70, 60.0), (110, 20.0)]


def test_station_aqi_now_is_hourly_vn_aqi_of_the_hourly_means() -> None:
    snaps = run([reading("AIR-16681", m, pm25=p) for m, p in AIR_16681])
    expected = aqi.hourly_aqi({"pm25": [40.0, 60.0, 20.0] + [None] * 9})
    assert expected is not None
    s = snaps[("env.aqi", "station:AIR-16681", "now")]
    assert s.value == expected.aqi
    assert s.extra is not None
    assert (s.extra["dominant"], s.extra["station"]) == ("pm25", "AIR-16681")


def test_station_aqi_today_is_daily_vn_aqi_of_the_days_hourly_means() -> None:
    snaps = run([reading("AIR-16681", m, pm25=p) for m, p in AIR_16681])
    # Local hours 00..10 of today, in hour order.
    expected = aqi.daily_aqi({"pm25": [None] * 8 + [20.0, 60.0, 40.0]})
    assert expected is not None
    assert value(snaps, "env.aqi", "station:AIR-16681", "today") == expected.aqi


def test_station_aqi_now_needs_two_of_the_last_three_hours() -> None:
    snaps = run([reading("AIR-16681", 5, pm25=30.0), reading("AIR-16681", 200, pm25=30.0)])
    assert value(snaps, "env.aqi", "station:AIR-16681", "now") is None


def test_province_aqi_is_the_worst_station_and_names_it() -> None:
    events = [reading("AIR-16681", m, pm25=p) for m, p in AIR_16681]
    events += [reading("AIR-16690", 10, pm25=150.0), reading("AIR-16690", 70, pm25=150.0)]
    snaps = run(events)
    worst = snaps[("env.aqi", "station:AIR-16690", "now")]
    assert worst.value is not None
    assert worst.value > (value(snaps, "env.aqi", "station:AIR-16681") or 0)
    province = snaps[("env.aqi", "province", "now")]
    assert province.value == worst.value
    assert province.extra is not None and province.extra["station"] == "AIR-16690"
    commune = snaps[("env.aqi", "commune:16681", "now")]
    assert commune.value == value(snaps, "env.aqi", "station:AIR-16681")
    assert commune.extra is not None and commune.extra["station"] == "AIR-16681"


def test_commune_aqi_is_the_worst_of_its_stations() -> None:
    events = [reading("AIR-17935", m, registry=WIDE, pm25=10.0) for m in (10, 70)]
    events += [reading("AIR-17935B", m, registry=WIDE, pm25=100.0) for m in (10, 70)]
    snaps = run(events, registry=WIDE)
    commune = snaps[("env.aqi", "commune:17935", "now")]
    assert commune.value == value(snaps, "env.aqi", "station:AIR-17935B")
    assert commune.extra is not None and commune.extra["station"] == "AIR-17935B"
    today = snaps[("env.aqi", "commune:17935", "today")]
    assert today.extra is not None and today.extra["station"] == "AIR-17935B"


def test_commune_aqi_stops_showing_a_value_once_its_station_has_no_valid_hourly_aqi() -> None:
    # Valid at 10:30; three hours later no hour of c1..c3 has data, so the hourly AQI is unknown.
    engine = Engine(REGISTRY, us(NOW))
    published: dict[tuple[str, str, str], float | None] = {}
    feed(engine, [reading("AIR-16681", m, pm25=p) for m, p in AIR_16681])
    published_stream(engine, published)
    assert published[("env.aqi", "commune:16681", "now")] is not None
    engine.advance(us(NOW + dt.timedelta(hours=3)))
    published_stream(engine, published)
    assert published[("env.aqi", "station:AIR-16681", "now")] is None
    assert published[("env.aqi", "commune:16681", "now")] is None


# --- offline stations ----------------------------------------------------------------------------

# Commune 16690 has AIR-16690 (every 300 s: offline after 15 min) and RAIN-16690 (600 s: 30 min).
OFFLINE_CASES = [
    ({"AIR-16690": 14, "RAIN-16690": 29}, []),
    ({"AIR-16690": 15, "RAIN-16690": 30}, []),  # exactly 3 × interval: not yet
    ({"AIR-16690": 16, "RAIN-16690": 30}, ["AIR-16690"]),
    ({"AIR-16690": 15, "RAIN-16690": 31}, ["RAIN-16690"]),
    ({"AIR-16690": 60, "RAIN-16690": 120}, ["AIR-16690", "RAIN-16690"]),
    ({"AIR-16690": 1}, ["RAIN-16690"]),  # never seen
    ({}, ["AIR-16690", "RAIN-16690"]),
]


@pytest.mark.parametrize(("last_seen", "offline"), OFFLINE_CASES)
def test_station_is_offline_after_three_intervals_of_silence_or_when_never_seen(
    last_seen: dict[str, int], offline: list[str]
) -> None:
    values = {"AIR-16690": {"pm25": 12.0}, "RAIN-16690": {"rain_mm": 0.0}}
    events = [reading(sid, m, **values[sid]) for sid, m in last_seen.items()]
    snaps = run(events)
    commune = snaps[("sensor.offline", "commune:16690", "now")]
    assert commune.value == len(offline)
    assert commune.denominator == 2
    assert commune.extra == {"stations": offline}
    province = snaps[("sensor.offline", "province", "now")]
    online = 2 - len(offline)
    assert province.value == len(REGISTRY.stations) - online
    assert province.denominator == len(REGISTRY.stations)


@pytest.mark.parametrize(
    ("seconds_ago", "is_offline"),
    [(30 * 60, False), (30 * 60 + 30, True)],
    ids=["seen-10:00:00", "seen-09:59:30"],
)
def test_offline_is_judged_at_the_minute_of_as_of(seconds_ago: int, is_offline: bool) -> None:
    # As of 10:30:45, judged at 10:30:00: RAIN-16690 (30 min allowed) seen at 10:00:00 is still online.
    events = [reading("RAIN-16690", seconds_ago / 60, rain_mm=0.0), reading("AIR-16690", 1, pm25=5.0)]
    snaps = run(events, now=NOW + dt.timedelta(seconds=45))
    assert value(snaps, "sensor.offline", "commune:16690") == (1 if is_offline else 0)


def test_station_goes_offline_as_the_clock_moves() -> None:
    engine = Engine(REGISTRY, us(NOW))
    feed(engine, [reading("RAIN-16690", 0, rain_mm=1.0), reading("AIR-16690", 0, pm25=5.0)])
    assert {s.scope: s.value for s in engine.snapshots(changed_only=False) if s.kpi == "sensor.offline"}[
        "commune:16690"
    ] == 0
    engine.advance(us(NOW + dt.timedelta(minutes=16)))
    snaps = {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=True)}
    assert snaps[("sensor.offline", "commune:16690", "now")].extra == {"stations": ["AIR-16690"]}


# --- duplicates and rival readings ---------------------------------------------------------------


def test_resent_reading_is_a_duplicate_that_changes_nothing() -> None:
    r = reading("RAIN-16690", 10, rain_mm=4.2)
    engine = Engine(REGISTRY, us(NOW))
    assert feed(engine, [r, r, dict(r)]) == [True, False, False]
    snaps = {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}
    assert value(snaps, "rain.mm", "station:RAIN-16690", "1h") == 4.2
    assert snaps == run([r])


RIVALS = [
    ("WL-NAMDAN", {"water_level_m": 5.0}, {"water_level_m": 8.0}, ("water.level_m", "now")),
    ("RAIN-16690", {"rain_mm": 2.0}, {"rain_mm": 3.0}, ("rain.mm", "1h")),
    ("AIR-16681", {"pm25": 20.0}, {"pm25": 80.0}, ("env.pm25", "1h")),
]


@pytest.mark.parametrize(("station", "a", "b", "kpi"), RIVALS, ids=[r[0] for r in RIVALS])
def test_rival_readings_for_the_same_instant_resolve_to_one_whatever_the_order(
    station: str, a: dict[str, float], b: dict[str, float], kpi: tuple[str, str]
) -> None:
    ra = reading(station, 10, event_id="rival-a", **a)
    rb = reading(station, 10, event_id="rival-b", **b)
    results = [run(order) for order in ([ra, rb], [rb, ra], [ra, rb, rb, ra], [rb, ra, rb])]
    assert all(r == results[0] for r in results[1:])
    (name, window), scope = kpi, f"station:{station}"
    assert value(results[0], name, scope, window) in (next(iter(a.values())), next(iter(b.values())))
    if name == "env.pm25":
        assert results[0][(name, scope, window)].denominator == 1


def test_rival_reading_arriving_after_publication_replaces_or_is_ignored_consistently() -> None:
    ra = reading("RAIN-16690", 10, event_id="rival-a", rain_mm=2.0)
    rb = reading("RAIN-16690", 10, event_id="rival-b", rain_mm=3.0)
    finals = []
    for first, second in ((ra, rb), (rb, ra)):
        engine = Engine(REGISTRY, us(NOW))
        published: dict[tuple[str, str, str], float | None] = {}
        feed(engine, [first])
        published_stream(engine, published)
        feed(engine, [second])
        published_stream(engine, published)
        finals.append(published[("rain.mm", "station:RAIN-16690", "1h")])
    assert finals[0] == finals[1]
    assert finals[0] in (2.0, 3.0)


# --- pruning (the worker prunes periodically, `ioc replay` never does) -----------------------------


def test_pruning_old_readings_does_not_change_any_sensor_kpi() -> None:
    # Nam Đàn last reported 40 hours ago (BĐ III). Dropping readings from memory is housekeeping:
    # the worker (which prunes) and `ioc replay` (which does not) must publish the same values.
    events = [
        reading("WL-NAMDAN", 40 * 60, water_level_m=8.0),
        reading("WL-DUA", 38 * 60, water_level_m=25.0),
        reading("AIR-16681", 37 * 60, pm25=50.0),
        reading("RAIN-16690", 23 * 60, rain_mm=2.0),
    ]
    engine = Engine(REGISTRY, us(NOW))
    feed(engine, events)
    engine.prune()
    pruned = {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}
    kept = run(events)
    assert {k: s.value for k, s in pruned.items()} == {k: s.value for k, s in kept.items()}
