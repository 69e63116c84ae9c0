"""Dossier KPIs from their definitions (CONTRACT §5, Decision 766), driven through the pure engine."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from typing import Any

import pytest

from ioc.registry import load_registry
from ioc.snapshot import Snapshot
from streams.engine import Engine

ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=ICT)
TOPIC = "ioc.dossier.events"
REGISTRY = load_registry(today=NOW.date())


def us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def at(minutes_ago: float) -> str:
    return (NOW - dt.timedelta(minutes=minutes_ago)).isoformat()


def event(dossier_id: str, type_: str, minutes_ago: float, n: int = 0, **fields: Any) -> dict[str, Any]:
    e = {
        "schema": "ioc.dossier.v1",
        "event_id": f"{dossier_id}-{type_}-{n}",
        "dossier_id": dossier_id,
        "type": type_,
        "occurred_at": at(minutes_ago),
        "agency_code": "000.00.16.H40",
        "commune_code": "16681",
    }
    if type_ == "received":
        e.update(channel="online", full_online=False, due_at=at(minutes_ago - 24 * 60), procedure_code="1.004227")
    e.update(fields)
    return e


def run(events: list[dict[str, Any]], now: dt.datetime = NOW) -> dict[tuple[str, str, str], Snapshot]:
    engine = Engine(REGISTRY, us(now))
    for e in events:
        key, parsed = engine.parse(TOPIC, json.dumps(e).encode())
        engine.apply(TOPIC, key, parsed)
    return {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}


Kpis = Callable[..., Snapshot]


def value(snaps: dict[tuple[str, str, str], Snapshot], kpi: str, window: str, scope: str = "province") -> float | None:
    return snaps[(kpi, scope, window)].value


def test_completion_exactly_at_due_at_is_on_time() -> None:
    snaps = run([event("D1", "received", 120, due_at=at(30)), event("D1", "completed", 30)])
    assert value(snaps, "dossier.on_time_rate", "today") == 100.0


def test_dossier_completed_after_deadline_is_late() -> None:
    snaps = run([event("D1", "received", 120, due_at=at(31)), event("D1", "completed", 30)])
    assert value(snaps, "dossier.on_time_rate", "today") == 0.0
    assert value(snaps, "dossier.completed", "today") == 1.0


@pytest.mark.parametrize("outcome", ["returned", "cancelled"])
def test_returned_or_cancelled_dossier_is_not_completed(outcome: str) -> None:
    snaps = run([event("D1", "received", 120), event("D1", outcome, 30)])
    assert value(snaps, "dossier.completed", "today") == 0.0
    assert value(snaps, "dossier.in_progress", "now") == 0.0
    assert value(snaps, "dossier.on_time_rate", "today") is None  # denominator 0 → null


def test_duplicate_events_change_nothing() -> None:
    events = [event("D1", "received", 120), event("D1", "completed", 30)]
    assert run(events) == run(events + events + [events[0]])


def test_events_in_any_order_give_the_same_kpis() -> None:
    events = [event(f"D{i}", "received", 200 - i) for i in range(20)]
    events += [event(f"D{i}", "completed", 100 - i) for i in range(0, 20, 2)]
    events += [event(f"D{i}", "returned", 90) for i in range(1, 6, 2)]
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    assert run(shuffled) == run(events)


def test_completed_before_received_arrives_is_counted_once_received_lands() -> None:
    late_first = run([event("D1", "completed", 30), event("D1", "received", 120)])
    assert value(late_first, "dossier.completed", "today") == 1.0
    assert value(late_first, "dossier.received", "today") == 1.0
    assert value(late_first, "dossier.in_progress", "now") == 0.0


def test_overdue_and_progress_index() -> None:
    snaps = run(
        [
            event("D1", "received", 300, due_at=at(60)),  # in progress, overdue
            event("D2", "received", 300, due_at=at(-60)),  # in progress, not overdue
            event("D3", "received", 300, due_at=at(100)),  # completed on time
            event("D3", "completed", 120),
            event("D4", "received", 300, due_at=at(200)),  # completed late
            event("D4", "completed", 100),
        ]
    )
    assert value(snaps, "dossier.in_progress", "now") == 2.0
    assert value(snaps, "dossier.overdue", "now") == 1.0
    # (on time 1 + in progress not overdue 1) / (completed 2 + in progress 2)
    assert value(snaps, "dossier.progress_index", "today") == 50.0


def test_sliding_window_falls_with_the_clock() -> None:
    events = [event("D1", "received", 23 * 60), event("D2", "received", 30)]
    assert value(run(events), "dossier.received", "24h") == 2.0
    assert value(run(events), "dossier.received", "1h") == 1.0
    later = run(events, NOW + dt.timedelta(hours=2))
    assert value(later, "dossier.received", "24h") == 1.0
    assert value(later, "dossier.received", "1h") == 0.0


def test_today_rolls_over_at_local_midnight() -> None:
    # 23:50 local yesterday vs 00:10 local today, evaluated at 00:30 local.
    now = dt.datetime(2026, 11, 22, 0, 30, tzinfo=ICT)

    def ev(i: int, t: dt.datetime) -> dict[str, Any]:
        return event(f"D{i}", "received", 0, occurred_at=t.isoformat(), due_at=(t + dt.timedelta(days=3)).isoformat())

    snaps = run([ev(1, now - dt.timedelta(minutes=40)), ev(2, now - dt.timedelta(minutes=20))], now)
    assert value(snaps, "dossier.received", "today") == 1.0
    assert value(snaps, "dossier.received", "24h") == 2.0


def test_month_to_date_starts_at_local_month_start() -> None:
    now = dt.datetime(2026, 12, 1, 6, 0, tzinfo=ICT)

    def ev(i: int, t: dt.datetime) -> dict[str, Any]:
        return event(f"D{i}", "received", 0, occurred_at=t.isoformat(), due_at=(t + dt.timedelta(days=3)).isoformat())

    snaps = run(
        [ev(1, dt.datetime(2026, 11, 30, 23, 0, tzinfo=ICT)), ev(2, dt.datetime(2026, 12, 1, 0, 0, tzinfo=ICT))], now
    )
    assert value(snaps, "dossier.received", "mtd") == 1.0


def test_online_rate_is_judged_against_plan_348_target() -> None:
    events = [event(f"D{i}", "received", 60, channel="online" if i < 6 else "in_person") for i in range(10)]
    snaps = run(events)
    s = snaps[("dossier.online_rate", "province", "today")]
    assert (s.value, s.numerator, s.denominator, s.target) == (60.0, 6.0, 10.0, 70.0)
    assert s.status == "breach"  # 10 points below the 70 % target, beyond the 5-point warn band


def test_commune_and_agency_scopes_are_published() -> None:
    snaps = run([event("D1", "received", 60)])
    assert value(snaps, "dossier.received", "today", "commune:16681") == 1.0
    assert value(snaps, "dossier.received", "today", "agency:000.00.16.H40") == 1.0
    assert ("dossier.received", "commune:16690", "today") not in snaps
