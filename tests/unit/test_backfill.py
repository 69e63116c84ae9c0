"""The back-fill (simulators/backfill.py): seeded, valid, in event time, with lifecycles that finish and a flood."""

from __future__ import annotations

import collections
import datetime as dt
import itertools

import orjson
import pytest

from ioc.registry import Registry, load_registry
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER, TOPIC_SENSOR
from simulators.backfill import BackfillPlan, KpiHistory, backfill_events
from simulators.envelope import VN_TZ, Event
from simulators.stream import generate
from streams.engine import Engine

NOW = dt.datetime(2026, 11, 25, 15, 20, tzinfo=VN_TZ)  # a Wednesday afternoon
PLAN = BackfillPlan(days=8, dossiers_per_day=600, incidents_per_day=60)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="module")
def events(registry: Registry) -> list[Event]:
    return list(backfill_events(7, NOW, PLAN, registry))


def test_the_same_seed_and_now_give_the_same_events(registry: Registry, events: list[Event]) -> None:
    again = itertools.islice(backfill_events(7, NOW, PLAN, registry), 2000)
    assert [e.value for e in again] == [e.value for e in events[:2000]]
    other = itertools.islice(backfill_events(8, NOW, PLAN, registry), 2000)
    assert [e.value for e in other] != [e.value for e in events[:2000]]


def test_events_are_in_event_time_within_the_days_before_now_and_all_valid(
    registry: Registry, events: list[Event]
) -> None:
    times = [e.at for e in events]
    assert times == sorted(times)
    assert NOW - dt.timedelta(days=PLAN.days) <= times[0] and times[-1] < NOW
    engine = Engine(registry, int(NOW.timestamp() * 1_000_000))
    for e in events:  # raises InvalidEvent for anything the worker would dead-letter
        engine.parse(e.topic, orjson.dumps(e.value))
    kinds = collections.Counter(e.topic for e in events)
    assert kinds[TOPIC_DOSSIER] > 0 and kinds[TOPIC_CYBER] > 0 and kinds[TOPIC_SENSOR] > 0


def test_dossiers_complete_on_time_and_late_and_incidents_are_acknowledged_and_resolved(events: list[Event]) -> None:
    dossier_types = collections.Counter(e.value["type"] for e in events if e.topic == TOPIC_DOSSIER)
    assert dossier_types["completed"] > 0.8 * dossier_types["received"] * 0.8
    due = {e.value["dossier_id"]: e.value["due_at"] for e in events if e.value.get("type") == "received"}
    done = [
        (e.value["occurred_at"], due[e.value["dossier_id"]])
        for e in events
        if e.topic == TOPIC_DOSSIER and e.value["type"] == "completed" and e.value["dossier_id"] in due
    ]
    late = sum(dt.datetime.fromisoformat(at) > dt.datetime.fromisoformat(by) for at, by in done)
    assert 0 < late < 0.2 * len(done)
    incident_types = collections.Counter(e.value["type"] for e in events if e.topic == TOPIC_CYBER)
    assert incident_types["acknowledged"] > 0.8 * incident_types["detected"]
    assert incident_types["resolved"] > 0.5 * incident_types["detected"]


def test_today_has_completed_dossiers(events: list[Event]) -> None:
    midnight = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
    assert any(e.value.get("type") == "completed" and e.at >= midnight for e in events if e.topic == TOPIC_DOSSIER)


def test_one_past_flood_takes_nam_dan_above_alarm_level_iii_and_back(registry: Registry, events: list[Event]) -> None:
    bd3 = registry.stations["WL-NAMDAN"].alarm_levels_m[2]
    assert bd3 is not None
    levels = [(e.at, e.value["values"]["water_level_m"]) for e in events if e.key == "WL-NAMDAN"]
    above = [at for at, v in levels if v >= bd3]
    assert above and NOW - dt.timedelta(hours=72) < min(above) and max(above) < NOW - dt.timedelta(hours=24)
    assert levels[-1][1] < registry.stations["WL-NAMDAN"].alarm_levels_m[0]  # receded below BĐ I by now


