"""Alerting while catching up: what a worker folding a backlog of old events raises, and what it does not.

A worker that starts on a 30-day back-fill, or comes back after an outage, folds hours or weeks of
events in seconds. Two things would then reach the wall that no operator should see:

* **the past's findings, as new alerts.** The detectors (`streams.anomaly`) find, in the backlog,
  faults that began and ended long ago (a surge last Tuesday). `FindingGate` holds a finding that
  opens more than `AnomalyConfig.history_after_h` before the clock; if its close follows, both are
  history (logged, counted, not alerted). A held finding still open once the detectors have caught
  up is raised then: it is current.
* **the loading itself, as a change.** A KPI that climbs from 0 to its value while its state loads
  looks like a steep rise to a rate-of-change rule. While the worker is catching up (`CatchUp`), the
  snapshots it publishes are held back from the alert rules; when it has caught up, the latest of
  each series is handed over at once, so thresholds that hold now still fire.

`ioc replay` applies the same gate with ``--until`` as the clock, so it raises the alerts a worker
catching up on the same file would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from ioc.contract import US
from streams.anomaly import Detectors, Finding

log = logging.getLogger(__name__)

#: A batch whose newest event is this much older than the clock is part of a backlog.
CATCH_UP_S = 600
#: ...and the worker counts as catching up for this long after such a batch.
CATCH_UP_HOLD_S = 5.0


def judged_until(detectors: Detectors) -> int | None:
    """Event time (µs) up to which the detectors have judged; None before their first bucket."""
    return None if detectors.next_minute is None else detectors.next_minute * 60 * US


def _us(finding: Finding) -> int:
    return int(finding.at.timestamp() * US)


class FindingGate:
    """Findings opened before ``horizon_us`` of the clock are held; with their close, they are history."""

    def __init__(self, horizon_us: int) -> None:
        self.horizon_us = horizon_us
        self.held: dict[tuple[str, str, str], Finding] = {}
        #: Findings that opened and closed in the past: counted, not alerted.
        self.history = 0

    def admit(self, findings: Iterable[Finding], detectors_us: int | None, clock_us: int) -> list[Finding]:
        """The findings to alert on, in order. ``detectors_us``: how far the detectors have judged
        (event time); ``clock_us``: the worker's clock (``--until`` in replay)."""
        cutoff = clock_us - self.horizon_us
        out: list[Finding] = []
        for f in findings:
            key = (f.detector, f.scope, f.quantity)
            if f.active and _us(f) < cutoff:
                self.held[key] = f
            elif not f.active and key in self.held:
                opened = self.held.pop(key)
                self.history += 1
                log.info("past finding, not alerted: %s on %s from %s to %s", f.detector, f.scope, opened.at, f.at)
            else:
                out.append(f)
        if self.held and detectors_us is not None and detectors_us >= cutoff:
            out += sorted(self.held.values(), key=_us)  # still open now the detectors are current
            self.held.clear()
        return out


class CatchUp:
    """Whether the worker is folding a backlog: the newest event of a recent batch is old."""

    def __init__(self, behind_s: float = CATCH_UP_S, hold_s: float = CATCH_UP_HOLD_S) -> None:
        self.behind_us = int(behind_s * US)
        self.hold_s = hold_s
        self.last_backlog_at: float | None = None

    def on_batch(self, newest_us: int, clock_us: int, monotonic: float) -> None:
        if newest_us and clock_us - newest_us > self.behind_us:
            self.last_backlog_at = monotonic

    def active(self, monotonic: float) -> bool:
        return self.last_backlog_at is not None and monotonic - self.last_backlog_at < self.hold_s
