"""Alerting while catching up (streams/catch_up.py): the past's findings are history, a loading state is no change."""

from __future__ import annotations

import datetime as dt
import random

import orjson
import pytest

from ioc.contract import US
from ioc.registry import load_registry
from ioc.settings import Settings
from ioc.snapshot import Snapshot
from simulators.sensors import SensorSimulator
from streams.alerting import Alerting
from streams.anomaly import Finding
from streams.catch_up import CatchUp, FindingGate, judged_until
from streams.cyber import IncidentState
from streams.engine import Engine

H = 3600 * US
NOW = dt.datetime(2026, 12, 5, 20, 0, tzinfo=dt.timezone(dt.timedelta(hours=7)))
NOW_US = int(NOW.timestamp() * US)


def finding(active: bool, hours_ago: float, scope: str = "commune:16681") -> Finding:
    at = NOW - dt.timedelta(hours=hours_ago)
    return Finding(detector="dossier_surge", scope=scope, active=active, at=at, domain="dossier", quantity="n")


def keys(fs: list[Finding]) -> list[tuple[bool, float]]:
    return [(f.active, (NOW - f.at).total_seconds() / 3600) for f in fs]


@pytest.mark.parametrize(
    ("opened_h", "closed_h", "raised"),
    [
        (3.5, 2.5, []),  # opened before the 3 h horizon, closed: history
        (2.5, 1.5, [(True, 2.5), (False, 1.5)]),  # opened within it: alerted, then resolved
        (2.99, 2.0, [(True, 2.99), (False, 2.0)]),  # just within
        (3.01, 2.0, []),  # just before
        (72.0, 71.0, []),  # the back-fill's
    ],
)
def test_a_finding_opened_before_the_horizon_and_closed_is_history(
    opened_h: float, closed_h: float, raised: list[tuple[bool, float]]
) -> None:
    gate = FindingGate(3 * H)
    out = gate.admit([finding(True, opened_h), finding(False, closed_h)], NOW_US - H, NOW_US)
    assert [(a, pytest.approx(h)) for a, h in keys(out)] == raised
    assert gate.history == (0 if raised else 1)


def test_a_held_finding_is_raised_once_the_detectors_have_caught_up_if_still_open() -> None:
    gate = FindingGate(3 * H)
    assert gate.admit([finding(True, 30)], NOW_US - 20 * H, NOW_US) == []  # detectors 20 h behind: held
    assert gate.admit([], NOW_US - 4 * H, NOW_US) == []  # still behind the horizon
    out = gate.admit([], NOW_US - 2 * H, NOW_US)  # current: the fault is still under way
    assert keys(out) == [(True, 30.0)]
    assert gate.admit([finding(False, 0.5)], NOW_US, NOW_US)[0].active is False  # its close resolves it


def test_a_close_across_two_admissions_still_makes_history_and_other_scopes_pass() -> None:
    gate = FindingGate(3 * H)
    assert gate.admit([finding(True, 10), finding(True, 1, "commune:17011")], NOW_US - 9 * H, NOW_US) == [
        finding(True, 1, "commune:17011")
    ]
    assert gate.admit([finding(False, 9)], NOW_US - 8 * H, NOW_US) == []
    assert gate.history == 1 and not gate.held


def test_catching_up_while_batches_are_old_and_for_a_moment_after() -> None:
    c = CatchUp(behind_s=600, hold_s=5)
    assert not c.active(100.0)
    c.on_batch(NOW_US - 599 * US, NOW_US, 100.0)
    assert not c.active(100.0)  # 9 min 59 s late: live data
    c.on_batch(NOW_US - 601 * US, NOW_US, 100.0)
    assert c.active(100.0) and c.active(104.9)
    assert not c.active(105.1)
    c.on_batch(0, NOW_US, 200.0)  # a batch of nothing valid
    assert not c.active(200.0)


# --- the worker's alerting: snapshots held while catching up ---------------------------------

T0 = NOW


def overdue(value: float, minutes: float, seq: int) -> Snapshot:
    return Snapshot(
        kpi="dossier.overdue", scope="commune:16681", window="now", value=value, unit="", numerator=None,
        denominator=None, target=None, status=None, as_of=T0 + dt.timedelta(minutes=minutes), seq=seq,
    )  # fmt: skip


def rising(alerting: Alerting) -> list[str]:
    return [e.rule for e in alerting.take() if e.rule == "dossier.overdue_rising" and e.state == "firing"]


@pytest.mark.parametrize("catching_up", [False, True])
def test_a_count_climbing_while_its_state_loads_is_no_rise(catching_up: bool) -> None:
    alerting = Alerting(Settings(), load_registry())
    for i, value in enumerate((0, 4, 9, 16)):  # the back-fill's overdue dossiers, loading
        at = T0 + dt.timedelta(seconds=i)
        alerting.on_snapshots([overdue(value, i / 60, i + 1)], at, catching_up=catching_up)
    alerting.on_snapshots([], T0 + dt.timedelta(seconds=10))  # caught up: the held value goes to the rules
    assert rising(alerting) == ([] if catching_up else ["dossier.overdue_rising"])
    alerting.on_snapshots([overdue(22, 30, 5)], T0 + dt.timedelta(minutes=30))  # a real rise, live
    assert rising(alerting) == (["dossier.overdue_rising"] if catching_up else [])


# --- the worker's input watermark holds the detectors back ------------------------------------


@pytest.mark.parametrize("input_low_h", [None, 5.0])
def test_the_detectors_judge_no_minute_past_the_input_watermark(input_low_h: float | None) -> None:
    """While a backlog is read, a partition behind the others holds the detectors at its event time."""
    registry = load_registry()
    start = NOW - dt.timedelta(hours=12)
    engine = Engine(registry, int(start.timestamp() * US))
    for e in SensorSimulator(random.Random(3), registry.stations, registry.units).events(start, NOW):
        key, parsed = engine.parse(e.topic, orjson.dumps(e.value))
        engine.apply(e.topic, key, parsed, record=False)
    cap = None if input_low_h is None else int((start + dt.timedelta(hours=input_low_h)).timestamp() * US)
    engine.input_low_us = cap
    engine.advance(NOW_US)
    judged = judged_until(engine.anomaly)
    assert judged is not None
    if cap is None:
        assert judged > NOW_US - H  # the stations' watermark: minutes before now
    else:
        assert cap - 2 * 60 * US <= judged <= cap  # held at the slow partition


def test_an_incident_resolved_within_the_backlog_pages_nobody_and_one_still_open_does() -> None:
    def incident(iid: str, resolved: bool) -> IncidentState:
        state = IncidentState(iid, severity="critical", category="ddos", system="portal", title="t")
        state.detected = (int((NOW - dt.timedelta(hours=30)).timestamp() * US), "e1")
        if resolved:
            state.resolved = (int((NOW - dt.timedelta(hours=29)).timestamp() * US), "e2")
        return state

    alerting = Alerting(Settings(), load_registry())
    past, still_open = incident("SOC-1", resolved=False), incident("SOC-2", resolved=False)
    alerting.on_incidents([past, still_open], NOW, catching_up=True)
    past.resolved = (int((NOW - dt.timedelta(hours=29)).timestamp() * US), "e2")  # a later batch resolves it
    alerting.on_incidents([past], NOW, catching_up=True)
    assert alerting.take() == []
    alerting.on_snapshots([], NOW + dt.timedelta(seconds=5))  # caught up
    fired = {e.scope for e in alerting.take() if e.state == "firing"}
    assert len(fired) == 1  # SOC-2 only
