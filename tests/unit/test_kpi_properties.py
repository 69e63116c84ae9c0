"""Properties of the KPI engine over mixed dossier, incident and sensor events (CONTRACT §1: idempotent, event time).

Whatever order events arrive in, however often, however late, and however often snapshots are
taken, the KPIs as of a given clock are the same; the changed-only stream the worker publishes
always agrees with the full set of snapshots at the same clock.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ioc.registry import load_registry
from ioc.snapshot import Snapshot
from streams.engine import Engine

ICT = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 10, 30, tzinfo=ICT)
US = 1_000_000
NOW_US = int(NOW.timestamp()) * US
#: Where a streaming engine's clock starts: before every generated event.
START_US = NOW_US - 4 * 86400 * US
REGISTRY = load_registry(today=NOW.date())

DOSSIER = "ioc.dossier.events"
CYBER = "ioc.cyber.incidents"
SENSOR = "ioc.sensor.readings"
AGENCIES = ("000.00.03.H40", "000.00.04.H40")
COMMUNES = ("16681", "16690", None)
SEVERITIES = ("low", "medium", "high", "critical")
#: Stations generated readings go to: (value name, low, high), values in hundredths.
STATIONS = {
    "AIR-16681": ("pm25", 0.0, 300.0),
    "AIR-16690": ("pm25", 0.0, 300.0),
    "WL-NAMDAN": ("water_level_m", 4.0, 9.5),
    "WL-DUA": ("water_level_m", 20.0, 28.0),
    "RAIN-16690": ("rain_mm", 0.0, 30.0),
    "RAIN-16702": ("rain_mm", 0.0, 30.0),
}
DAYS_3 = 3 * 86400

#: One input record: (logical topic, exact bytes, event time in µs).
Event = tuple[str, bytes, int]
Row = tuple[Any, ...]

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def iso(seconds_ago: int) -> str:
    return (NOW - dt.timedelta(seconds=seconds_ago)).isoformat()


# --- strategies: valid events near NOW -------------------------------------------------------------


@st.composite
def dossier_lifecycle(draw: st.DrawFn, i: int) -> list[tuple[dict[str, Any], int]]:
    received = draw(st.integers(0, DAYS_3))
    channel = draw(st.sampled_from(("online", "in_person", "postal")))
    base = {
        "schema": "ioc.dossier.v1",
        "dossier_id": f"000.00.16.H40-251122-{i:04d}",
        "agency_code": draw(st.sampled_from(AGENCIES)),
        "commune_code": draw(st.sampled_from(COMMUNES)),
    }
    out = [
        (
            {
                **base,
                "type": "received",
                "occurred_at": iso(received),
                "procedure_code": "1.004227",
                "channel": channel,
                "full_online": channel == "online" and draw(st.booleans()),
                "due_at": iso(received - draw(st.integers(0, 4 * 86400))),
            },
            received,
        )
    ]
    for step in ("processing", "supplement_requested"):
        if draw(st.booleans()):
            t = draw(st.integers(0, received))
            out.append(({**base, "type": step, "occurred_at": iso(t)}, t))
    # Usually one outcome; sometimes two rival ones (the earliest must win whatever the order).
    for _ in range(draw(st.sampled_from((0, 1, 1, 1, 2)))):
        outcome = draw(st.sampled_from(("completed", "completed", "returned", "cancelled")))
        t = draw(st.integers(0, received))
        doc = {**base, "type": outcome, "occurred_at": iso(t)}
        if outcome == "completed":
            doc.update(
                paid_online=draw(st.sampled_from((None, True, False))),
                digitized=draw(st.sampled_from((None, True, False))),
                result_digital=draw(st.sampled_from((None, True, False))),
            )
        out.append((doc, t))
    return out


@st.composite
def incident_lifecycle(draw: st.DrawFn, i: int) -> list[tuple[dict[str, Any], int]]:
    detected = draw(st.integers(0, DAYS_3))
    base = {
        "schema": "ioc.incident.v1",
        "incident_id": f"INC-{i}",
        "agency_code": draw(st.sampled_from(AGENCIES)),
        "commune_code": draw(st.sampled_from(COMMUNES)),
        "system": "dichvucong.nghean.gov.vn",
        "system_level": draw(st.integers(1, 5)),
    }
    out = [
        (
            {
                **base,
                "type": "detected",
                "occurred_at": iso(detected),
                "severity": draw(st.sampled_from(SEVERITIES)),
                "category": draw(st.sampled_from(("malware", "phishing", "ddos", "intrusion"))),
                "title": "generated",
            },
            detected,
        )
    ]
    t = detected
    for step in ("acknowledged", "contained"):
        if draw(st.booleans()):
            t = draw(st.integers(0, t))
            doc = {**base, "type": step, "occurred_at": iso(t)}
            raised = draw(st.sampled_from((None, None, *SEVERITIES)))
            if raised is not None:
                doc["severity"] = raised
            out.append((doc, t))
    end = draw(st.sampled_from((None, "resolved", "resolved", "false_positive")))
    if end is not None:
        t = draw(st.integers(0, t))
        out.append(({**base, "type": end, "occurred_at": iso(t)}, t))
    return out


@st.composite
def sensor_readings(draw: st.DrawFn) -> list[tuple[dict[str, Any], int]]:
    out: list[tuple[dict[str, Any], int]] = []
    for _ in range(draw(st.integers(0, 30))):
        if out and draw(st.integers(0, 7)) == 0:
            # A rival: another event for a station and instant already read.
            prev, seconds_ago = draw(st.sampled_from(out))
            station = prev["station_id"]
        else:
            station = draw(st.sampled_from(sorted(STATIONS)))
            seconds_ago = draw(st.one_of(st.integers(0, 4 * 3600), st.integers(0, 30 * 3600)))
        name, lo, hi = STATIONS[station]
        doc = {
            "schema": "ioc.sensor.v1",
            "station_id": station,
            "kind": REGISTRY.stations[station].kind,
            "observed_at": iso(seconds_ago),
            "values": {name: draw(st.integers(round(lo * 100), round(hi * 100))) / 100},
        }
        out.append((doc, seconds_ago))
    return out


@st.composite
def logs(draw: st.DrawFn) -> list[Event]:
    """A log of distinct valid events of all three kinds, in a random order."""
    docs: list[tuple[str, dict[str, Any], int]] = []
    for i in range(draw(st.integers(0, 6))):
        docs += [(DOSSIER, d, t) for d, t in draw(dossier_lifecycle(i))]
    for i in range(draw(st.integers(0, 6))):
        docs += [(CYBER, d, t) for d, t in draw(incident_lifecycle(i))]
    docs += [(SENSOR, d, t) for d, t in draw(sensor_readings())]
    docs = draw(st.permutations(docs))
    return [
        (topic, json.dumps({**doc, "event_id": f"E{n:03d}"}).encode(), NOW_US - seconds_ago * US)
        for n, (topic, doc, seconds_ago) in enumerate(docs)
    ]


def arrivals(draw: st.DrawFn, log: list[Event]) -> list[tuple[int, Event]]:
    """The log in arrival order: each event delayed on time, by hours, or by more than a day; none after NOW."""
    delay = st.one_of(st.just(0), st.integers(0, 3600), st.integers(0, 6 * 3600), st.integers(25 * 3600, 40 * 3600))
    delays = draw(st.lists(delay, min_size=len(log), max_size=len(log)))
    timed = [(min(e[2] + d * US, NOW_US), e) for d, e in zip(delays, log, strict=True)]
    return sorted(timed, key=lambda pair: pair[0])


# --- helpers -------------------------------------------------------------------------------------


def row(s: Snapshot) -> Row:
    """What a snapshot says, without its publication counter."""
    return (s.value, s.unit, s.numerator, s.denominator, s.target, s.status, s.as_of, s.extra)


def table(snapshots: list[Snapshot]) -> dict[str, Row]:
    return {s.key: row(s) for s in snapshots}


def content(r: Row) -> Row:
    """A row without `as_of`: an unchanged value is not re-published, so the one held keeps its old `as_of`."""
    return r[:6] + r[7:]


def apply(engine: Engine, event: Event) -> bool:
    topic, raw, _ = event
    key, parsed = engine.parse(topic, raw)
    return engine.apply(topic, key, parsed)


def batch(events: list[Event], now_us: int = NOW_US) -> dict[str, Row]:
    """All snapshots of a fresh engine fed ``events`` with its clock at ``now_us`` (what `ioc replay` does)."""
    engine = Engine(REGISTRY, now_us)
    for e in events:
        apply(engine, e)
    return table(engine.snapshots(changed_only=False))


def diff(a: dict[str, Row], b: dict[str, Row]) -> list[tuple[str, Row | None, Row | None]]:
    """The keys on which two snapshot tables disagree (for readable failures)."""
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


# --- properties ----------------------------------------------------------------------------------


@PROPERTY
@given(log=logs(), data=st.data())
def test_any_permutation_of_the_events_gives_the_same_snapshots(log: list[Event], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(log))
    assert diff(batch(shuffled), batch(log)) == []


@PROPERTY
@given(log=logs(), data=st.data())
def test_duplicating_any_subset_of_events_changes_nothing(log: list[Event], data: st.DataObject) -> None:
    events = list(log)
    if log:
        for dup in data.draw(st.lists(st.sampled_from(log), max_size=len(log))):
            events.insert(data.draw(st.integers(0, len(events))), dup)
    engine = Engine(REGISTRY, NOW_US)
    applied = [apply(engine, e) for e in events]
    assert sum(applied) <= len(log)  # a re-sent event never counts as a change
    assert diff(table(engine.snapshots(changed_only=False)), batch(log)) == []


@PROPERTY
@given(log=logs(), data=st.data())
def test_events_arriving_late_or_out_of_order_give_the_same_snapshots_at_the_same_clock(
    log: list[Event], data: st.DataObject
) -> None:
    # A worker whose clock follows arrival, publishing and pruning as it goes, some events hours
    # or more than a day late, ends at NOW with what a replay of the whole log gives.
    timed = arrivals(data.draw, log)
    publish = data.draw(st.lists(st.booleans(), min_size=len(timed), max_size=len(timed)))
    engine = Engine(REGISTRY, START_US)
    for (arrival, event), take in zip(timed, publish, strict=True):
        engine.advance(arrival)
        apply(engine, event)
        if take:
            engine.snapshots(changed_only=True)
            engine.prune()
    engine.advance(NOW_US)
    assert diff(table(engine.snapshots(changed_only=False)), batch(log)) == []


@PROPERTY
@given(log=logs(), data=st.data())
def test_replaying_a_prefix_then_the_whole_log_equals_processing_once(log: list[Event], data: st.DataObject) -> None:
    crash_at = data.draw(st.integers(0, len(log)))
    engine = Engine(REGISTRY, START_US)
    for event in log[:crash_at]:
        engine.advance(event[2])
        apply(engine, event)
        engine.snapshots(changed_only=True)
    # Restarted from the last committed offset (the beginning): everything again, the prefix a second time.
    for event in log:
        engine.advance(event[2])
        apply(engine, event)
    engine.advance(NOW_US)
    assert diff(table(engine.snapshots(changed_only=False)), batch(log)) == []


@PROPERTY
@given(log=logs(), data=st.data())
def test_changed_only_stream_always_agrees_with_the_full_snapshot_at_the_same_clock(
    log: list[Event], data: st.DataObject
) -> None:
    # `worker` publishes changed-only snapshots; `twin` sees the same events and clock and reports
    # everything. What a consumer of the changed-only stream holds must always be the full truth.
    timed = arrivals(data.draw, log)
    checkpoints = data.draw(st.lists(st.booleans(), min_size=len(timed), max_size=len(timed)))
    worker, twin = Engine(REGISTRY, START_US), Engine(REGISTRY, START_US)
    held: dict[str, Row] = {}
    seqs: dict[str, int] = {}

    def checkpoint() -> None:
        emitted = worker.snapshots(changed_only=True)
        full = table(twin.snapshots(changed_only=False))
        for s in emitted:
            assert s.key in full, f"{s.key} emitted but not in the full snapshot"
            assert row(s) == full[s.key], s.key
            assert s.seq > seqs.get(s.key, 0), f"{s.key}: seq {s.seq} after {seqs.get(s.key)}"
            seqs[s.key] = s.seq
            held[s.key] = content(row(s))
        now = {k: content(r) for k, r in full.items()}
        assert diff(held, now) == [], "the changed-only stream left a stale or missing value"

    for (arrival, event), take in zip(timed, checkpoints, strict=True):
        for engine in (worker, twin):
            engine.advance(arrival)
            apply(engine, event)
        if take:
            checkpoint()
    for engine in (worker, twin):
        engine.advance(NOW_US)
    checkpoint()
    assert held == {k: content(r) for k, r in batch(log).items()}


# --- pruning (the worker prunes periodically, `ioc replay` never does) ------------------------------


def _dossier(event_id: str, type_: str, days_ago: int) -> Event:
    doc: dict[str, Any] = {
        "schema": "ioc.dossier.v1",
        "event_id": event_id,
        "dossier_id": "000.00.16.H40-251008-0001",
        "type": type_,
        "occurred_at": iso(days_ago * 86400),
        "agency_code": AGENCIES[0],
        "commune_code": "16681",
    }
    if type_ == "received":
        doc.update(channel="online", full_online=True, due_at=iso((days_ago - 3) * 86400), procedure_code="1.004227")
    return DOSSIER, json.dumps(doc).encode(), NOW_US - days_ago * 86400 * US


def _incident(event_id: str, type_: str, days_ago: int) -> Event:
    doc: dict[str, Any] = {
        "schema": "ioc.incident.v1",
        "event_id": event_id,
        "incident_id": "INC-OLD",
        "type": type_,
        "occurred_at": iso(days_ago * 86400),
        "agency_code": AGENCIES[0],
        "commune_code": "16681",
    }
    if type_ == "detected":
        doc.update(severity="high", category="ddos")
    return CYBER, json.dumps(doc).encode(), NOW_US - days_ago * 86400 * US


# A lifecycle that ended 41 days before NOW: its terminal state is dropped from memory by `prune`.
OLD_LIFECYCLES = {
    "dossier-completed": [_dossier("OLD-1", "received", 45), _dossier("OLD-2", "completed", 41)],
    "dossier-cancelled": [_dossier("OLD-1", "received", 45), _dossier("OLD-2", "cancelled", 41)],
    "incident-resolved": [_incident("OLD-1", "detected", 45), _incident("OLD-2", "resolved", 41)],
    "incident-false-positive": [_incident("OLD-1", "detected", 45), _incident("OLD-2", "false_positive", 41)],
}


@pytest.mark.parametrize("redelivered", ["first", "all"])
@pytest.mark.parametrize("name", sorted(OLD_LIFECYCLES))
def test_re_sent_events_of_a_long_finished_entity_change_nothing_after_pruning(name: str, redelivered: str) -> None:
    # CONTRACT §1: events can arrive duplicated at any time and processing is idempotent. A re-sent
    # `received`/`detected` of a dossier or incident that finished long ago must not bring it back.
    lifecycle = OLD_LIFECYCLES[name]
    engine = Engine(REGISTRY, NOW_US)
    for event in lifecycle:
        apply(engine, event)
    engine.snapshots(changed_only=True)
    engine.prune()
    for event in lifecycle[:1] if redelivered == "first" else lifecycle:
        apply(engine, event)
    assert diff(table(engine.snapshots(changed_only=False)), batch(lifecycle)) == []


def test_entity_scopes_are_built_once_per_pair_and_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams import kpi

    assert kpi.entity_scopes("16681", "000.00.16.H40") == ("province", "commune:16681", "agency:000.00.16.H40")
    assert kpi.entity_scopes("16681", "000.00.16.H40") is kpi.entity_scopes("16681", "000.00.16.H40")
    assert kpi.entity_scopes(None, "A") == ("province", "agency:A")
    assert kpi.entity_scopes("16681", None) == ("province", "commune:16681")
    assert kpi.entity_scopes(None, None) == ("province",)
    monkeypatch.setattr(kpi, "_SCOPES_MAX", 10)
    for i in range(25):
        assert kpi.entity_scopes(None, f"agency-{i}") == ("province", f"agency:agency-{i}")
    assert len(kpi._SCOPES) <= 10
