"""Simulators: contract conformance, determinism, fault rates, lifecycles, scenarios."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import itertools
import json
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from ioc.registry import Registry, load_registry
from simulators.backfill import BackfillPlan, backfill_events, live_rate
from simulators.dossiers import DossierSimulator, load_catalogue, mean_events_within, statutory_deadline
from simulators.faults import DossierSurgeAnomaly
from simulators.scenarios import build_scenario
from simulators.stream import SimRecord, generate, rate_split, write_jsonl

VN = dt.timezone(dt.timedelta(hours=7))
START = dt.datetime(2025, 11, 24, 8, 0, tzinfo=VN)  # a Monday morning
DOSSIER, CYBER, SENSOR = "ioc.dossier.events", "ioc.cyber.incidents", "ioc.sensor.readings"


# --- A checker written from CONTRACT §1, independent of the generators -----------------------

DOSSIER_TYPES = {
    "received",
    "processing",
    "supplement_requested",
    "completed",
    "returned",
    "cancelled",
}
INCIDENT_TYPES = {"detected", "acknowledged", "contained", "resolved", "false_positive"}
SEVERITIES = {"low", "medium", "high", "critical"}
CATEGORIES = {
    "malware",
    "phishing",
    "ddos",
    "intrusion",
    "defacement",
    "data_leak",
    "brute_force",
    "vulnerability",
    "other",
}
SENSOR_VALUES = {
    "air": {"pm25", "pm10", "o3", "no2", "so2", "co"},
    "water": {"water_level_m"},
    "rain": {"rain_mm"},
    "weather": {"temp_c", "humidity_pct", "wind_ms"},
}
OFFSET_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _time(value: Any) -> dt.datetime:
    assert isinstance(value, str) and OFFSET_TIME.match(value), f"not ISO 8601 with offset: {value!r}"
    return dt.datetime.fromisoformat(value)


def _opt_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def contract_violations(topic: str, raw: bytes, registry: Registry) -> list[str]:
    """Every way ``raw`` breaks CONTRACT §1 for ``topic`` (empty when it is a valid event)."""
    try:
        event = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except (UnicodeDecodeError, ValueError) as exc:
        return [f"not JSON: {exc}"]
    if not isinstance(event, dict):
        return ["not an object"]
    problems: list[str] = []

    def need(field: str, ok: Any) -> None:
        if field not in event:
            problems.append(f"missing {field}")
        else:
            try:
                if not ok(event[field]):
                    problems.append(f"bad {field}: {event[field]!r}")
            except AssertionError as exc:
                problems.append(f"bad {field}: {exc}")

    need("event_id", lambda v: isinstance(v, str) and v != "")
    if topic == DOSSIER:
        need("schema", lambda v: v == "ioc.dossier.v1")
        need("dossier_id", lambda v: isinstance(v, str) and v != "")
        need("type", lambda v: v in DOSSIER_TYPES)
        need("occurred_at", _time)
        need("commune_code", lambda v: v is None or (isinstance(v, str) and v in registry.units))
        need("agency_code", lambda v: isinstance(v, str) and v != "")
        need("procedure_code", lambda v: isinstance(v, str) and re.fullmatch(r"\d\.\d{6}", v))
        if event.get("type") == "received":
            need("channel", lambda v: v in {"online", "in_person", "postal"})
            need("full_online", lambda v: isinstance(v, bool))
            need("due_at", _time)
        if event.get("type") == "completed":
            for field in ("paid_online", "digitized", "result_digital"):
                if field in event and not _opt_bool(event[field]):
                    problems.append(f"bad {field}")
    elif topic == CYBER:
        need("schema", lambda v: v == "ioc.incident.v1")
        need("incident_id", lambda v: isinstance(v, str) and v != "")
        need("type", lambda v: v in INCIDENT_TYPES)
        need("occurred_at", _time)
        if event.get("type") == "detected":
            need("severity", lambda v: v in SEVERITIES)
            need("category", lambda v: v in CATEGORIES)
        elif "severity" in event and event["severity"] not in SEVERITIES:
            problems.append("bad severity")
        need("system", lambda v: isinstance(v, str) and v != "")
        need("system_level", lambda v: type(v) is int and 1 <= v <= 5)
        need("agency_code", lambda v: isinstance(v, str))
        need("commune_code", lambda v: v is None or v in registry.units)
        need("source_ip", lambda v: v is None or ipaddress.ip_address(v) is not None)
        need("title", lambda v: isinstance(v, str) and len(v) <= 500)
    elif topic == SENSOR:
        need("schema", lambda v: v == "ioc.sensor.v1")
        need("station_id", lambda v: v in registry.stations)
        need("kind", lambda v: v in SENSOR_VALUES)
        need("observed_at", _time)
        values = event.get("values")
        if not isinstance(values, dict):
            problems.append("values not an object")
        else:
            station = registry.stations.get(event.get("station_id", ""))
            if station and station.kind != event.get("kind"):
                problems.append("kind differs from the registry")
            if set(values) != SENSOR_VALUES.get(event.get("kind", ""), set()):
                problems.append(f"wrong value names {sorted(values)}")
            for name, v in values.items():
                if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or v < 0:
                    problems.append(f"invalid {name}={v!r}")
            if values.get("humidity_pct", 0) > 100 or not -10 < values.get("temp_c", 20) < 50:
                problems.append("impossible weather")
            if any(isinstance(v, int | float) and v > 1e6 for v in values.values()):
                problems.append("impossible value")
            if values.get("rain_mm", 0) > 400 or values.get("water_level_m", 0) > 200:
                problems.append("impossible rain or level")
    else:
        problems.append(f"unknown topic {topic}")
    return problems


# --- Fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


def records(
    registry: Registry,
    *,
    hours: float = 2.0,
    rate: float = 5.0,
    seed: int = 7,
    start: dt.datetime = START,
    **kwargs: Any,
) -> list[SimRecord]:
    until = start + dt.timedelta(hours=hours)
    return list(generate(seed, start, rate, registry=registry, until=until, **kwargs))


@pytest.fixture(scope="module")
def normal(registry: Registry) -> list[SimRecord]:
    return records(registry)


@pytest.fixture(scope="module")
def faulty(registry: Registry) -> list[SimRecord]:
    return records(registry, hours=1.0, rate=20.0, dup_rate=0.05, ooo_rate=0.1, bad_rate=0.02)


def events(recs: list[SimRecord], topic: str) -> Iterator[dict[str, Any]]:
    return (json.loads(r.value) for r in recs if r.topic == topic)


# --- Conformance ---------------------------------------------------------------------------


def test_every_normal_record_satisfies_the_contract(normal: list[SimRecord], registry: Registry) -> None:
    assert {r.topic for r in normal} == {DOSSIER, CYBER, SENSOR}
    for record in normal:
        assert contract_violations(record.topic, record.value, registry) == [], record.value


def test_keys_are_the_entity_ids(normal: list[SimRecord]) -> None:
    id_field = {DOSSIER: "dossier_id", CYBER: "incident_id", SENSOR: "station_id"}
    for record in normal:
        assert record.key.decode() == json.loads(record.value)[id_field[record.topic]]


def test_times_carry_the_vietnam_offset(normal: list[SimRecord]) -> None:
    for record in normal[:2000]:
        event = json.loads(record.value)
        assert (event.get("occurred_at") or event["observed_at"]).endswith("+07:00")


def test_event_ids_are_unique_without_duplicates(normal: list[SimRecord]) -> None:
    ids = [json.loads(r.value)["event_id"] for r in normal]
    assert len(ids) == len(set(ids))


def test_same_seed_same_stream_and_other_seed_differs(registry: Registry) -> None:
    first = records(registry, hours=0.25, rate=10, dup_rate=0.1, ooo_rate=0.1, bad_rate=0.1)
    again = records(registry, hours=0.25, rate=10, dup_rate=0.1, ooo_rate=0.1, bad_rate=0.1)
    other = records(registry, hours=0.25, rate=10, seed=8)
    assert [(r.topic, r.key, r.value, r.arrival_time) for r in first] == [
        (r.topic, r.key, r.value, r.arrival_time) for r in again
    ]
    assert [r.value for r in first[:50]] != [r.value for r in other[:50]]


def test_rate_is_roughly_the_requested_total(registry: Registry) -> None:
    recs = records(registry, hours=1.0, rate=10.0)
    per_s = len(recs) / 3600
    # Completions of multi-day procedures are still ahead in the first hour; the rest is on time.
    assert 7.0 < per_s < 11.0


def test_after_a_backfill_live_intake_goes_on_at_the_backfills_rate_and_shape(registry: Registry) -> None:
    """The detectors learn the normal from the back-fill: live receipts that ran higher (a fresh
    run's catch-up intake, a flat night, another rate) would be read as surges in every commune."""
    tuesday = dt.datetime(2025, 11, 25, 8, 0, tzinfo=VN)
    plan = BackfillPlan(days=1)
    rate = live_rate(plan, registry, dup_rate=0.0)
    per_dossier = mean_events_within(load_catalogue(registry.units), registry.units, dt.timedelta(days=400), tuesday)
    split = rate_split(rate, registry.stations, 0.0, 0.0, per_dossier)
    assert split.dossiers_per_s * 86400 == pytest.approx(plan.dossiers_per_day, rel=0.01)

    def received(rows: Iterator[dict[str, Any]], since: dt.datetime) -> int:
        until = since + dt.timedelta(hours=6)
        return sum(r.get("type") == "received" and since <= _time(r["occurred_at"]) < until for r in rows)

    past = received(
        (e.value for e in backfill_events(3, tuesday, plan, registry) if e.topic == DOSSIER),
        tuesday - dt.timedelta(days=1),
    )
    live = received(events(records(registry, hours=6, rate=rate, start=tuesday, after_backfill=True), DOSSIER), tuesday)
    assert 0.8 * past < live < 1.25 * past  # Monday and Tuesday office hours alike


# --- Dossiers ------------------------------------------------------------------------------


def test_dossier_channel_mix_resembles_plan_348_baseline(normal: list[SimRecord]) -> None:
    received = [e for e in events(normal, DOSSIER) if e["type"] == "received"]
    channels = Counter(e["channel"] for e in received)
    online = channels["online"] / len(received)
    assert 0.55 <= online <= 0.70
    assert 0 < channels["postal"] < channels["in_person"]
    full = sum(e["full_online"] for e in received) / channels["online"]
    assert 0.40 <= full <= 0.60
    assert not any(e["full_online"] for e in received if e["channel"] != "online")


def test_dossier_provincial_level_has_no_commune(normal: list[SimRecord]) -> None:
    received = [e for e in events(normal, DOSSIER) if e["type"] == "received"]
    provincial = [e for e in received if e["commune_code"] is None]
    assert 0.1 < len(provincial) / len(received) < 0.3
    assert all(re.fullmatch(r"000\.00\.\d\d\.H40", e["agency_code"]) for e in provincial)
    assert all(e["dossier_id"].startswith(e["agency_code"] + "-") for e in received)


def test_vinh_wards_are_busier_than_rural_communes(normal: list[SimRecord]) -> None:
    by_commune = Counter(e["commune_code"] for e in events(normal, DOSSIER) if e["type"] == "received")
    vinh = sum(by_commune[c] for c in ("16681", "16690", "16702", "16708", "17920")) / 5
    rural = sum(n for c, n in by_commune.items() if c and c >= "18000") / max(
        1, len([c for c in by_commune if c and c >= "18000"])
    )
    assert vinh > 3 * rural


def test_dossier_lifecycle_is_ordered_in_event_time(registry: Registry) -> None:
    recs = records(registry, hours=30.0, rate=0.6, seed=3)
    order = ["received", "processing", "supplement_requested", "completed"]
    lives: dict[str, list[tuple[dt.datetime, str]]] = defaultdict(list)
    for e in events(recs, DOSSIER):
        lives[e["dossier_id"]].append((dt.datetime.fromisoformat(e["occurred_at"]), e["type"]))
    completed = late = 0
    for steps in lives.values():
        steps.sort()
        kinds = [k for _, k in steps]
        assert kinds[0] == "received"
        assert len(set(kinds)) == len(kinds)
        terminal = [k for k in kinds if k in {"completed", "returned", "cancelled"}]
        assert len(terminal) <= 1 and (not terminal or kinds[-1] == terminal[0])
        known = [k for k in kinds if k in order]
        assert known == sorted(known, key=order.index)
        if "completed" in kinds:
            completed += 1
    # completed events also carry the flags, and some land after the deadline
    received = {e["dossier_id"]: e for e in events(recs, DOSSIER) if e["type"] == "received"}
    for e in events(recs, DOSSIER):
        if e["type"] == "completed":
            assert {"paid_online", "digitized", "result_digital"} <= set(e)
            late += e["occurred_at"] > received[e["dossier_id"]]["due_at"]
    assert completed > 100 and 0 < late < completed * 0.2


def test_statutory_deadline_counts_working_days() -> None:
    friday = dt.datetime(2025, 11, 21, 9, 0, tzinfo=VN)
    assert statutory_deadline(friday, 1) == dt.datetime(2025, 11, 24, 17, 0, tzinfo=VN)
    assert statutory_deadline(friday, 10) == dt.datetime(2025, 12, 5, 17, 0, tzinfo=VN)
    assert statutory_deadline(friday, 0) == dt.datetime(2025, 11, 21, 17, 0, tzinfo=VN)
    late_friday = friday.replace(hour=16)
    assert statutory_deadline(late_friday, 0) == dt.datetime(2025, 11, 24, 17, 0, tzinfo=VN)


# --- Incidents ------------------------------------------------------------------------------


def test_incident_lifecycle_is_ordered_and_critical_is_acknowledged_faster(
    registry: Registry,
) -> None:
    recs = records(registry, hours=24.0, rate=2.0, seed=11)
    order = ["detected", "acknowledged", "contained", "resolved"]
    lives: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events(recs, CYBER):
        lives[e["incident_id"]].append(e)
    mtta: dict[str, list[float]] = defaultdict(list)
    for steps in lives.values():
        steps.sort(key=lambda e: e["occurred_at"])
        kinds = [e["type"] for e in steps]
        assert kinds[0] == "detected"
        assert [k for k in kinds if k in order] == sorted((k for k in kinds if k in order), key=order.index)
        assert "resolved" not in kinds or "false_positive" not in kinds
        if len(steps) > 1:
            gap = _time(steps[1]["occurred_at"]) - _time(steps[0]["occurred_at"])
            mtta[steps[0]["severity"]].append(gap.total_seconds() / 60)
        ranks = [
            sorted(SEVERITIES, key=["low", "medium", "high", "critical"].index).index(e["severity"]) for e in steps
        ]
        assert ranks == sorted(ranks)  # severity may rise, never fall
    assert sum(mtta["critical"]) / len(mtta["critical"]) < sum(mtta["low"]) / len(mtta["low"])
    assert any("false_positive" in [e["type"] for e in s] for s in lives.values())


# --- Sensors --------------------------------------------------------------------------------


def test_every_station_reports_at_its_cadence(normal: list[SimRecord], registry: Registry) -> None:
    by_station: dict[str, list[dt.datetime]] = defaultdict(list)
    for e in events(normal, SENSOR):
        by_station[e["station_id"]].append(_time(e["observed_at"]))
    assert set(by_station) == set(registry.stations)
    for sid, times in by_station.items():
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        interval = registry.stations[sid].interval_s
        assert all(0.95 * interval <= g <= 1.05 * interval for g in gaps), sid


def test_air_quality_follows_traffic_and_ozone_peaks_in_the_afternoon(registry: Registry) -> None:
    recs = records(registry, hours=24.0, rate=0.2, start=START.replace(hour=0))
    no2: dict[int, list[float]] = defaultdict(list)
    o3: dict[int, list[float]] = defaultdict(list)
    for e in events(recs, SENSOR):
        if e["kind"] == "air":
            hour = _time(e["observed_at"]).hour
            no2[hour].append(e["values"]["no2"])
            o3[hour].append(e["values"]["o3"])
            assert e["values"]["pm10"] >= e["values"]["pm25"]

    def mean(d: dict[int, list[float]], h: int) -> float:
        return sum(d[h]) / len(d[h])

    assert mean(no2, 18) > 1.3 * mean(no2, 3)
    assert mean(o3, 14) > 2 * mean(o3, 3)


def test_river_levels_stay_near_their_ordinary_stage(normal: list[SimRecord]) -> None:
    levels = defaultdict(list)
    for e in events(normal, SENSOR):
        if e["kind"] == "water":
            levels[e["station_id"]].append(e["values"]["water_level_m"])
    assert min(levels["WL-NAMDAN"]) >= 2.0 and max(levels["WL-NAMDAN"]) < 5.40
    assert min(levels["WL-DUA"]) >= 15.0 and max(levels["WL-DUA"]) < 18.0


# --- Faults ---------------------------------------------------------------------------------


def test_fault_rates_roughly_as_configured(faulty: list[SimRecord], registry: Registry) -> None:
    verdicts = [(r, contract_violations(r.topic, r.value, registry)) for r in faulty]
    bad = [r for r, problems in verdicts if problems]
    good = [r for r, problems in verdicts if not problems]
    ids = Counter(json.loads(r.value)["event_id"] for r in good)
    originals = len(ids)
    duplicates = sum(n - 1 for n in ids.values())
    assert duplicates / originals == pytest.approx(0.05, abs=0.01)
    assert len(bad) / originals == pytest.approx(0.02, abs=0.006)
    assert all(r.malformed for r in bad)
    # out of order: first sendings that arrive after one with a later event time, within their topic
    late = 0
    newest: dict[str, dt.datetime] = {}
    seen: set[str] = set()
    for r in good:
        first_sending = (eid := json.loads(r.value)["event_id"]) not in seen
        seen.add(eid)
        if first_sending and r.event_time < newest.get(r.topic, r.event_time):
            late += 1
        newest[r.topic] = max(newest.get(r.topic, r.event_time), r.event_time)
    assert late / originals == pytest.approx(0.1, abs=0.03)


def test_arrival_order_is_monotonic_and_delayed_keep_their_event_time(
    faulty: list[SimRecord],
) -> None:
    arrivals = [r.arrival_time for r in faulty]
    assert arrivals == sorted(arrivals)
    for r in faulty:
        if r.delayed:
            event = json.loads(r.value)
            assert _time(event.get("occurred_at") or event["observed_at"]) == r.event_time < r.arrival_time


def test_malformed_records_cover_many_defects(faulty: list[SimRecord], registry: Registry) -> None:
    reasons = Counter(
        contract_violations(r.topic, r.value, registry)[0].split(":")[0].split(" ")[0] for r in faulty if r.malformed
    )
    assert {"not", "missing", "bad", "invalid"} <= set(reasons)
    assert any(r.malformed and r.value[:1] not in (b"{", b"") for r in faulty)


# --- Scenarios ------------------------------------------------------------------------------


def test_flood_takes_nam_dan_past_alarm_level_three(registry: Registry) -> None:
    recs = records(registry, hours=1.0, rate=0.2, scenario="flood")
    levels: dict[str, list[tuple[dt.datetime, float]]] = {"WL-NAMDAN": [], "WL-DUA": []}
    previous: dict[str, dt.datetime] = {}
    heaviest_mm_per_h = 0.0
    for e in events(recs, SENSOR):
        at = _time(e["observed_at"])
        if e["station_id"] in levels:
            levels[e["station_id"]].append((at, e["values"]["water_level_m"]))
        if e["kind"] == "rain":
            if e["station_id"] in previous:
                hours = (at - previous[e["station_id"]]).total_seconds() / 3600
                heaviest_mm_per_h = max(heaviest_mm_per_h, e["values"]["rain_mm"] / hours)
            previous[e["station_id"]] = at
    namdan = [v for _, v in levels["WL-NAMDAN"]]
    assert namdan[0] < 5.40 and max(namdan) > 7.90
    first_over = {bd: next(t for t, v in levels["WL-NAMDAN"] if v > bd) for bd in (5.40, 6.90, 7.90)}
    assert first_over[5.40] < first_over[6.90] < first_over[7.90]
    assert max(v for _, v in levels["WL-DUA"]) > 24.50
    assert 80 < heaviest_mm_per_h < 300  # torrential, yet physically possible
    for r in recs:
        assert contract_violations(r.topic, r.value, registry) == []


def test_ddos_hits_at_least_twenty_systems(registry: Registry) -> None:
    recs = records(registry, hours=0.5, rate=1.0, scenario="ddos")
    detected = [e for e in events(recs, CYBER) if e["type"] == "detected" and e["category"] == "ddos"]
    in_wave = [e for e in detected if e["severity"] in {"critical", "high"}]
    assert len({e["system"] for e in in_wave}) >= 20
    window = [_time(e["occurred_at"]) for e in in_wave]
    assert max(window) - min(window) < dt.timedelta(minutes=10)


def test_dossier_surge_multiplies_intake(registry: Registry) -> None:
    begins = START + dt.timedelta(hours=2)
    surge = build_scenario("dossier-surge", begins)
    recs = records(registry, hours=2.6, rate=2.0, scenario=surge)
    received = [_time(e["occurred_at"]) for e in events(recs, DOSSIER) if e["type"] == "received"]
    before = sum(begins - dt.timedelta(hours=1) <= t < begins for t in received) / 3600
    during = sum(begins + dt.timedelta(minutes=5) <= t < begins + dt.timedelta(minutes=30) for t in received) / 1500
    assert during > 2.5 * before


def test_sensor_outage_silences_a_group_of_stations(registry: Registry) -> None:
    recs = records(registry, hours=1.5, rate=0.2, scenario="sensor-outage")
    scenario = build_scenario("sensor-outage", START + dt.timedelta(seconds=30), stations=registry.stations)
    silent = scenario.sensors(START + dt.timedelta(minutes=10)).silent
    assert len(silent) >= 5
    assert {"WL-DUA", "AIR-17254"} <= silent
    assert scenario.span >= dt.timedelta(seconds=3 * 600)
    begins, ends = (
        START + dt.timedelta(seconds=30),
        START + dt.timedelta(seconds=30) + scenario.span,
    )
    heard_during = {e["station_id"] for e in events(recs, SENSOR) if begins <= _time(e["observed_at"]) < ends}
    heard_after = {e["station_id"] for e in events(recs, SENSOR) if _time(e["observed_at"]) >= ends}
    assert not (silent & heard_during)
    assert silent <= heard_after
    assert heard_during  # the others carry on


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenario"):
        build_scenario("earthquake", START)


# --- JSON lines ------------------------------------------------------------------------------


def test_jsonl_lines_hold_topic_and_value_or_raw(registry: Registry) -> None:
    buffer = io.StringIO()
    written = write_jsonl(
        buffer,
        seed=1,
        start=START,
        rate_per_s=20,
        count=3000,
        bad_rate=0.05,
        dup_rate=0.02,
        registry=registry,
    )
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert written == len(lines) == 3000
    assert all(set(line) in ({"topic", "value"}, {"topic", "raw"}) for line in lines)
    raw = [line for line in lines if "raw" in line]
    assert 0.03 < len(raw) / len(lines) < 0.07
    for line in lines:
        if "value" in line:
            encoded = json.dumps(line["value"]).encode()
            assert contract_violations(line["topic"], encoded, registry) == []


@pytest.mark.parametrize("commune", ["16681", "17506"])  # a busy Vinh ward, a rural commune
def test_dossier_surge_anomaly_adds_factor_minus_one_times_the_commune_s_own_receipts(
    registry: Registry, commune: str
) -> None:
    """Six hours of ordinary intake teach the commune's share; the surge then adds about three times its
    own receipts (factor 4), whatever the commune's size, and only within the window."""
    a, b = START, START + dt.timedelta(hours=3)
    sim = DossierSimulator(random.Random(3), load_catalogue(registry.units), registry.units, dossiers_per_s=2.0,
                           diurnal=True)  # fmt: skip
    surge = DossierSurgeAnomaly("dossier-surge-anomaly", a, b - a, commune=commune, factor=4.0, extra=((a, b),))
    received = [e for e in surge.bend_dossiers(sim.events(a - dt.timedelta(hours=6), b + dt.timedelta(hours=1)))
                if e.value["type"] == "received" and e.value["commune_code"] == commune]  # fmt: skip
    own = sum(1 for e in received if a <= e.at < b and not e.key.startswith("SURGE-"))
    copies = sum(1 for e in received if e.key.startswith("SURGE-"))
    assert own >= 150
    assert 2.4 * own <= copies <= 3.6 * own  # 3 ± about 3 standard deviations of the two counts
    assert all(a <= e.at < b for e in received if e.key.startswith("SURGE-"))
