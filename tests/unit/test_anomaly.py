"""Anomaly detectors (streams/anomaly.py): each on both sides of its boundary, and findings as alerts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from alerts.engine import AlertEngine
from alerts.model import AlertState
from alerts.rule_files import default_rules, load_rules
from alerts.rules import RuleError
from ioc.errors import ConfigurationError
from ioc.registry import load_registry
from streams.anomaly import Detectors, Finding, flat_run_needed, nbinom_sf, open_findings, poisson_sf
from streams.anomaly_config import AnomalyConfig, StuckConfig, load_config
from streams.engine import Engine

ICT = dt.timezone(dt.timedelta(hours=7))
T0 = dt.datetime(2026, 10, 5, 0, 0, tzinfo=ICT)  # a Monday
US = 1_000_000
REGISTRY = load_registry(today=T0.date())
TOPIC = "ioc.sensor.readings"
M = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)


def us(t: dt.datetime) -> int:
    return int(t.timestamp() * US)


Reading = tuple[str, dt.datetime, dict[str, float]]
#: The watermark at the newest reading (a handful of stations here, not the province's 61).
NEWEST = AnomalyConfig(watermark_quantile=1.0)


def run(
    readings: list[Reading], until: dt.datetime, config: AnomalyConfig | None = None
) -> tuple[Engine, list[Finding]]:
    """Readings into an engine, then its clock to ``until``: the detectors' findings."""
    engine = Engine(REGISTRY, us(T0 - M), config or NEWEST)
    # A rain gauge reporting at ``until`` moves the event-time watermark there (rain is not watched).
    readings = [*readings, ("RAIN-16690", until, {"rain_mm": 0.0})]
    for n, (sid, t, values) in enumerate(sorted(readings, key=lambda r: (r[1], r[0]))):
        doc = {"schema": "ioc.sensor.v1", "event_id": f"e{n}", "station_id": sid,
               "kind": REGISTRY.stations[sid].kind, "observed_at": t.isoformat(), "values": values}  # fmt: skip
        key, parsed = engine.parse(TOPIC, json.dumps(doc).encode())
        engine.apply(TOPIC, key, parsed)
    engine.advance(us(until))
    return engine, engine.anomaly.take()


def series(sid: str, q: str, values: list[float], every: dt.timedelta, start: dt.datetime = T0) -> list[Reading]:
    return [(sid, start + i * every, {q: v}) for i, v in enumerate(values)]


def noisy(n: int, mean: float, sd: float, seed: int = 1, digits: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [round(max(0.0, rng.gauss(mean, sd)), digits) for _ in range(n)]


def opened(findings: list[Finding], detector: str) -> list[Finding]:
    return [f for f in findings if f.detector == detector and f.active]


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "lam", "expected"),
    [(0, 3.0, 1.0), (1, 1.0, 1 - math.exp(-1)), (2, 1.0, 1 - 2 * math.exp(-1)), (3, 0.0, 0.0),
     (30, 5.0, 5.0**30 * math.exp(-5) / math.factorial(30) * 1.2207)],
)  # fmt: skip
def test_poisson_upper_tail(n: int, lam: float, expected: float) -> None:
    assert poisson_sf(n, lam) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    ("p_flat", "needed"),
    [(0.0, 6), (0.01, 6), (0.2, 8), (0.5, 17), (0.9, 110), (1.0, 1 << 30)],
)
def test_flat_run_needed_grows_with_the_stations_own_flat_step_rate(p_flat: float, needed: int) -> None:
    assert flat_run_needed(p_flat, 1e-5, 6) == needed


# --- stuck --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flat", "stuck"), [(8, False), (9, True), (30, True)])
def test_air_sensor_stuck_for_45_minutes_is_found(flat: int, stuck: bool) -> None:
    """A noisy PM2.5 sensor rarely repeats a value: 6 unchanged steps suffice, but at least 45 minutes."""
    warm = noisy(30, 30.0, 2.0)
    values = warm + [warm[-1]] * flat + [41.3]
    _, found = run(series("AIR-16681", "pm25", values, 5 * M), T0 + 6 * H)
    assert bool(opened(found, "stuck")) is stuck
    if stuck:
        f = opened(found, "stuck")[0]
        assert f.observed == warm[-1] and f.expected_low is not None and f.expected_low < f.observed
        assert f.window_from == T0 + 29 * 5 * M
        closed = [x for x in found if x.detector == "stuck" and not x.active]
        assert closed and closed[0].at == T0 + (30 + flat) * 5 * M  # the next varying reading closes it


