"""`ioc replay`: run a JSON-lines file of events through the worker's own engine, offline.

Each line is ``{"topic": "...", "value": {...}}``, or ``{"topic": "...", "raw": "<text>"}`` for a
record given as its exact bytes (undecodable bytes as lone surrogates, Python's surrogateescape),
which is how malformed records are written. The output, JSON lines sorted by (kpi, scope, window), is the set of KPI snapshots as
of ``--until`` (default: the latest valid event time). Events after ``--until`` have not happened
yet and are left out. The result depends only on the set of distinct events in the file, not on
their order or on repetitions, because the engine's merges are order-independent.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from alerts import AlertEvent
from alerts.engine import AlertEngine
from alerts.rule_files import default_rules
from ioc.contract import US
from ioc.errors import InvalidEvent
from ioc.registry import Registry
from ioc.snapshot import Snapshot
from streams.anomaly_config import AnomalyConfig
from streams.catch_up import FindingGate, judged_until
from streams.cyber import IncidentState
from streams.engine import KINDS, Engine
from streams.windows import TZ

_encoder = msgspec.json.Encoder(order="sorted")


def _records(path: Path) -> Iterator[tuple[int, str, bytes]]:
    opener = sys.stdin.buffer if str(path) == "-" else path.open("rb")
    with opener as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                topic = doc["topic"]
                raw = (
                    doc["raw"].encode("utf-8", "surrogateescape") if "raw" in doc else json.dumps(doc["value"]).encode()
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                yield n, "", line
                continue
            yield n, topic, raw


#: Alert rules are evaluated minute by minute over at most this much time before ``--until``.
ALERT_SPAN_US = 24 * 3600 * US
STEP_US = 60 * US


def replay(
    path: Path,
    registry: Registry,
    until: dt.datetime | None = None,
    *,
    progress: IO[str] | None = None,
    with_alerts: bool = True,
    anomaly: AnomalyConfig | None = None,
) -> tuple[list[Snapshot], dict[str, int], list[AlertEvent]]:
    """Snapshots as of ``until`` for the events in ``path``, counts, and the alert events on the way.

    Events are applied in event-time order while the clock steps minute by minute through the last
    day before ``until`` (earlier events are applied before the first step), so duration rules
    (`for`, escalation after 15 minutes) play out as they did live. The snapshots do not depend on
    the stepping: applying everything at ``until`` gives the same values.
    """
    engine_for_parse = Engine(registry, 0)
    parsed: list[tuple[str, str, Any]] = []
    stats = {"lines": 0, "valid": 0, "invalid": 0, "duplicates": 0, "after_until": 0}
    started = last_report = time.monotonic()
    for n, topic, raw in _records(path):
        stats["lines"] += 1
        if progress is not None and time.monotonic() - last_report > 1.0:
            last_report = time.monotonic()
            progress.write(f"\rreplay: {n:,} lines read ({n / (last_report - started):,.0f}/s)")
            progress.flush()
        logical = topic[topic.index("ioc.") :] if "ioc." in topic else topic
        if logical not in KINDS:
            stats["invalid"] += 1
            continue
        try:
            key, p = engine_for_parse.parse(logical, raw)
        except InvalidEvent:
            stats["invalid"] += 1
            continue
        parsed.append((logical, key, p))
    stats["valid"] = len(parsed)
    until_us = max((p.t for _, _, p in parsed), default=0) if until is None else int(until.timestamp() * US)
    parsed = [e for e in parsed if e[2].t <= until_us]
    stats["after_until"] = stats["valid"] - len(parsed)
    # Event-time order; ties by topic, key and event id so the order never depends on the file's.
    parsed.sort(key=lambda e: (e[2].t, e[0], e[1], e[2].event.event_id))
    first_step = max(until_us - ALERT_SPAN_US, parsed[0][2].t if parsed else until_us)
    first_step -= first_step % STEP_US
    engine = Engine(registry, first_step, anomaly)
    alerting = AlertEngine.for_registry(default_rules(), registry) if with_alerts else None
    alert_events: list[AlertEvent] = []
    gate = FindingGate(int(engine.anomaly.config.history_after_h * 3600 * US))
    i = 0
    steps = range(first_step, until_us + STEP_US, STEP_US) if with_alerts else range(0)
    for n_step, step in enumerate(steps):
        clock = min(step, until_us)
        while i < len(parsed) and parsed[i][2].t <= clock:
            logical, key, p = parsed[i]
            if not engine.apply(logical, key, p, record=True):
                stats["duplicates"] += 1
            i += 1
        engine.advance(clock)
        now = dt.datetime.fromtimestamp(clock / US, TZ)
        assert alerting is not None
        incidents = [s for s in engine.incidents.changed.values() if isinstance(s, IncidentState)]
        engine.dossiers.changed, engine.incidents.changed, engine.sensors.changed = {}, {}, {}
        for state in incidents:
            alert_events.extend(alerting.on_incident(state, now))
        # The past's findings are history, as for a worker catching up on this file (streams.catch_up).
        for finding in gate.admit(engine.anomaly.take(), judged_until(engine.anomaly), until_us):
            alert_events.extend(alerting.on_finding(finding, now))
        for snapshot in engine.snapshots():
            alert_events.extend(alerting.on_snapshot(snapshot, now))
        alert_events.extend(alerting.tick(now))
        if progress is not None and time.monotonic() - last_report > 1.0:
            last_report = time.monotonic()
            progress.write(f"\rreplay: minute {n_step + 1:,} of {len(steps):,}, {len(alert_events):,} alert events")
            progress.flush()
    for logical, key, p in parsed[i:]:
        if not engine.apply(logical, key, p, record=False):
            stats["duplicates"] += 1
    engine.advance(until_us)
    snapshots = engine.snapshots(changed_only=False)
    snapshots.sort(key=lambda s: (s.kpi, s.scope, s.window))
    if progress is not None:
        progress.write(
            f"\rreplay: {stats['lines']:,} lines, {stats['valid']:,} valid, {len(snapshots):,} snapshots,"
            f" {len(alert_events):,} alert events\n"
        )
    return snapshots, stats, alert_events


def comparable(s: Snapshot) -> dict[str, Any]:
    """A snapshot without the fields that depend on when and how often it was published."""
    d: dict[str, Any] = msgspec.to_builtins(s)
    d.pop("seq", None)
    return d


def write(snapshots: list[Snapshot], out: IO[bytes], alert_events: list[AlertEvent] = ()) -> None:  # type: ignore[assignment]
    """KPI snapshots (sorted by kpi, scope, window), then alert events in the order they happened."""
    for s in snapshots:
        doc = msgspec.to_builtins(s)
        doc["kind"] = "kpi"
        out.write(_encoder.encode(doc) + b"\n")
    for e in alert_events:
        doc = msgspec.to_builtins(e)
        doc["kind"] = "alert"
        out.write(_encoder.encode(doc) + b"\n")