def test_intake_and_cadence_have_no_step_anywhere_in_the_past(events: list[Event]) -> None:
    """The detectors learn the normal from this past: a thinner older part read as surges and drifts."""
    first_half = NOW - dt.timedelta(days=PLAN.days / 2)
    air = [e.at for e in events if e.key == "AIR-16681"]
    older, recent = [t for t in air if t < first_half], [t for t in air if t >= first_half]
    expected = PLAN.days / 2 * 86400 / 300  # the registry's 5-minute cadence, both halves
    assert len(older) == pytest.approx(expected, rel=0.05) and len(recent) == pytest.approx(expected, rel=0.05)
    received = collections.Counter(
        (e.at - NOW).days for e in events if e.topic == TOPIC_DOSSIER and e.value["type"] == "received"
    )
    same_days = [received[-1], received[-8]]  # the 24 hours before now, and the same 24 hours a week before
    assert min(same_days) > 0.85 * max(same_days)


def test_kpi_history_has_the_chart_series_hourly_and_the_gauges_every_step(
    registry: Registry, events: list[Event]
) -> None:
    start = NOW - dt.timedelta(days=PLAN.days)
    recorder = KpiHistory(registry, start, NOW, PLAN.history_step)
    for e in events:
        recorder.add(e, orjson.dumps(e.value))
    rows = recorder.finish()
    series = collections.defaultdict(list)
    for r in rows:
        series[(r.kpi, r.scope, r.window)].append(r)
    received = series[("dossier.received", "province", "today")]
    assert len(received) == PLAN.days * 24  # every hour from the first up to the current one (live)
    assert all(r.as_of.minute == 59 and r.as_of.second == 59 for r in received)
    # "today" counts restart at local midnight and grow through the day.
    by_day = collections.defaultdict(list)
    for r in received:
        by_day[r.as_of.astimezone(VN_TZ).date()].append(r.value or 0.0)
    assert all(values == sorted(values) for values in by_day.values())
    on_time = [r.value for r in series[("dossier.on_time_rate", "province", "today")] if r.value is not None]
    assert on_time and all(50 <= v <= 100 for v in on_time)
    level = series[("water.level_m", "station:WL-NAMDAN", "now")]
    assert len(level) == pytest.approx(72 * 4, abs=2)
    bd3 = registry.stations["WL-NAMDAN"].alarm_levels_m[2]
    assert bd3 is not None and max(r.value for r in level if r.value is not None) >= bd3
    aqi = [r for r in series[("env.aqi", "station:AIR-16681", "now")] if r.value is not None]
    assert 20 <= len(aqi) <= 26
    # Commune series on today and on the same weekday a week ago only.
    commune = series[("dossier.received", "commune:17935", "today")]
    days = {r.as_of.astimezone(VN_TZ).date() for r in commune}
    assert days == {NOW.date(), NOW.date() - dt.timedelta(days=7)}
    assert all(r.seq == 0 for r in rows)


def test_open_lifecycles_go_on_after_now_in_the_continuation(registry: Registry, events: list[Event]) -> None:
    future: list[Event] = []
    past = list(backfill_events(7, NOW, PLAN, registry, future=future))
    assert [e.value for e in past] == [e.value for e in events]  # the past does not change
    assert future and all(e.at > NOW - dt.timedelta(milliseconds=1) for e in future)
    assert [e.at for e in future] == sorted(e.at for e in future)
    final = {"completed", "returned", "cancelled", "resolved", "false_positive"}
    ended = {e.key for e in past if e.value.get("type") in final}
    open_at_now = {e.key for e in past if e.topic in (TOPIC_DOSSIER, TOPIC_CYBER)} - ended
    finished_later = {e.key for e in future if e.value["type"] in final}
    # Every lifecycle open at now is finished by its continuation, and nothing else is in it.
    assert open_at_now == finished_later == {e.key for e in future}
    day = NOW + dt.timedelta(days=1)
    live = generate(7, NOW, 0.5, registry=registry, until=day, continuation=future)
    sent = {r.event.get("event_id") for r in live if r.event}
    due = {e.value["event_id"] for e in future if e.at <= day}
    assert due and due <= sent
