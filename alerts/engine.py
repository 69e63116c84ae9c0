"""The alert engine: evaluates rules over KPI snapshots and incidents and runs the alert lifecycle.

Pure: no broker, database, event loop or wall clock. Time only moves through the ``now`` (and the
snapshot's ``as_of`` / the incident's event times) that callers pass in, and every timer (a
``for`` duration coming due, an escalation, a repeat, a silence ending) fires at its own deadline
in time order, whatever the cadence of `tick`: the same inputs in the same order give the same
alert events, in the worker and in ``ioc replay`` alike.

Alertmanager's ideas, ThingsBoard's lifecycle:

- one alert per fingerprint (rule + scope; rule + incident for incident rules): a condition that
  keeps holding, or flaps inside its hysteresis band, stays one alert;
- firing → acknowledged → resolved, plus silenced and escalated; every transition is an
  `AlertEvent` (who, when, why);
- silences and inhibitions keep the state but mark the events ``notify=False``; a rule's
  ``group_by``/``group_window`` folds a burst of notifications into the group's first one;
- ``repeat`` reminds while unacknowledged; ``unacknowledged`` rules escalate.

By job: `alerts.conditions` (how each rule judges its input), `alerts.lifecycle` (the steps of an
alert and silences), `alerts.notify` (which events notify), `alerts.timers` (what comes due when),
over the shared `alerts.state`; this module is the public face and runs the timers.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import msgspec

from alerts.conditions import ConditionsMixin
from alerts.inputs import Finding, Incident
from alerts.lifecycle import LifecycleMixin, operator_event
from alerts.model import TRANSITIONS, Alert, AlertEvent, AlertState
from alerts.notify import LOUD, NotificationMixin
from alerts.rules import RuleSet, UnacknowledgedRule, matchers_from
from alerts.state import (
    EPOCH,
    AlertEngineError,
    Record,
    Silence,
    SilenceError,
    UnknownAlert,
    alert_id_for,
    aware,
    silence_id,
)
from alerts.timers import Timer, TimerKind
from ioc.contract import INCIDENT_STEPS
from ioc.snapshot import Snapshot

if TYPE_CHECKING:
    from ioc.registry import Registry

__all__ = [
    "DEADLETTER_KPI",
    "EPOCH",
    "AlertEngine",
    "AlertEngineError",
    "Silence",
    "SilenceError",
    "UnknownAlert",
    "alert_id_for",
    "operator_event",
    "silence_id",
]

log = logging.getLogger(__name__)

#: The KPI `on_deadletters` feeds to the rules (not in the CONTRACT §5 catalogue: internal to alerts).
DEADLETTER_KPI = "platform.deadletter_rate"


class AlertEngine(ConditionsMixin, LifecycleMixin, NotificationMixin):
    """Turns snapshots, incidents and operator actions into `AlertEvent` lists, deterministically.

    Drive it with `on_snapshot` (every KPI snapshot the worker publishes), `on_incident` (every
    changed incident state), `on_deadletters` and `tick` (the worker's clock); operator actions
    come in through `acknowledge`/`resolve`/`add_silence`/`expire_silence`, or as events made
    elsewhere through `apply_external`. Every method returns the events it caused, ordered by time.
    """

    def __init__(
        self,
        rules: RuleSet,
        *,
        station_communes: Mapping[str, str] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(rules, station_communes=station_communes, names=names)

    @classmethod
    def for_registry(cls, rules: RuleSet, registry: Registry) -> AlertEngine:
        """An engine that knows the province's stations (their communes) and the names of units and stations."""
        names = {f"commune:{u.code}": u.name for u in registry.units.values()}
        names.update({f"station:{s.station_id}": s.name or s.station_id for s in registry.stations.values()})
        return cls(
            rules, station_communes={s.station_id: s.commune_code for s in registry.stations.values()}, names=names
        )

    def on_snapshot(self, snapshot: Snapshot, now: dt.datetime) -> list[AlertEvent]:
        """Evaluate the threshold, rate-of-change and absence rules of this snapshot's KPI and window.

        The snapshot is judged at its ``as_of`` (or the engine's clock, when it comes late); timers
        up to that moment run first, those up to ``now`` after.
        """
        aware(now)
        rules = self._by_kpi.get((snapshot.kpi, snapshot.window))
        if rules:
            t = snapshot.as_of if self._clock is None or snapshot.as_of > self._clock else self._clock
            self._advance(t)
            last = self._seen.get(snapshot.key)
            if last is None or snapshot.as_of >= last:  # an older snapshot of a series is stale
                self._seen[snapshot.key] = snapshot.as_of
                for rule in rules:
                    if rule.applies_to(snapshot.kpi, snapshot.window, snapshot.scope):
                        self._evaluate(rule, snapshot, t)
        self._advance(now)
        return self._drain()

    def on_incident(self, state: Incident, now: dt.datetime) -> list[AlertEvent]:
        """Evaluate the ``event`` rules on an incident's merged state (`alerts.inputs.Incident`, e.g. `streams.cyber.IncidentState`).

        Pass the state after every change (the KPI engine's changed entities): detection fires,
        an ``acknowledged`` or ``contained`` step acknowledges (by ``soc``), ``resolved`` or
        ``false_positive`` resolves, a severity raised out of a rule's match resolves that rule's
        alert. Each step takes effect at its own event time.
        """
        aware(now)
        steps: list[tuple[int, int, str, str]] = []  # (µs, order, step, event id)
        for order, step in enumerate(INCIDENT_STEPS):
            value = getattr(state, step)
            if value is not None:
                steps.append((value[0], order, step, value[1]))
        steps.sort()
        for rule in self._event_rules:
            self._incident(rule, state, steps)
        self._advance(now)
        return self._drain()

    def on_finding(self, finding: Finding, now: dt.datetime) -> list[AlertEvent]:
        """Evaluate the ``anomaly`` rules on a finding of `streams.anomaly`: an open finding fires
        (after the rule's ``for``), a closed one resolves the alert after ``clear_for``. The finding is
        judged at its own event time (or the engine's clock, when it comes late)."""
        aware(now)
        rules = [r for r in self._anomaly_rules if r.applies_to(finding.detector, finding.scope)]
        if rules:
            t = finding.at if self._clock is None or finding.at > self._clock else self._clock
            self._advance(t)
            for rule in rules:
                key = f"{rule.id}|{finding.scope}"
                if key not in self._series and not finding.active:
                    continue
                s = self._series_for(rule, key, finding.scope)
                obs = self._observe_finding(finding) if finding.active or s.obs is None else s.obs
                self._condition(s, t, finding.active, not finding.active, rule.for_, rule.clear_for, obs)
        self._advance(now)
        return self._drain()

    def on_deadletters(self, count: int, total: int, now: dt.datetime, window: str = "1h") -> list[AlertEvent]:
        """Feed the dead-letter rate (``count`` of ``total`` input records, in %) to the rules on
        `DEADLETTER_KPI` (scope ``province``)."""
        snapshot = Snapshot(
            kpi=DEADLETTER_KPI,
            scope="province",
            window=window,
            value=round(100.0 * count / total, 3) if total else None,
            unit="%",
            numerator=float(count),
            denominator=float(total),
            target=None,
            status=None,
            as_of=now,
            seq=0,
        )
        return self.on_snapshot(snapshot, now)

    def tick(self, now: dt.datetime) -> list[AlertEvent]:
        """Move the clock: ``for`` durations, clearing, absences, escalations, repeats and silences come due."""
        aware(now)
        self._advance(now)
        return self._drain()

    def acknowledge(self, alert_id: str, by: str, now: dt.datetime, reason: str | None = None) -> list[AlertEvent]:
        """Someone takes the alert on: escalation and reminders stop. Acknowledging twice changes nothing.

        An acknowledgement at the very instant an escalation is due wins (the deadline is inclusive).
        """
        aware(now)
        self._advance(now, inclusive=False)
        rec = self._record(alert_id)
        if rec.alert.state is not AlertState.ACKNOWLEDGED:
            self._acknowledge(rec, now, by, reason)
        self._advance(now)
        return self._drain()

    def resolve(self, alert_id: str, by: str, now: dt.datetime, reason: str | None = None) -> list[AlertEvent]:
        """Close the alert by hand (ThingsBoard's "clear"). If its condition still holds, no new
        alert opens until the condition has cleared once (no instant re-fire)."""
        aware(now)
        self._advance(now, inclusive=False)
        rec = self._record(alert_id)
        self._latch(rec)
        self._resolve(rec, now, by, reason)
        self._advance(now)
        return self._drain()

    def apply_external(self, event: AlertEvent) -> bool:
        """Apply an acknowledgement or resolution made elsewhere (the API) and published on ``ioc.alerts``.

        Returns whether it changed anything: the engine's own events coming back, events of alerts
        it no longer holds, and steps the lifecycle forbids are ignored (logged).
        """
        rec = self._alerts.get(self._ids.get(event.alert_id, ""))
        if rec is None or event.by == "system" or event.state is rec.alert.state:
            return False
        if event.state not in (AlertState.ACKNOWLEDGED, AlertState.RESOLVED):
            return False
        if event.state not in TRANSITIONS[rec.alert.state]:
            log.warning("ignoring %s of alert %s in state %s", event.state, event.alert_id, rec.alert.state)
            return False
        if event.state is AlertState.ACKNOWLEDGED:
            rec.alert.apply(event)
            self._quiet(rec)
        else:
            self._latch(rec)
            rec.alert.apply(event)
            self._forget(rec, event.at)
        return True

    def add_silence(
        self,
        matchers: Mapping[str, str | Sequence[str]],
        starts: dt.datetime,
        ends: dt.datetime,
        by: str,
        reason: str,
    ) -> Silence:
        """Mute notifications of alerts matching every matcher (label → glob or globs) from ``starts``
        to ``ends``. Matching alerts move to ``silenced`` when the engine's clock reaches ``starts``
        (the next call): their state keeps running (they still resolve), their events do not notify.
        The id is derived from the content, so re-sending the same silence is harmless."""
        aware(starts)
        aware(ends)
        try:
            parsed = matchers_from(dict(matchers))
        except ValueError as e:
            raise SilenceError(str(e)) from None
        if ends <= starts:
            raise SilenceError("a silence must end after it starts")
        if not by.strip() or not reason.strip():
            raise SilenceError("a silence needs who (by) and why (reason)")
        canonical = {m.label: m.patterns for m in parsed}
        sid = silence_id(canonical, starts, ends, by, reason)
        if sid in self._silences:
            return self._silences[sid]
        silence = Silence(id=sid, matchers=canonical, starts_at=starts, ends_at=ends, created_by=by, reason=reason)
        self._silences[sid] = silence
        self._timers.schedule(Timer(TimerKind.SILENCE_START, sid), starts)
        self._timers.schedule(Timer(TimerKind.SILENCE_END, sid), ends)
        return silence

    def expire_silence(self, silence_id: str, by: str, now: dt.datetime) -> list[AlertEvent]:
        """End a silence early; alerts it held that still fire become ``firing`` again (and notify)."""
        aware(now)
        silence = self._silences.get(silence_id)
        if silence is None:
            raise SilenceError(f"no silence {silence_id!r}")
        self._advance(now, inclusive=False)
        if silence.expired_at is None and now < silence.ends_at:
            self._silences[silence_id] = msgspec.structs.replace(
                silence, expired_by=by, expired_at=now, ends_at=max(now, silence.starts_at)
            )
            self._timers.cancel(Timer(TimerKind.SILENCE_START, silence_id))
            self._timers.cancel(Timer(TimerKind.SILENCE_END, silence_id))
            self._end_silence(silence_id, now, by)
        self._advance(now)
        return self._drain()

    def set_rules(self, rules: RuleSet, now: dt.datetime) -> list[AlertEvent]:
        """Swap in a reloaded rule set: alerts of rules that are gone (or changed kind) resolve;
        the others keep their state and follow the new definition from now on."""
        aware(now)
        self._advance(now)
        for rec in list(self._alerts.values()):
            new = rules.by_id.get(rec.rule.id)
            if new is None or type(new) is not type(rec.rule):
                self._resolve(rec, now, "system", f"rule {rec.rule.id} removed from the rule set")
            else:
                rec.rule = new
        for key, series in list(self._series.items()):
            new = rules.by_id.get(series.rule.id)
            if new is None or type(new) is not type(series.rule):
                self._timers.cancel(Timer(TimerKind.PENDING, key))
                self._timers.cancel(Timer(TimerKind.CLEAR, key))
                self._timers.cancel(Timer(TimerKind.ABSENCE, key))
                del self._series[key]
            else:
                series.rule = new
        self.rules = rules
        self._index()
        for rec in self._alerts.values():  # escalation rules added for alerts already open
            if not rec.escalated:
                for u in self._escalations.get(rec.rule.id, ()):
                    if Timer(TimerKind.ESCALATE, rec.alert.fingerprint, u.id) not in self._timers:
                        self._timers.schedule(Timer(TimerKind.ESCALATE, rec.alert.fingerprint, u.id), rec.alert.started_at + u.after)
        self._advance(now)
        return self._drain()

    def restore(self, alerts: Iterable[Alert], now: dt.datetime) -> int:
        """Adopt alerts that were open before a restart (the worker reads them from `alert_current`).

        The same condition then does not fire them again under a new id, an operator's step on them
        is applied, they still resolve when their condition clears, and an escalation not yet due
        still happens on time. Alerts of rules that no longer exist are left alone."""
        adopted = 0
        for alert in alerts:
            rule = self.rules.by_id.get(alert.rule)
            if rule is None or alert.state is AlertState.RESOLVED or alert.fingerprint in self._alerts:
                continue
            labels = dict(alert.labels or {})
            rec = Record(
                alert, rule, f"{rule.id}|{alert.scope}", {"rule": rule.id, "scope": alert.scope}, labels, None
            )
            rec.notified = True
            rec.escalated = alert.state is AlertState.ESCALATED
            self._alerts[alert.fingerprint] = rec
            self._ids[alert.alert_id] = alert.fingerprint
            if alert.state in (AlertState.FIRING, AlertState.SILENCED) and not rec.escalated:
                for u in self._escalations.get(rule.id, ()):
                    self._timers.schedule(Timer(TimerKind.ESCALATE, alert.fingerprint, u.id), alert.started_at + u.after)
            adopted += 1
        self._advance(now)
        return adopted

    def active(self) -> list[Alert]:
        """Copies of the alerts not resolved yet, oldest first."""
        recs = sorted(self._alerts.values(), key=lambda r: (r.alert.started_at, r.alert.alert_id))
        return [msgspec.structs.replace(r.alert) for r in recs]

    def get(self, alert_id: str) -> Alert | None:
        fp = self._ids.get(alert_id)
        return msgspec.structs.replace(self._alerts[fp].alert) if fp else None

    def silences(self) -> list[Silence]:
        return sorted(self._silences.values(), key=lambda s: (s.starts_at, s.id))

    def _advance(self, until: dt.datetime, *, inclusive: bool = True) -> None:
        while (due := self._timers.pop_due(until, inclusive=inclusive)) is not None:
            at, timer = due
            if self._clock is None or at > self._clock:
                self._clock = at
            self._run(timer, at)
        if self._clock is None or until > self._clock:
            self._clock = until

    def _run(self, timer: Timer, at: dt.datetime) -> None:
        kind, key = timer.kind, timer.key
        if kind is TimerKind.SILENCE_START:
            self._start_silence(key, at)
        elif kind is TimerKind.SILENCE_END:
            self._end_silence(key, at, "system")
        elif kind is TimerKind.PENDING:
            s = self._series.get(key)
            if s is not None and s.pending_since is not None and s.fp not in self._alerts:
                self._fire_series(s, at)
        elif kind is TimerKind.CLEAR:
            s = self._series.get(key)
            if s is not None and s.fp in self._alerts:
                self._resolve(self._alerts[s.fp], at, "system", "condition cleared")
        elif kind is TimerKind.ABSENCE:
            s = self._series.get(key)
            if s is not None and s.fp not in self._alerts and not s.latched:
                self._fire_series(s, at)
        elif kind is TimerKind.ESCALATE:
            rec = self._alerts.get(key)
            u = self.rules.by_id.get(timer.rule)
            unacknowledged = rec is not None and rec.alert.state is AlertState.FIRING and not rec.escalated
            if unacknowledged and rec is not None and isinstance(u, UnacknowledgedRule):
                self._escalate(rec, u, at)
        elif kind is TimerKind.REPEAT:
            rec = self._alerts.get(key)
            if rec is None or rec.rule.repeat is None:
                return
            if rec.alert.state in LOUD and rec.silenced_by is None:
                rec.repeats += 1
                self._transition(rec, rec.alert.state, at, "system", "still not acknowledged", repeat=rec.repeats)
            if rec.alert.state is not AlertState.ACKNOWLEDGED:
                self._timers.schedule(Timer(TimerKind.REPEAT, key), at + rec.rule.repeat)

    def _record(self, alert_id: str) -> Record:
        fp = self._ids.get(alert_id)
        if fp is None:
            raise UnknownAlert(f"no active alert {alert_id!r}")
        return self._alerts[fp]

    def _drain(self) -> list[AlertEvent]:
        out, self._out = self._out, []
        return sorted(out, key=lambda e: e.at)  # stable: causal order within an instant is kept