@pytest.mark.parametrize(("flat", "stuck"), [(10, False), (25, True)])
def test_a_gauge_that_often_repeats_needs_a_longer_run(flat: int, stuck: bool) -> None:
    """Half of this gauge's ordinary steps are flat (a slow river at 1 cm resolution): 10 in a row is normal."""
    warm = [round(5.0 + 0.02 * (i // 2), 2) for i in range(40)]
    values = warm + [warm[-1]] * flat + [warm[-1] + 0.05]
    _, found = run(series("WL-DOLUONG", "water_level_m", values, 10 * M), T0 + 14 * H)
    assert bool(opened(found, "stuck")) is stuck


def test_stuck_waits_for_its_warm_up() -> None:
    values = [20.0] * 20  # flat from the first reading: nothing is known of the sensor yet
    _, found = run(series("AIR-16681", "pm25", values, 5 * M), T0 + 3 * H)
    assert opened(found, "stuck") == []


# --- spike --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jump", "back_to", "spike"),
    [(59.0, 30.0, False), (61.0, 30.0, True), (100.0, 130.0, False), (100.0, 90.0, False), (100.0, 75.0, True)],
)
def test_a_jump_the_next_reading_takes_back_is_a_spike(jump: float, back_to: float, spike: bool) -> None:
    """Above the plausible jump (60 µg/m³ in 5 minutes) and taken back by at least half: a spike. A
    level that stays up (a real episode) is not."""
    values = noisy(30, 30.0, 2.0) + [30.0] * 5 + [30.0 + jump, back_to, back_to]
    _, found = run(series("AIR-16681", "pm25", values, 5 * M), T0 + 4 * H)
    spikes = opened(found, "spike")
    assert bool(spikes) is spike
    if spike:
        assert spikes[0].observed == 30.0 + jump and spikes[0].at == T0 + 35 * 5 * M
        assert spikes[0].expected_high == pytest.approx(90.0)


def test_a_real_flood_rising_for_hours_is_no_spike() -> None:
    warm = [round(5.0 + 0.01 * math.sin(i), 2) for i in range(30)]
    rise = [round(5.0 + 0.25 * i, 2) for i in range(1, 20)]  # 1.5 m an hour, steadily
    _, found = run(series("WL-DOLUONG", "water_level_m", warm + rise, 10 * M), T0 + 10 * H)
    assert opened(found, "spike") == []


# --- drift --------------------------------------------------------------------------------------


def _air_field(hours: int, drift_per_h: float, regional_per_h: float = 0.0, seed: int = 3) -> list[Reading]:
    rng = random.Random(seed)
    out: list[Reading] = []
    air = sorted(s for s, st in REGISTRY.stations.items() if st.kind == "air")
    for i in range(hours * 12):
        t = T0 + i * 5 * M
        h = i / 12
        for sid in air:
            v = 30.0 * (1 + regional_per_h * h) * math.exp(rng.gauss(0.0, 0.05))
            if sid == "AIR-17506" and h >= 26:  # after the detector's day of warm-up
                v *= 1 + drift_per_h * (h - 26)
            out.append((sid, t, {"pm25": round(v, 1)}))
    return out


@pytest.mark.parametrize(
    ("drift", "regional", "found"),
    [(0.0, 0.0, False), (0.0, 0.3, False), (0.002, 0.0, False), (0.5, 0.0, True)],
)
def test_a_station_drifting_from_its_neighbours_is_found(drift: float, regional: float, found: bool) -> None:
    """A whole region rising together is weather; one station leaving its neighbours is drift."""
    _, findings = run(_air_field(36, drift, regional), T0 + 36 * H + 5 * M)
    drifting = {f.scope for f in opened(findings, "drift")}
    assert drifting == ({"station:AIR-17506"} if found else set())


# --- a gauge deaf to rain -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rain_per_reading", "rise_per_h", "deaf"),
    [(2.0, 0.0, True), (1.5, 0.0, False), (2.0, 0.1, False), (0.0, 0.0, False)],
)
def test_a_gauge_that_does_not_rise_while_it_pours_nearby(
    rain_per_reading: float, rise_per_h: float, deaf: bool
) -> None:
    """20 mm in two hours at the nearest rain gauges and less than 5 cm of response: the float is jammed."""
    rain = [s for s, st in REGISTRY.stations.items() if st.kind == "rain"]
    readings: list[Reading] = []
    for i in range(36):
        t = T0 + i * 10 * M
        readings.append(("WL-NAMDAN", t, {"water_level_m": round(2.6 + rise_per_h * i / 6 + 0.01 * (i % 2), 2)}))
        for sid in rain:
            readings.append((sid, t, {"rain_mm": rain_per_reading if i >= 6 else 0.0}))
    _, found = run(readings, T0 + 6 * H)
    assert {f.scope for f in opened(found, "unresponsive")} == ({"station:WL-NAMDAN"} if deaf else set())


# --- dossier surge ------------------------------------------------------------------------------


def _receipts(detectors: Detectors, hour: dt.datetime, n: int, commune: str = "17935") -> None:
    for k in range(n):  # in the last ten minutes of the hour
        detectors.on_dossier(us(hour + 50 * M + k * dt.timedelta(seconds=10)), commune)


def _surge_world(
    weeks: int, n: int, baseline: Callable[[int], int] = lambda _week: 5, config: AnomalyConfig | None = None
) -> tuple[Detectors, list[Finding]]:
    """``baseline(week)`` receipts every hour in Nam Đàn for ``weeks`` weeks, then ``n`` in the hour from
    09:00 of the next Monday, the clock stopping two hours later; a ward takes 50 every hour throughout."""
    detectors = Detectors(REGISTRY, config)
    target = T0 + dt.timedelta(days=7 * weeks, hours=9)
    hour = T0
    findings: list[Finding] = []
    while hour <= target + 2 * H:
        week = int((hour - T0) / dt.timedelta(days=7))
        _receipts(detectors, hour, n if hour == target else baseline(week) if hour < target else 0)
        _receipts(detectors, hour, 50, "16681")  # a steady ward: most of the province's receipts
        hour += H
        detectors.advance(us(hour) + 130 * US, {})
        findings += detectors.take()
    return detectors, findings


def _smallest_surge(lam: float = 5.0, dispersion: float = 1.0) -> int:
    """The smallest count in the hour that passes the one-hour test (the longer window, holding two quiet
    hours before, expects three times as many and needs more)."""
    cfg = AnomalyConfig().surge
    n = cfg.min_count
    while not (n >= cfg.ratio * lam and nbinom_sf(n, lam, dispersion) < cfg.alpha):
        n += 1
    return n


@pytest.mark.parametrize(("weeks", "extra", "surge"), [(2, -1, False), (2, 0, True), (1, 10, False), (1, 0, False)])
def test_receipts_far_above_the_commune_s_share_of_the_same_hour_of_the_week(
    weeks: int, extra: int, surge: bool
) -> None:
    """Baseline: 5 receipts every hour; ``min_weeks`` (2) weeks are needed before judging (the warm-up)."""
    _, found = _surge_world(weeks, _smallest_surge() + extra)
    opened_ = opened(found, "dossier_surge")
    assert [f.scope for f in opened_] == (["commune:17935"] if surge else [])
    if surge:
        f = opened_[0]
        assert f.expected_low is not None and f.expected_high is not None
        assert f.expected_high < (f.observed or 0)
        assert "negative binomial" in f.method
        assert f.window_to is not None and f.window_from == f.window_to - H


@pytest.mark.parametrize(
    ("per_hour", "min_count", "n", "surge"),
    [
        (1, 12, 11, False),  # P(X ≥ 11 | 1) ≈ 1e-8 passes alpha: min_count holds it back
        (1, 12, 12, True),
        (50, 8, 99, False),  # P(X ≥ 99 | 50) ≈ 1e-9 passes alpha: ratio 2 holds it back
        (50, 8, 100, True),
    ],
)
def test_min_count_and_ratio_bound_a_surge(per_hour: int, min_count: int, n: int, surge: bool) -> None:
    config = AnomalyConfig(surge=dataclasses.replace(AnomalyConfig().surge, min_count=min_count))
    _, found = _surge_world(2, n, lambda _w: per_hour, config)
    assert [f.scope for f in opened(found, "dossier_surge")] == (["commune:17935"] if surge else [])


@pytest.mark.parametrize(
    ("baseline", "dispersion_at_least", "dispersion_below"),
    [
        (lambda _w: 5, 1.0, 1.0001),  # steady: Poisson (the dispersion's floor)
        (lambda w: (1, 9)[w % 2], 2.5, 10.0),  # the same hour reads 1 one week and 9 the next
    ],
)
def test_dispersion_is_estimated_from_the_commune_s_own_history(
    baseline: Callable[[int], int], dispersion_at_least: float, dispersion_below: float
) -> None:
    detectors, _ = _surge_world(4, 0, baseline)
    assert dispersion_at_least <= detectors.dispersion["17935"] < dispersion_below


@pytest.mark.parametrize(("baseline", "surge"), [(lambda _w: 5, True), (lambda w: (1, 9)[w % 2], False)])
def test_an_over_dispersed_commune_needs_more_than_the_poisson_tail(
    baseline: Callable[[int], int], surge: bool
) -> None:
    """The same count, a surge against a steady history, ordinary against one that swings week to week."""
    n = _smallest_surge(5.0) + 2
    _, found = _surge_world(4, n, baseline)
    assert bool(opened(found, "dossier_surge")) is surge


@pytest.mark.parametrize(("hours", "per_hour", "surge"), [(3, 9, False), (3, 10, True)])
def test_a_steady_surge_is_found_in_the_three_hour_window(hours: int, per_hour: int, surge: bool) -> None:
    """Twice the usual for three hours passes no one-hour test; the 180-minute window adds it up
    (5/h baseline: 15 expected; 27 is P ≈ 3e-3, 30 is P ≈ 2e-4 under a lowered alpha of 1e-3)."""
    config = AnomalyConfig(surge=dataclasses.replace(AnomalyConfig().surge, alpha=1e-3, ratio=1.9))
    detectors = Detectors(REGISTRY, config)
    target = T0 + dt.timedelta(days=14, hours=9)
    hour, findings = T0, []
    while hour < target + hours * H:
        _receipts(detectors, hour, per_hour if hour >= target else 5)
        hour += H
        detectors.advance(us(hour) + 130 * US, {})
        findings += detectors.take()
    one_hour = nbinom_sf(per_hour, 5.0, 1.0)
    assert one_hour > 1e-3  # no single hour is a surge
    f = opened(findings, "dossier_surge")
    assert [x.scope for x in f] == (["commune:17935"] if surge else [])
    if surge:
        assert f[0].window_from == f[0].window_to - 3 * H  # type: ignore[operator]


def test_a_surge_closes_once_every_window_is_ordinary_and_does_not_teach_the_baseline() -> None:
    detectors, found = _surge_world(2, 40)
    assert [f.active for f in found if f.detector == "dossier_surge"] == [True]  # still open 2 h later
    hour = T0 + dt.timedelta(days=14, hours=12)
    while hour < T0 + dt.timedelta(days=14, hours=16):
        _receipts(detectors, hour, 5)
        hour += H
        detectors.advance(us(hour) + 130 * US, {})
        found += detectors.take()
    assert [f.active for f in found if f.detector == "dossier_surge"] == [True, False]
    how = (int(us(T0 + dt.timedelta(days=14, hours=9)) // (3600 * US)) + 7) % 168
    assert detectors.receipt_history[("17935", how)][-1] <= 6  # the surge hour entered at its expected count


@pytest.mark.parametrize(
    ("n", "mean", "dispersion"),
    [(0, 3.0, 2.0), (1, 3.0, 1.0), (3, 3.0, 2.0), (12, 3.0, 2.0), (12, 3.0, 1.0), (40, 10.0, 3.5), (2, 0.4, 1.8)],
)
def test_negative_binomial_tail_matches_the_summed_probabilities(n: int, mean: float, dispersion: float) -> None:
    if dispersion == 1.0:
        pmf = [math.exp(-mean + k * math.log(mean) - math.lgamma(k + 1)) for k in range(400)]
    else:
        r, p = mean / (dispersion - 1), 1 / dispersion
        pmf = [math.exp(math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1) + r * math.log(p)
                        + k * math.log(1 - p)) for k in range(400)]  # fmt: skip
    assert nbinom_sf(n, mean, dispersion) == pytest.approx(sum(pmf[n:]), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("dispersion", [1.5, 3.0])
def test_negative_binomial_tail_is_heavier_than_poisson(dispersion: float) -> None:
    assert nbinom_sf(20, 5.0, dispersion) > poisson_sf(20, 5.0) * 100


# --- incident burst -----------------------------------------------------------------------------


def _burst_world(burst_at_h: int, extra: int) -> tuple[list[Finding], int]:
    """One incident on a system at the top of every hour; a burst of incidents at ``burst_at_h``:30."""
    detectors = Detectors(REGISTRY)
    findings: list[Finding] = []
    needed = 0
    for h in range(burst_at_h + 2):
        detectors.on_incident(us(T0 + h * H), "malware", "portal.example")
        if h == burst_at_h:
            lam = detectors.burst_expected("system:portal.example")
            cfg = AnomalyConfig().burst
            needed = cfg.min_count
            while not (needed >= cfg.ratio * lam and poisson_sf(needed, lam) < cfg.alpha):
                needed += 1
            for k in range(needed - 1 + extra):  # with the one at the top of the hour: needed + extra
                detectors.on_incident(us(T0 + h * H + 30 * M + k * M), "phishing", "portal.example")
        for m in range(60):
            detectors.advance(us(T0 + h * H + m * M) + 130 * US, {})
            findings += detectors.take()
    return [f for f in findings if f.scope == "system:portal.example"], needed


@pytest.mark.parametrize(("at_h", "extra", "burst"), [(30, -1, False), (30, 0, True), (10, 3, False)])
def test_incidents_on_one_system_far_above_its_rate(at_h: int, extra: int, burst: bool) -> None:
    findings, _ = _burst_world(at_h, extra)
    assert bool(opened(findings, "incident_burst")) is burst
    if burst:
        assert [f.active for f in findings] == [True, False]  # it closes once the hour has passed


# --- the engine: suspect KPIs, determinism ------------------------------------------------------


def test_a_finding_marks_the_stations_kpis_suspect_until_it_closes() -> None:
    warm = noisy(30, 30.0, 2.0)
    readings = series("AIR-16681", "pm25", warm + [warm[-1]] * 12, 5 * M)
    readings += series("AIR-16690", "pm25", noisy(42, 30.0, 2.0, seed=2), 5 * M)
    engine, _ = run(readings, T0 + 42 * 5 * M)
    snaps = {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}
    assert snaps[("env.pm25", "station:AIR-16681", "1h")].quality == "suspect"
    assert snaps[("env.aqi", "station:AIR-16681", "now")].quality == "suspect"
    assert snaps[("env.pm25", "station:AIR-16690", "1h")].quality is None
    assert snaps[("env.aqi", "province", "now")].quality is None
    # The sensor moves again: the finding closes and the next emission says so.
    key, parsed = engine.parse(TOPIC, json.dumps({
        "schema": "ioc.sensor.v1", "event_id": "unstuck", "station_id": "AIR-16681", "kind": "air",
        "observed_at": (T0 + 42 * 5 * M).isoformat(), "values": {"pm25": 44.0}}).encode())  # fmt: skip
    engine.apply(TOPIC, key, parsed)
    key, parsed = engine.parse(TOPIC, json.dumps({
        "schema": "ioc.sensor.v1", "event_id": "tick", "station_id": "RAIN-16690", "kind": "rain",
        "observed_at": (T0 + 5 * H).isoformat(), "values": {"rain_mm": 0.0}}).encode())  # fmt: skip
    engine.apply(TOPIC, key, parsed)
    engine.advance(us(T0 + 5 * H))
    changed = {s.key: s for s in engine.snapshots()}
    assert changed["env.pm25|station:AIR-16681|1h"].quality is None


def test_findings_do_not_depend_on_how_often_the_clock_ticks() -> None:
    warm = noisy(30, 30.0, 2.0)
    readings = series("AIR-16681", "pm25", warm + [warm[-1]] * 12 + [60.0, 180.0, 61.0], 5 * M)
    _, at_once = run(readings, T0 + 5 * H)
    engine = Engine(REGISTRY, us(T0 - M), NEWEST)
    stepped: list[Finding] = []
    for n, (sid, t, values) in enumerate([*readings, ("RAIN-16690", T0 + 5 * H, {"rain_mm": 0.0})]):
        doc = {"schema": "ioc.sensor.v1", "event_id": f"e{n}", "station_id": sid, "kind": REGISTRY.stations[sid].kind,
               "observed_at": t.isoformat(), "values": values}  # fmt: skip
        engine.apply(TOPIC, *engine.parse(TOPIC, json.dumps(doc).encode()))
        engine.advance(us(t))
        stepped += engine.anomaly.take()
    engine.advance(us(T0 + 5 * H))
    stepped += engine.anomaly.take()
    assert stepped == at_once and opened(at_once, "stuck") and opened(at_once, "spike")


def test_a_reading_later_than_the_grace_is_left_to_the_kpis() -> None:
    engine, _ = run(series("AIR-16681", "pm25", noisy(10, 30.0, 2.0), 5 * M), T0 + 2 * H)
    done = engine.anomaly.done["AIR-16681"]
    key, parsed = engine.parse(TOPIC, json.dumps({
        "schema": "ioc.sensor.v1", "event_id": "late", "station_id": "AIR-16681", "kind": "air",
        "observed_at": (T0 + 2 * M).isoformat(), "values": {"pm25": 500.0}}).encode())  # fmt: skip
    engine.apply(TOPIC, key, parsed)
    engine.advance(us(T0 + 3 * H))
    assert engine.anomaly.done["AIR-16681"] == done and engine.anomaly.take() == []


def test_the_watermark_waits_for_most_stations() -> None:
    """One partition read ahead (one station an hour ahead) does not close the others' buckets."""
    readings: list[Reading] = []
    for i in range(12):
        readings += [
            (sid, T0 + i * 5 * M, {"pm25": 30.0 + i % 3}) for sid in REGISTRY.stations if sid.startswith("AIR")
        ]
    readings.append(("AIR-16681", T0 + 2 * H, {"pm25": 31.0}))
    engine, _ = run(readings, T0 + 2 * H, AnomalyConfig())
    assert engine.anomaly.next_minute is not None
    assert engine.anomaly.next_minute * 60 * US <= us(T0 + 55 * M)
    assert engine.anomaly.done["AIR-16690"] == us(T0 + 50 * M)  # not beyond the others' time


# --- configuration ------------------------------------------------------------------------------


def test_config_file_overrides_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "anomaly.yaml"
    path.write_text("stuck: {alpha: 0.001, tolerance: {pm25: 0.2}}\nspike: {n_sigma: 6}\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.stuck.alpha == 0.001 and cfg.stuck.tolerance["pm25"] == 0.2 and cfg.stuck.tolerance["temp_c"] == 0.05
    assert cfg.spike.n_sigma == 6.0 and cfg.drift == AnomalyConfig().drift
    path.write_text("stuck: {alpah: 1}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="unknown key 'alpah'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "windows"),
    [("surge: {windows_min: [30, 120]}\n", (30, 120)), ("surge: {windows_min: [60]}\n", (60,)),
     ("surge: {windows_min: []}\n", None), ("surge: {windows_min: [0]}\n", None),
     ("surge: {windows_min: 60}\n", None), ("surge: {spread_k: 4}\n", None)],
)  # fmt: skip
def test_surge_windows_are_a_list_of_positive_minutes(
    tmp_path: Path, text: str, windows: tuple[int, ...] | None
) -> None:
    path = tmp_path / "anomaly.yaml"
    path.write_text(text, encoding="utf-8")
    if windows is None:
        with pytest.raises(ConfigurationError, match="surge"):
            load_config(path)
    else:
        assert load_config(path).surge.windows_min == windows


def test_detectors_can_be_switched_off() -> None:
    warm = noisy(30, 30.0, 2.0)
    _, found = run(series("AIR-16681", "pm25", warm + [warm[-1]] * 12, 5 * M), T0 + 4 * H,
                   AnomalyConfig(enabled=False, watermark_quantile=1.0, stuck=StuckConfig()))  # fmt: skip
    assert found == []


# --- findings as alerts -------------------------------------------------------------------------


def _finding(active: bool, at: dt.datetime, detector: str = "stuck", scope: str = "station:WL-NAMDAN") -> Finding:
    return Finding(
        detector=detector, scope=scope, active=active, at=at, domain="water", quantity="water_level_m",
        observed=2.61 if active else None, expected_low=2.55 if active else None,
        expected_high=2.67 if active else None, window_from=at - 2 * H if active else None,
        window_to=at if active else None, station="WL-NAMDAN" if scope.startswith("station:") else None,
        commune="17935", method="persistence: 12 unchanged readings",
    )  # fmt: skip


def test_a_finding_is_an_alert_with_its_explanation_that_resolves_after_clear_for() -> None:
    engine = AlertEngine.for_registry(default_rules(), REGISTRY)
    at = T0 + 10 * H
    events = engine.on_finding(_finding(True, at), at)
    assert [(e.rule, e.state) for e in events] == [("anomaly.sensor_stuck", AlertState.FIRING)]
    e = events[0]
    assert (
        e.domain == "anomaly"
        and e.commune_code == "17935"
        and e.labels == {"detector": "stuck", "station": "WL-NAMDAN"}
    )
    assert "2.61" in e.message_en and "2.55–2.67" in e.message_en and "08:00 05/10" in e.message_en
    assert e.extra is not None and e.extra["explanation"]["expected_low"] == 2.55
    alert = engine.active()[0]
    assert alert.explanation is not None and alert.explanation["method"].startswith("persistence")
    # The same finding again is the same alert; its closing resolves it 15 minutes later.
    assert engine.on_finding(_finding(True, at + M), at + M) == []
    assert engine.on_finding(_finding(False, at + H), at + H) == []
    assert engine.tick(at + H + 14 * M) == []
    assert [x.state for x in engine.tick(at + H + 15 * M)] == [AlertState.RESOLVED]


def test_an_anomaly_alert_is_silenced_by_detector() -> None:
    engine = AlertEngine.for_registry(default_rules(), REGISTRY)
    at = T0 + 10 * H
    engine.add_silence({"detector": "stuck"}, at - H, at + H, "op", "gauge under maintenance")
    events = engine.on_finding(_finding(True, at), at)
    assert [x.state for x in events] == [AlertState.FIRING, AlertState.SILENCED]
    assert not events[0].notify


def test_an_incident_burst_reaches_security() -> None:
    engine = AlertEngine.for_registry(default_rules(), REGISTRY)
    at = T0 + 10 * H
    f = Finding(detector="incident_burst", scope="system:portal.example", active=True, at=at, domain="cyber",
                quantity="cyber.incidents", observed=9.0, expected_low=0.0, expected_high=2.0,
                window_from=at - H, window_to=at, method="Poisson")  # fmt: skip
    (e,) = engine.on_finding(f, at)
    assert e.rule == "anomaly.incident_burst" and "security" in e.audience and e.labels == {
        "detector": "incident_burst", "system": "portal.example"}  # fmt: skip


@pytest.mark.parametrize(
    ("patch", "error"),
    [({"detector": "wobble"}, "unknown value 'wobble'"), ({"scope": "region:*"}, "bad scope pattern"),
     ({"op": ">"}, "unknown key for a anomaly rule")],
)  # fmt: skip
def test_anomaly_rules_are_validated(tmp_path: Path, patch: dict[str, str], error: str) -> None:
    rule = {"id": "x.stuck", "kind": "anomaly", "domain": "anomaly", "severity": "warning", "audience": ["operator"],
            "detector": "stuck", "scope": "station:*", "message": {"vi": "{observed}", "en": "{expected}"}, **patch}  # fmt: skip
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rules": [rule]}), encoding="utf-8")
    with pytest.raises(RuleError, match=error):
        load_rules(path)


def test_open_findings_folds_opens_and_closes() -> None:
    at = T0 + H
    fs = [_finding(True, at), _finding(True, at, "spike"), _finding(False, at + M)]
    assert list(open_findings(fs)) == [("spike", "station:WL-NAMDAN")]


_: Callable[..., object] = run


def test_the_sensor_faults_scenario_labels_what_it_injects() -> None:
    from simulators.scenarios import build_scenario
    from simulators.stream import sensor_history

    begins = T0 + 20 * H
    scenario = build_scenario("sensor-faults", begins, stations=REGISTRY.stations)
    labels = scenario.labels
    assert {lab.kind for lab in labels} == {"stuck", "spike", "drift", "unresponsive"}
    assert scenario.history_h >= 24
    events = list(sensor_history(1, begins, 3 * 3600, REGISTRY, scenario))
    stuck = [e.value["values"]["water_level_m"] for e in events
             if e.key == "WL-QUYCHAU" and e.at >= begins - 3 * H]  # fmt: skip
    assert len(stuck) > 10 and len(set(stuck)) == 1
