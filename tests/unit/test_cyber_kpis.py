"""Cyber KPIs from their definitions (CONTRACT §5): incidents per severity, open incidents, MTTA and MTTR."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from ioc.registry import load_registry
from ioc.snapshot import Snapshot
from streams.engine import Engine

ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=ICT)
TOPIC = "ioc.cyber.incidents"
REGISTRY = load_registry(today=NOW.date())
AGENCY = "000.00.16.H40"
COMMUNE = "16681"
SEVERITIES = ("low", "medium", "high", "critical")

Snaps = dict[tuple[str, str, str], Snapshot]


def us(t: dt.datetime) -> int:
    return int(t.timestamp() * 1_000_000)


def at(minutes_ago: float) -> str:
    return (NOW - dt.timedelta(minutes=minutes_ago)).isoformat()


def incident(incident_id: str, type_: str, minutes_ago: float, n: int = 0, **fields: Any) -> dict[str, Any]:
    e: dict[str, Any] = {
        "schema": "ioc.incident.v1",
        "event_id": f"{incident_id}-{type_}-{n}",
        "incident_id": incident_id,
        "type": type_,
        "occurred_at": at(minutes_ago),
        "agency_code": AGENCY,
        "commune_code": COMMUNE,
        "system": "dichvucong.nghean.gov.vn",
        "system_level": 3,
    }
    if type_ == "detected":
        e.update(severity="medium", category="intrusion", title="Suspicious login")
    e.update(fields)
    return e


def feed(engine: Engine, events: list[dict[str, Any]]) -> None:
    for e in events:
        key, parsed = engine.parse(TOPIC, json.dumps(e).encode())
        engine.apply(TOPIC, key, parsed)


def run(events: list[dict[str, Any]], now: dt.datetime = NOW) -> Snaps:
    engine = Engine(REGISTRY, us(now))
    feed(engine, events)
    return {(s.kpi, s.scope, s.window): s for s in engine.snapshots(changed_only=False)}


def value(snaps: Snaps, kpi: str, window: str, scope: str = "province") -> float | None:
    return snaps[(kpi, scope, window)].value


# --- incidents per severity and window ---------------------------------------------------------

# (minutes before NOW = 10:30 local, counted in 1h, 24h, today). `1h` is the 60 one-minute
# buckets ending with the one holding as_of (09:31–10:30); `today` starts at local midnight.
WINDOW_CASES = [
    (0, (1, 1, 1)),
    (30, (1, 1, 1)),
    (59, (1, 1, 1)),
    (60, (0, 1, 1)),
    (90, (0, 1, 1)),
    (10 * 60 + 30, (0, 1, 1)),  # 00:00 local today
    (10 * 60 + 31, (0, 1, 0)),  # 23:59 local yesterday
    (23 * 60 + 59, (0, 1, 0)),
    (24 * 60, (0, 0, 0)),
    (30 * 60, (0, 0, 0)),
]


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize(("minutes_ago", "expected"), WINDOW_CASES)
def test_incident_counts_in_its_severity_and_window(
    severity: str, minutes_ago: int, expected: tuple[int, int, int]
) -> None:
    snaps = run([incident("I1", "detected", minutes_ago, severity=severity)])
    for window, n in zip(("1h", "24h", "today"), expected, strict=True):
        assert value(snaps, "cyber.incidents", window) == n
        assert value(snaps, f"cyber.incidents.{severity}", window) == n
        for other in SEVERITIES:
            if other != severity:
                assert value(snaps, f"cyber.incidents.{other}", window) == 0


def test_incidents_are_counted_per_severity() -> None:
    counts = {"low": 3, "medium": 1, "high": 2, "critical": 4}
    events = [incident(f"I-{sev}-{i}", "detected", 10 + i, severity=sev) for sev, n in counts.items() for i in range(n)]
    snaps = run(events)
    for window in ("1h", "24h", "today"):
        assert value(snaps, "cyber.incidents", window) == sum(counts.values())
        for sev, n in counts.items():
            assert value(snaps, f"cyber.incidents.{sev}", window) == n


def test_an_incident_detected_twice_counts_once_at_its_earliest_detection() -> None:
    snaps = run([incident("I1", "detected", 30, n=1), incident("I1", "detected", 90, n=2)])
    assert value(snaps, "cyber.incidents", "24h") == 1
    assert value(snaps, "cyber.incidents", "1h") == 0  # the earliest detection, 90 minutes ago


def test_incident_detected_after_the_clock_is_not_counted_yet_in_any_window() -> None:
    # As of 10:30, an incident stamped 10:35 (producer clock skew) has not happened yet. `today`
    # (00:00–10:30) lies inside `24h`, so it can never count more than `24h` does.
    snaps = run([incident("I1", "detected", -5), incident("I2", "detected", 5)])
    assert value(snaps, "cyber.incidents", "1h") == 1
    assert value(snaps, "cyber.incidents", "24h") == 1
    assert value(snaps, "cyber.incidents", "today") == 1


# --- false positives ---------------------------------------------------------------------------

COUNT_KPIS = [(f"cyber.incidents{s}", w) for s in ("", *(f".{v}" for v in SEVERITIES)) for w in ("1h", "24h", "today")]
OPEN_KPIS = [(f"cyber.open{s}", "now") for s in ("", *(f".{v}" for v in SEVERITIES))]


@pytest.mark.parametrize("scope", ["province", f"agency:{AGENCY}", f"commune:{COMMUNE}"])
@pytest.mark.parametrize("fp_first", [False, True], ids=["fp-after-detection", "fp-arrives-first"])
def test_false_positive_is_excluded_from_every_count(scope: str, fp_first: bool) -> None:
    lifecycle = [
        incident("I1", "detected", 40, severity="critical"),
        incident("I1", "acknowledged", 35),
        incident("I1", "false_positive", 20),
    ]
    snaps = run(lifecycle[::-1] if fp_first else lifecycle)
    for kpi, window in COUNT_KPIS + OPEN_KPIS:
        assert value(snaps, kpi, window, scope) == 0, (kpi, window)


def test_false_positive_removes_an_incident_already_counted_and_published() -> None:
    engine = Engine(REGISTRY, us(NOW))
    feed(engine, [incident("I1", "detected", 40, severity="high"), incident("I2", "detected", 30, severity="low")])
    before = {(s.kpi, s.scope, s.window): s.value for s in engine.snapshots(changed_only=True)}
    assert before[("cyber.incidents", "province", "1h")] == 2
    assert before[("cyber.incidents.high", "province", "1h")] == 1
    assert before[("cyber.open", "province", "now")] == 2

    feed(engine, [incident("I1", "false_positive", 10)])
    after = {(s.kpi, s.scope, s.window): s.value for s in engine.snapshots(changed_only=True)}
    for scope in ("province", f"agency:{AGENCY}", f"commune:{COMMUNE}"):
        assert after[("cyber.incidents", scope, "1h")] == 1
        assert after[("cyber.incidents", scope, "today")] == 1
        assert after[("cyber.incidents.high", scope, "24h")] == 0
        assert after[("cyber.open", scope, "now")] == 1
        assert after[("cyber.open.high", scope, "now")] == 0


def test_false_positive_is_left_out_of_mtta_and_mttr() -> None:
    # The product removes a false positive from every figure (streams/cyber.py docstring).
    snaps = run(
        [
            incident("I1", "detected", 40),
            incident("I1", "acknowledged", 30),
            incident("I1", "resolved", 20),
            incident("I1", "false_positive", 10),
        ]
    )
    for kpi in ("cyber.mtta_minutes", "cyber.mttr_minutes"):
        assert value(snaps, kpi, "24h") is None
        assert snaps[(kpi, "province", "24h")].denominator == 0


# --- severity raised by a later event ----------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "raise-arrives-first"])
@pytest.mark.parametrize(
    ("initial", "later", "expected"),
    [
        ("low", "high", "high"),
        ("medium", "critical", "critical"),
        ("low", "medium", "medium"),
        ("high", "low", "high"),  # a later event may raise the severity, never lower it
        ("critical", "medium", "critical"),
    ],
)
def test_later_event_raises_severity_but_never_lowers_it(
    initial: str, later: str, expected: str, reverse: bool
) -> None:
    events = [incident("I1", "detected", 40, severity=initial), incident("I1", "acknowledged", 20, severity=later)]
    snaps = run(events[::-1] if reverse else events)
    for sev in SEVERITIES:
        n = 1 if sev == expected else 0
        assert value(snaps, f"cyber.incidents.{sev}", "1h") == n, sev
        assert value(snaps, f"cyber.incidents.{sev}", "today") == n, sev
        assert value(snaps, f"cyber.open.{sev}", "now") == n, sev
    assert value(snaps, "cyber.incidents", "1h") == 1


def test_raised_severity_moves_a_published_incident_between_severities() -> None:
    engine = Engine(REGISTRY, us(NOW))
    feed(engine, [incident("I1", "detected", 40, severity="low")])
    engine.snapshots(changed_only=True)
    feed(engine, [incident("I1", "contained", 20, severity="critical")])
    after = {(s.kpi, s.scope, s.window): s.value for s in engine.snapshots(changed_only=True)}
    assert after[("cyber.incidents.low", "province", "1h")] == 0
    assert after[("cyber.incidents.critical", "province", "1h")] == 1
    assert ("cyber.incidents", "province", "1h") not in after  # the total did not change


# --- open incidents ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "is_open"),
    [
        (("detected",), True),
        (("detected", "acknowledged"), True),
        (("detected", "contained"), True),
        (("detected", "acknowledged", "contained"), True),
        (("detected", "resolved"), False),
        (("detected", "acknowledged", "contained", "resolved"), False),
        (("detected", "false_positive"), False),
        (("detected", "acknowledged", "false_positive"), False),
        (("acknowledged",), False),  # never detected: not an incident of the catalogue yet
    ],
)
def test_open_means_detected_not_resolved_and_not_false_positive(steps: tuple[str, ...], is_open: bool) -> None:
    events = [incident("I1", step, 60 - 10 * i, severity="high") for i, step in enumerate(steps)]
    snaps = run(events)
    for scope in ("province", f"agency:{AGENCY}", f"commune:{COMMUNE}"):
        assert value(snaps, "cyber.open", "now", scope) == (1 if is_open else 0)
        assert value(snaps, "cyber.open.high", "now", scope) == (1 if is_open else 0)


def test_open_is_a_state_not_a_window() -> None:
    snaps = run([incident("I1", "detected", 5 * 24 * 60), incident("I2", "detected", 3 * 24 * 60)])
    assert value(snaps, "cyber.open", "now") == 2
    assert value(snaps, "cyber.incidents", "24h") == 0


def test_resolution_after_the_clock_leaves_the_incident_open() -> None:
    snaps = run([incident("I1", "detected", 30), incident("I1", "resolved", -10)])
    assert value(snaps, "cyber.open", "now") == 1
    assert value(snaps, "cyber.mttr_minutes", "24h") is None


# --- MTTA and MTTR -----------------------------------------------------------------------------

# (incident, detected minutes ago, acknowledged minutes ago or None, resolved minutes ago or None)
LIFECYCLES = [
    ("I1", 100, 90, 40),  # TTA 10, TTR 60
    ("I2", 50, 20, 5),  # TTA 30, TTR 45
    ("I3", 26 * 60, 25 * 60, 20 * 60),  # TTA 60 (acknowledged 25 h ago: mtd only), TTR 360 (resolved in 24 h)
    ("I4", 30 * 60, 29 * 60, 28 * 60),  # TTA 60, TTR 120: both before the 24 h window, inside this month
    ("I5", 10, None, None),  # neither acknowledged nor resolved: in no mean
    ("I6", 45, 44.5, None),  # TTA 0.5 minutes
]


def lifecycle_events() -> list[dict[str, Any]]:
    events = []
    for iid, d, a, r in LIFECYCLES:
        events.append(incident(iid, "detected", d))
        if a is not None:
            events.append(incident(iid, "acknowledged", a))
        if r is not None:
            events.append(incident(iid, "resolved", r))
    return events


@pytest.mark.parametrize(
    ("kpi", "window", "expected", "n"),
    [
        ("cyber.mtta_minutes", "24h", round((10 + 30 + 0.5) / 3, 2), 3),
        ("cyber.mtta_minutes", "mtd", round((10 + 30 + 60 + 60 + 0.5) / 5, 2), 5),
        ("cyber.mttr_minutes", "24h", round((60 + 45 + 360) / 3, 2), 3),
        ("cyber.mttr_minutes", "mtd", round((60 + 45 + 360 + 120) / 4, 2), 4),
    ],
)
def test_mtta_and_mttr_are_mean_minutes_over_incidents_acknowledged_or_resolved_in_the_window(
    kpi: str, window: str, expected: float, n: int
) -> None:
    snaps = run(lifecycle_events())
    for scope in ("province", f"agency:{AGENCY}"):
        s = snaps[(kpi, scope, window)]
        assert s.value == expected
        assert s.denominator == n
        assert s.unit == "min"


def test_mtta_counts_an_incident_in_the_window_of_its_acknowledgement_not_its_detection() -> None:
    # Detected 30 hours ago, acknowledged 2 hours ago: 28 hours to acknowledge, inside the 24 h window.
    snaps = run([incident("I1", "detected", 30 * 60), incident("I1", "acknowledged", 120)])
    assert value(snaps, "cyber.mtta_minutes", "24h") == 28 * 60
    assert value(snaps, "cyber.incidents", "24h") == 0


def test_mtta_uses_the_earliest_acknowledgement() -> None:
    snaps = run(
        [
            incident("I1", "detected", 60),
            incident("I1", "acknowledged", 30, n=2),
            incident("I1", "acknowledged", 45, n=1),
        ]
    )
    assert value(snaps, "cyber.mtta_minutes", "24h") == 15


def test_mtta_and_mttr_are_null_without_acknowledged_or_resolved_incidents() -> None:
    snaps = run([incident("I1", "detected", 30)])
    for kpi in ("cyber.mtta_minutes", "cyber.mttr_minutes"):
        for window in ("24h", "mtd"):
            assert value(snaps, kpi, window) is None


def test_mtta_and_mttr_per_agency_are_means_over_that_agency_only() -> None:
    snaps = run(
        [
            incident("A1", "detected", 100, agency_code="000.00.03.H40"),
            incident("A1", "acknowledged", 96, agency_code="000.00.03.H40"),
            incident("A1", "resolved", 70, agency_code="000.00.03.H40"),
            incident("B1", "detected", 100, agency_code="000.00.04.H40"),
            incident("B1", "acknowledged", 80, agency_code="000.00.04.H40"),
            incident("B1", "resolved", 10, agency_code="000.00.04.H40"),
        ]
    )
    assert value(snaps, "cyber.mtta_minutes", "24h", "agency:000.00.03.H40") == 4
    assert value(snaps, "cyber.mtta_minutes", "24h", "agency:000.00.04.H40") == 20
    assert value(snaps, "cyber.mtta_minutes", "24h") == 12
    assert value(snaps, "cyber.mttr_minutes", "24h", "agency:000.00.03.H40") == 30
    assert value(snaps, "cyber.mttr_minutes", "24h", "agency:000.00.04.H40") == 90
    assert value(snaps, "cyber.mttr_minutes", "24h") == 60


# --- scopes and windows published --------------------------------------------------------------


def test_incidents_are_counted_per_agency_and_commune() -> None:
    snaps = run(
        [
            incident("I1", "detected", 10, agency_code="000.00.03.H40", commune_code="16681"),
            incident("I2", "detected", 10, agency_code="000.00.03.H40", commune_code="16690"),
            incident("I3", "detected", 10, agency_code="000.00.04.H40", commune_code="16690"),
            incident("I4", "detected", 10, agency_code="000.00.04.H40", commune_code=None),  # provincial system
        ]
    )
    expected = {
        "province": 4,
        "agency:000.00.03.H40": 2,
        "agency:000.00.04.H40": 2,
        "commune:16681": 1,
        "commune:16690": 2,
    }
    for scope, n in expected.items():
        assert value(snaps, "cyber.incidents", "1h", scope) == n, scope
        assert value(snaps, "cyber.open", "now", scope) == n, scope
    cyber_scopes = {scope for kpi, scope, _ in snaps if kpi.startswith("cyber.")}
    assert cyber_scopes == set(expected)  # no scope for the provincial system's missing commune


WINDOWS = [
    ("cyber.incidents", {"1h", "24h", "today"}, {"province", "agency", "commune"}),
    *((f"cyber.incidents.{s}", {"1h", "24h", "today"}, {"province", "agency", "commune"}) for s in SEVERITIES),
    ("cyber.open", {"now"}, {"province", "agency", "commune"}),
    ("cyber.mtta_minutes", {"24h", "mtd"}, {"province", "agency"}),
    ("cyber.mttr_minutes", {"24h", "mtd"}, {"province", "agency"}),
]


@pytest.mark.parametrize(("kpi", "windows", "scope_kinds"), WINDOWS)
def test_cyber_kpi_is_published_for_its_catalogue_scopes_and_windows(
    kpi: str, windows: set[str], scope_kinds: set[str]
) -> None:
    snaps = run(lifecycle_events())
    published: dict[str, set[str]] = {}
    for k, scope, window in snaps:
        if k == kpi:
            published.setdefault(scope.split(":", 1)[0], set()).add(window)
    assert set(published) == scope_kinds
    for kind in scope_kinds:
        assert published[kind] == windows, kind


def test_cyber_kpis_have_no_target_and_no_status() -> None:
    snaps = run(lifecycle_events())
    for (kpi, _, _), s in snaps.items():
        if kpi.startswith("cyber."):
            assert s.target is None
            assert s.status is None
