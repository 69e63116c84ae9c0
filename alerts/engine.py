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
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import json
import logging
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from alerts.inputs import Finding, Incident
from alerts.model import TRANSITIONS, Alert, AlertEvent, AlertState, Audience, Severity, TransitionError, fingerprint
from alerts.rules import (
    AbsenceRule,
    AnomalyRule,
    EventRule,
    Matcher,
    RateOfChangeRule,
    Rule,
    RuleSet,
    SnapshotRule,
    ThresholdRule,
    UnacknowledgedRule,
    _Lenient,
    matchers_from,
    matches_all,
)
from ioc.contract import INCIDENT_STEPS, TZ
from ioc.durations import format_duration
from ioc.errors import IocError
from ioc.snapshot import Snapshot

if TYPE_CHECKING:
    from ioc.registry import Registry

log = logging.getLogger(__name__)

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: The KPI `on_deadletters` feeds to the rules (not in the CONTRACT §5 catalogue: internal to alerts).
DEADLETTER_KPI = "platform.deadletter_rate"
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
#: Which states a notification goes out for (an acknowledgement or a silence is recorded, not announced).
_ANNOUNCED = (AlertState.FIRING, AlertState.ESCALATED, AlertState.RESOLVED)
_LOUD = (AlertState.FIRING, AlertState.ESCALATED)
#: Order of timers coming due at the same instant.
_TIMER_ORDER = {"silence_end": 0, "silence_start": 1, "clear": 2, "pending": 3, "absence": 4, "escalate": 5,
                "repeat": 6}  # fmt: skip


class AlertEngineError(IocError):
    """An alert action that cannot be carried out (raised as one of its subclasses).

    AlertEngineError
     ├── UnknownAlert     no active alert has this id (never existed, or already resolved)
     └── SilenceError     a silence with bad matchers, times, author or reason
    """


class UnknownAlert(AlertEngineError, LookupError):
    """No active alert has this id."""


class SilenceError(AlertEngineError, ValueError):
    """A silence that cannot be created as given."""


def alert_id_for(fp: str, started_at: dt.datetime) -> str:
    """Deterministic alert id: the fingerprint and the start instant (µs) hashed, 16 hex digits."""
    us = (started_at - EPOCH) // dt.timedelta(microseconds=1)
    return hashlib.sha256(f"{fp}|{us}".encode()).hexdigest()[:16]


def silence_id(
    matchers: Mapping[str, str | Sequence[str]], starts: dt.datetime, ends: dt.datetime, by: str, reason: str
) -> str:
    """The id of a silence, derived from its content: the same matchers (a pattern or a list of one is
    the same), validity, author and reason give the same id wherever it is computed (the engine, the
    API). Raises ValueError for matchers `matchers_from` refuses."""
    canonical = {m.label: m.patterns for m in matchers_from(dict(matchers))}
    digest = json.dumps([canonical, _us(starts), _us(ends), by, reason], sort_keys=True, ensure_ascii=False)
    return "sil-" + hashlib.sha256(digest.encode()).hexdigest()[:12]


def _from_us(us: int) -> dt.datetime:
    return (EPOCH + dt.timedelta(microseconds=us)).astimezone(TZ)


def _fmt3(v: float | None) -> str:
    """A measured value to at most three decimals (water levels are read to the centimetre)."""
    return "?" if v is None else f"{round(v, 3):g}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "?"
    r = round(v, 1)
    return str(int(r)) if r == int(r) else f"{r:g}"


class Silence(msgspec.Struct, frozen=True, kw_only=True):
    """Mutes notifications of matching alerts from ``starts_at`` to ``ends_at``; who and why are kept."""

    id: str
    matchers: dict[str, tuple[str, ...]]
    starts_at: dt.datetime
    ends_at: dt.datetime
    created_by: str
    reason: str
    expired_by: str | None = None
    expired_at: dt.datetime | None = None

    @property
    def _matchers(self) -> tuple[Matcher, ...]:
        return tuple(Matcher(k, v) for k, v in sorted(self.matchers.items()))

    def matches(self, labels: Mapping[str, str | None]) -> bool:
        return matches_all(self._matchers, labels)


@dataclass(frozen=True)
class _Observation:
    """What a rule saw: the scope and the values its message, labels and audit trail are made from."""

    scope: str
    commune_code: str | None
    fields: dict[str, str]
    labels: dict[str, str]
    triggered_by: tuple[str, ...]
    value: float | None = None
    #: An anomaly finding's evidence (expected range, observed value, evidence window, method).
    explanation: dict[str, Any] | None = None


@dataclass
class _Series:
    """A rule's condition for one scope (or listed id): pending, firing, clearing."""

    rule: Rule
    key: str
    fp: str
    origin: str = ""  # the snapshot scope that lists this id (absence `list` rules)
    obs: _Observation | None = None
    pending_since: dt.datetime | None = None
    clear_since: dt.datetime | None = None
    #: Resolved by hand while the condition held: no new alert until it has cleared once.
    latched: bool = False
    history: list[tuple[dt.datetime, float]] = field(default_factory=list)


@dataclass
class _Record:
    """One active alert and what the engine needs beyond `Alert` to run its lifecycle."""

    alert: Alert
    rule: Rule
    key: str
    fields: dict[str, str]
    labels: dict[str, str]
    value: float | None
    silenced_by: str | None = None
    inhibited_by: str | None = None
    notified: bool = False
    escalated: bool = False
    repeats: int = 0


class AlertEngine:
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
        #: station id → commune code (a station alert belongs to its commune).
        self.station_communes = dict(station_communes or {})
        #: scope → display name (``commune:16681`` → ``Phường Thành Vinh``), for messages.
        self.names = dict(names or {})
        self.rules = rules
        self._alerts: dict[str, _Record] = {}  # fingerprint → active alert
        self._ids: dict[str, str] = {}  # alert id → fingerprint
        self._series: dict[str, _Series] = {}
        self._silences: dict[str, Silence] = {}
        self._active_silences: dict[str, Silence] = {}
        self._groups: dict[str, tuple[str, dt.datetime]] = {}  # group key → (group id, open until)
        self._timers: list[tuple[dt.datetime, int, str, str, int]] = []
        self._tokens: dict[tuple[str, str], int] = {}
        self._next_token = 0
        self._clock: dt.datetime | None = None
        self._seen: dict[str, dt.datetime] = {}  # snapshot key → latest as_of
        self._latched_incidents: set[tuple[str, str]] = set()
        self._out: list[AlertEvent] = []
        self._index()

    @classmethod
    def for_registry(cls, rules: RuleSet, registry: Registry) -> AlertEngine:
        """An engine that knows the province's stations (their communes) and the names of units and stations."""
        names = {f"commune:{u.code}": u.name for u in registry.units.values()}
        names.update({f"station:{s.station_id}": s.name or s.station_id for s in registry.stations.values()})
        return cls(
            rules, station_communes={s.station_id: s.commune_code for s in registry.stations.values()}, names=names
        )

    def _index(self) -> None:
        self._by_kpi: dict[tuple[str, str], list[SnapshotRule]] = {}
        self._event_rules: list[EventRule] = []
        self._escalations: dict[str, list[UnacknowledgedRule]] = {}
        self._anomaly_rules: list[AnomalyRule] = []
        for rule in self.rules.rules:
            if isinstance(rule, SnapshotRule):
                self._by_kpi.setdefault((rule.kpi, rule.window), []).append(rule)
            elif isinstance(rule, EventRule):
                self._event_rules.append(rule)
            elif isinstance(rule, UnacknowledgedRule):
                self._escalations.setdefault(rule.target, []).append(rule)
            elif isinstance(rule, AnomalyRule):
                self._anomaly_rules.append(rule)

    # --- inputs -----------------------------------------------------------------------------

    def on_snapshot(self, snapshot: Snapshot, now: dt.datetime) -> list[AlertEvent]:
        """Evaluate the threshold, rate-of-change and absence rules of this snapshot's KPI and window.

        The snapshot is judged at its ``as_of`` (or the engine's clock, when it comes late); timers
        up to that moment run first, those up to ``now`` after.
        """
        _aware(now)
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
        _aware(now)
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
        _aware(now)
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
        _aware(now)
        self._advance(now)
        return self._drain()

    # --- operator actions -------------------------------------------------------------------

    def acknowledge(self, alert_id: str, by: str, now: dt.datetime, reason: str | None = None) -> list[AlertEvent]:
        """Someone takes the alert on: escalation and reminders stop. Acknowledging twice changes nothing.

        An acknowledgement at the very instant an escalation is due wins (the deadline is inclusive).
        """
        _aware(now)
        self._advance(now, inclusive=False)
        rec = self._record(alert_id)
        if rec.alert.state is not AlertState.ACKNOWLEDGED:
            self._acknowledge(rec, now, by, reason)
        self._advance(now)
        return self._drain()

    def resolve(self, alert_id: str, by: str, now: dt.datetime, reason: str | None = None) -> list[AlertEvent]:
        """Close the alert by hand (ThingsBoard's "clear"). If its condition still holds, no new
        alert opens until the condition has cleared once (no instant re-fire)."""
        _aware(now)
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
        _aware(starts)
        _aware(ends)
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
        self._schedule("silence_start", sid, starts)
        self._schedule("silence_end", sid, ends)
        return silence

    def expire_silence(self, silence_id: str, by: str, now: dt.datetime) -> list[AlertEvent]:
        """End a silence early; alerts it held that still fire become ``firing`` again (and notify)."""
        _aware(now)
        silence = self._silences.get(silence_id)
        if silence is None:
            raise SilenceError(f"no silence {silence_id!r}")
        self._advance(now, inclusive=False)
        if silence.expired_at is None and now < silence.ends_at:
            self._silences[silence_id] = msgspec.structs.replace(
                silence, expired_by=by, expired_at=now, ends_at=max(now, silence.starts_at)
            )
            self._cancel("silence_start", silence_id)
            self._cancel("silence_end", silence_id)
            self._end_silence(silence_id, now, by)
        self._advance(now)
        return self._drain()

    def set_rules(self, rules: RuleSet, now: dt.datetime) -> list[AlertEvent]:
        """Swap in a reloaded rule set: alerts of rules that are gone (or changed kind) resolve;
        the others keep their state and follow the new definition from now on."""
        _aware(now)
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
                self._cancel("pending", key)
                self._cancel("clear", key)
                self._cancel("absence", key)
                del self._series[key]
            else:
                series.rule = new
        self.rules = rules
        self._index()
        for rec in self._alerts.values():  # escalation rules added for alerts already open
            if not rec.escalated:
                for u in self._escalations.get(rec.rule.id, ()):
                    if (("escalate", f"{rec.alert.fingerprint}|{u.id}")) not in self._tokens:
                        self._schedule("escalate", f"{rec.alert.fingerprint}|{u.id}", rec.alert.started_at + u.after)
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
            rec = _Record(
                alert, rule, f"{rule.id}|{alert.scope}", {"rule": rule.id, "scope": alert.scope}, labels, None
            )
            rec.notified = True
            rec.escalated = alert.state is AlertState.ESCALATED
            self._alerts[alert.fingerprint] = rec
            self._ids[alert.alert_id] = alert.fingerprint
            if alert.state in (AlertState.FIRING, AlertState.SILENCED) and not rec.escalated:
                for u in self._escalations.get(rule.id, ()):
                    self._schedule("escalate", f"{alert.fingerprint}|{u.id}", alert.started_at + u.after)
            adopted += 1
        self._advance(now)
        return adopted

    # --- queries ----------------------------------------------------------------------------

    def active(self) -> list[Alert]:
        """Copies of the alerts not resolved yet, oldest first."""
        recs = sorted(self._alerts.values(), key=lambda r: (r.alert.started_at, r.alert.alert_id))
        return [msgspec.structs.replace(r.alert) for r in recs]

    def get(self, alert_id: str) -> Alert | None:
        fp = self._ids.get(alert_id)
        return msgspec.structs.replace(self._alerts[fp].alert) if fp else None

    def silences(self) -> list[Silence]:
        return sorted(self._silences.values(), key=lambda s: (s.starts_at, s.id))

    # --- rule evaluation --------------------------------------------------------------------

    def _evaluate(self, rule: SnapshotRule, snap: Snapshot, t: dt.datetime) -> None:
        if isinstance(rule, ThresholdRule):
            self._threshold(rule, snap, t)
        elif isinstance(rule, RateOfChangeRule):
            self._rate_of_change(rule, snap, t)
        elif isinstance(rule, AbsenceRule):
            if rule.list_field is not None:
                self._absence_list(rule, snap, t)
            else:
                self._absence_after(rule, snap, t)

    def _threshold(self, rule: ThresholdRule, snap: Snapshot, t: dt.datetime) -> None:
        v = snap.value
        if v is None or (rule.min_denominator is not None and (snap.denominator or 0) < rule.min_denominator):
            return  # no data says nothing either way: absence rules watch for that
        threshold = (
            rule.value if not rule.uses_target else (snap.target if snap.target is not None else rule.target_fallback)
        )
        if threshold is None:
            return
        breach = _OPS[rule.op](v, threshold)
        upward = rule.op in (">", ">=")
        if rule.clear is not None:
            cleared = v <= rule.clear if upward else v >= rule.clear
        elif rule.clear_margin:
            cleared = v <= threshold - rule.clear_margin if upward else v >= threshold + rule.clear_margin
        else:
            cleared = not breach
        key = f"{rule.id}|{snap.scope}"
        if key not in self._series and not breach:
            return
        obs = self._observe(snap, snap.scope, {"threshold": _fmt(threshold)})
        self._condition(self._series_for(rule, key, snap.scope), t, breach, cleared, rule.for_, rule.clear_for, obs)

    def _rate_of_change(self, rule: RateOfChangeRule, snap: Snapshot, t: dt.datetime) -> None:
        if snap.value is None:
            return
        s = self._series_for(rule, f"{rule.id}|{snap.scope}", snap.scope)
        s.history.append((t, snap.value))
        horizon = t - rule.within
        while s.history and s.history[0][0] < horizon:
            s.history.pop(0)
        low = min(v for _, v in s.history)
        increase = snap.value - low
        breach = increase >= rule.increase
        obs = self._observe(
            snap,
            snap.scope,
            {"increase": _fmt(increase), "within": format_duration(rule.within), "from_value": _fmt(low),
             "threshold": _fmt(rule.increase)},
        )  # fmt: skip
        self._condition(s, t, breach, not breach, dt.timedelta(0), rule.clear_for, obs)

    def _absence_list(self, rule: AbsenceRule, snap: Snapshot, t: dt.datetime) -> None:
        raw = (snap.extra or {}).get(rule.list_field or "")
        listed = sorted({str(x) for x in raw}) if isinstance(raw, list) else []
        for ident in listed:
            scope = f"{rule.list_scope}:{ident}"
            s = self._series_for(rule, f"{rule.id}|{scope}", scope)
            s.origin = snap.scope
            obs = self._observe(snap, scope, {"after": format_duration(rule.for_)})
            self._condition(s, t, True, False, rule.for_, dt.timedelta(0), obs)
        gone = [s for s in self._series.values() if s.rule.id == rule.id and s.origin == snap.scope]
        listed_scopes = {f"{rule.list_scope}:{i}" for i in listed}
        for s in gone:
            scope = s.key.split("|", 1)[1]
            if scope in listed_scopes:
                continue
            self._condition(s, t, False, True, rule.for_, dt.timedelta(0), s.obs or self._observe(snap, scope, {}))
            if s.fp not in self._alerts and s.pending_since is None and not s.latched:
                del self._series[s.key]

    def _absence_after(self, rule: AbsenceRule, snap: Snapshot, t: dt.datetime) -> None:
        assert rule.after is not None
        s = self._series_for(rule, f"{rule.id}|{snap.scope}", snap.scope)
        s.obs = self._observe(snap, snap.scope, {"after": format_duration(rule.after)})
        s.latched = False
        rec = self._alerts.get(s.fp)
        if rec is not None:
            self._resolve(rec, t, "system", "data arrived again")
        self._schedule("absence", s.key, t + rule.after)

    def _condition(
        self,
        s: _Series,
        t: dt.datetime,
        breach: bool,
        cleared: bool,
        hold: dt.timedelta,
        clear_for: dt.timedelta,
        obs: _Observation,
    ) -> None:
        """The state machine shared by condition rules: pending → firing → clearing → resolved."""
        s.obs = obs
        rec = self._alerts.get(s.fp)
        if rec is not None:
            if cleared:
                if s.clear_since is None:
                    s.clear_since = t
                if t - s.clear_since >= clear_for:
                    self._resolve(rec, t, "system", "condition cleared")
                else:
                    self._schedule("clear", s.key, s.clear_since + clear_for)
            else:
                s.clear_since = None
                self._cancel("clear", s.key)
            return
        if s.latched:
            s.latched = not cleared
            return
        if breach:
            if s.pending_since is None:
                s.pending_since = t
            deadline = s.pending_since + hold
            if deadline <= t:
                self._fire_series(s, t)
            else:
                self._schedule("pending", s.key, deadline)
        else:
            s.pending_since = None
            self._cancel("pending", s.key)

    def _fire_series(self, s: _Series, at: dt.datetime) -> None:
        s.pending_since = s.clear_since = None
        assert s.obs is not None
        self._fire(s.rule, s.fp, s.key, at, s.obs)

    def _incident(self, rule: EventRule, state: Incident, steps: list[tuple[int, int, str, str]]) -> None:
        iid = state.incident_id
        fp = fingerprint(rule.id, f"incident:{iid}")
        matches = (
            state.detected is not None
            and state.false_positive is None
            and (rule.severities is None or state.severity in rule.severities)
            and (rule.categories is None or state.category in rule.categories)
            and (rule.min_system_level is None or (state.system_level or 0) >= rule.min_system_level)
        )
        for us, _, step, event_id in steps:
            at = _from_us(us)
            self._advance(at, inclusive=False)
            rec = self._alerts.get(fp)
            if step == "detected":
                if rec is None and matches and not state.terminal and (rule.id, iid) not in self._latched_incidents:
                    self._fire(rule, fp, f"{rule.id}|incident:{iid}", at, self._observe_incident(state))
            elif rec is None:
                continue
            elif step in ("acknowledged", "contained"):
                if rec.alert.state in (AlertState.FIRING, AlertState.ESCALATED, AlertState.SILENCED):
                    self._acknowledge(rec, at, "soc", f"incident {step} (event {event_id})")
            else:
                self._resolve(rec, at, "soc", f"incident {step.replace('_', ' ')} (event {event_id})")
        if state.terminal:
            self._latched_incidents.discard((rule.id, iid))
        rec = self._alerts.get(fp)
        if rec is not None and not matches:
            when = self._clock or rec.alert.updated_at
            self._resolve(
                rec,
                max(when, rec.alert.updated_at),
                "system",
                f"incident no longer matches (severity {state.severity})",
            )

    # --- observations -----------------------------------------------------------------------

    def _observe(self, snap: Snapshot, scope: str, more: dict[str, str]) -> _Observation:
        extra = snap.extra or {}
        station = scope[8:] if scope.startswith("station:") else str(extra.get("station") or "")
        commune = scope[8:] if scope.startswith("commune:") else None
        if commune is None and scope.startswith("station:"):
            commune = self.station_communes.get(station)
        fields = {
            "kpi": snap.kpi,
            "window": snap.window,
            "value": _fmt(snap.value),
            "unit": snap.unit,
            "target": _fmt(snap.target),
            "station": station,
            "station_name": self.names.get(f"station:{station}", station) if station else "",
            "label_vi": str(extra.get("label_vi", "")),
            "label_en": str(extra.get("label_en", "")),
            **more,
        }
        labels = {"kpi": snap.kpi, "window": snap.window}
        if station:
            labels["station"] = station
        triggered = (snap.key, station) if station else (snap.key,)
        return _Observation(scope, commune, fields, labels, triggered, snap.value)

    def _observe_incident(self, st: Incident) -> _Observation:
        scope = (
            f"commune:{st.commune_code}"
            if st.commune_code
            else f"agency:{st.agency_code}"
            if st.agency_code
            else "province"
        )
        fields = {
            "incident": st.incident_id,
            "category": st.category or "",
            "system": st.system or "",
            "system_level": str(st.system_level or ""),
            "title": st.title or "",
            "incident_severity": st.severity or "",
        }
        labels = {"incident": st.incident_id, "category": st.category or "", "system": st.system or "",
                  "agency_code": st.agency_code or ""}  # fmt: skip
        return _Observation(scope, st.commune_code, fields, labels, (st.incident_id,))

    def _observe_finding(self, f: Finding) -> _Observation:
        station = f.station or ""
        commune = f.commune or (self.station_communes.get(station) if station else None)

        def when(t: dt.datetime | None) -> str:
            return t.astimezone(TZ).strftime("%H:%M %d/%m") if t is not None else "?"

        lo, hi = f.expected_low, f.expected_high
        expected = (
            f"{_fmt3(lo)}–{_fmt3(hi)}"
            if lo is not None and hi is not None
            else f"≥ {_fmt3(lo)}"
            if lo is not None
            else "?"
        )
        kind, _, name = f.scope.partition(":")
        fields = {
            "detector": f.detector,
            "quantity": f.quantity,
            "observed": _fmt3(f.observed),
            "expected": expected,
            "expected_low": _fmt3(lo),
            "expected_high": _fmt3(hi),
            "window_from": when(f.window_from),
            "window_to": when(f.window_to),
            "method": f.method,
            "station": station,
            "station_name": self.names.get(f"station:{station}", station) if station else "",
            "category": name if kind == "category" else "",
            "system": name if kind == "system" else "",
        }
        labels = {"detector": f.detector}
        if station:
            labels["station"] = station
        if kind in ("category", "system"):
            labels[kind] = name
        triggered = (f.scope, station) if station else (f.scope,)
        return _Observation(f.scope, commune, fields, labels, triggered, f.observed, f.explanation())

    def _series_for(self, rule: Rule, key: str, scope: str) -> _Series:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _Series(rule, key, fingerprint(rule.id, scope))
        return s

    # --- lifecycle --------------------------------------------------------------------------

    def _fire(self, rule: Rule, fp: str, key: str, at: dt.datetime, obs: _Observation) -> None:
        fields = {
            **obs.fields,
            "rule": rule.id,
            "scope": obs.scope,
            "scope_name": self.names.get(obs.scope, obs.scope),
            "commune": obs.commune_code or "",
            "commune_name": self.names.get(f"commune:{obs.commune_code}", obs.commune_code or ""),
            "severity": rule.severity.value,
        }
        vi, en = rule.message.render(fields)
        event = AlertEvent(
            alert_id=alert_id_for(fp, at),
            fingerprint=fp,
            rule=rule.id,
            scope=obs.scope,
            severity=rule.severity,
            state=AlertState.FIRING,
            domain=rule.domain,
            audience=rule.audience,
            commune_code=obs.commune_code,
            message_vi=vi,
            message_en=en,
            at=at,
            triggered_by=obs.triggered_by,
            value=obs.value,
            labels=dict(obs.labels),
            extra={"explanation": obs.explanation} if obs.explanation is not None else None,
        )
        rec = _Record(Alert.open(event), rule, key, fields, dict(obs.labels), obs.value)
        self._alerts[fp] = rec
        self._ids[event.alert_id] = fp
        silence = self._silence_for(rec)
        rec.silenced_by = silence.id if silence else None
        self._emit(rec, event, opening=True)
        if silence is not None:
            self._silence(rec, silence, at)
        for u in self._escalations.get(rule.id, ()):
            self._schedule("escalate", f"{fp}|{u.id}", at + u.after)
        if rule.repeat is not None:
            self._schedule("repeat", fp, at + rule.repeat)

    def _transition(
        self,
        rec: _Record,
        state: AlertState,
        at: dt.datetime,
        by: str,
        reason: str | None,
        *,
        extra: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        a = rec.alert
        event = AlertEvent(
            alert_id=a.alert_id,
            fingerprint=a.fingerprint,
            rule=a.rule,
            scope=a.scope,
            severity=changes.pop("severity", a.severity),
            state=state,
            domain=a.domain,
            audience=changes.pop("audience", a.audience),
            commune_code=a.commune_code,
            message_vi=changes.pop("message_vi", a.message_vi),
            message_en=changes.pop("message_en", a.message_en),
            at=at,
            by=by,
            reason=reason,
            triggered_by=a.triggered_by,
            value=rec.value,
            extra=extra,
            labels=dict(rec.labels),
            repeat=changes.pop("repeat", 0),
        )
        self._emit(rec, event)

    def _emit(self, rec: _Record, event: AlertEvent, *, opening: bool = False) -> None:
        """Decide whether the event notifies (silence, inhibition, group), then record and output it."""
        extra = dict(event.extra or {})
        notify = event.state in _ANNOUNCED
        if rec.silenced_by is not None:
            notify = False
            extra["silenced_by"] = rec.silenced_by
        if event.state is AlertState.RESOLVED and not rec.notified:
            notify = False  # nobody was told it fired: no "resolved" news either
        if notify and event.state in _LOUD:
            source = self._inhibitor(rec)
            rec.inhibited_by = source.alert.alert_id if source else None
            if source is not None:
                notify = False
                extra["inhibited_by"] = source.alert.alert_id
        group = None
        rule = rec.rule
        if notify and rule.group_by is not None and rule.group_window is not None:
            values = ",".join(f"{label}={self._labels(rec).get(label) or ''}" for label in rule.group_by)
            key = f"{rule.id}|{event.state.value}|{values}"
            current = self._groups.get(key)
            if current is not None and event.at < current[1]:
                group, notify = current[0], False
                extra["grouped"] = True
            else:
                group = f"{key}@{event.at.isoformat()}"
                self._groups[key] = (group, event.at + rule.group_window)
                if len(self._groups) > 4096:
                    self._groups = {k: g for k, g in self._groups.items() if g[1] > event.at}
        if notify or group is not None:
            rec.notified = True
        event = msgspec.structs.replace(event, notify=notify, group=group, extra=extra or None)
        if not opening:
            rec.alert.apply(event)
        self._out.append(event)

    def _acknowledge(self, rec: _Record, at: dt.datetime, by: str, reason: str | None) -> None:
        self._transition(rec, AlertState.ACKNOWLEDGED, at, by, reason)
        self._quiet(rec)

    def _quiet(self, rec: _Record) -> None:
        """An acknowledged alert is neither escalated nor repeated, and no longer silenced."""
        rec.silenced_by = None
        fp = rec.alert.fingerprint
        for u in self._escalations.get(rec.rule.id, ()):
            self._cancel("escalate", f"{fp}|{u.id}")
        self._cancel("repeat", fp)

    def _resolve(self, rec: _Record, at: dt.datetime, by: str, reason: str | None) -> None:
        self._transition(rec, AlertState.RESOLVED, at, by, reason)
        self._forget(rec, at)

    def _forget(self, rec: _Record, at: dt.datetime) -> None:
        fp = rec.alert.fingerprint
        self._quiet(rec)
        del self._alerts[fp]
        del self._ids[rec.alert.alert_id]
        s = self._series.get(rec.key)
        if s is not None:
            s.pending_since = s.clear_since = None
            self._cancel("clear", s.key)
            self._cancel("pending", s.key)
        # Alerts this one was holding back may speak now.
        for other in list(self._alerts.values()):
            held = other.inhibited_by == rec.alert.alert_id and other.alert.state in _LOUD
            if held and other.silenced_by is None and self._inhibitor(other) is None:
                other.repeats += 1
                self._transition(
                    other, other.alert.state, at, "system", f"no longer inhibited by {rec.alert.alert_id}",
                    repeat=other.repeats,
                )  # fmt: skip

    def _latch(self, rec: _Record) -> None:
        if isinstance(rec.rule, EventRule):
            self._latched_incidents.add((rec.rule.id, rec.labels.get("incident", "")))
        s = self._series.get(rec.key)
        if s is not None:
            s.latched = True
            self._cancel("absence", s.key)

    def _escalate(self, rec: _Record, u: UnacknowledgedRule, at: dt.datetime) -> None:
        rec.escalated = True
        audience = tuple(dict.fromkeys((*rec.alert.audience, *u.escalate_to, Audience.OPERATOR)))
        fields = {**rec.fields, "after": format_duration(u.after)}
        vi = u.message.vi.format_map(_Lenient({**fields, "alert": rec.alert.message_vi}))
        en = u.message.en.format_map(_Lenient({**fields, "alert": rec.alert.message_en}))
        severity = max(rec.alert.severity, u.severity, key=lambda s: Severity(s).rank)
        self._transition(
            rec, AlertState.ESCALATED, at, "system", f"not acknowledged within {format_duration(u.after)} (rule {u.id})",
            audience=audience, message_vi=vi, message_en=en, severity=severity, extra={"escalation_rule": u.id},
        )  # fmt: skip

    def _labels(self, rec: _Record) -> dict[str, str | None]:
        a = rec.alert
        return {
            **rec.labels,
            "rule": a.rule,
            "scope": a.scope,
            "severity": a.severity.value,
            "domain": a.domain,
            "commune_code": a.commune_code,
            "state": a.state.value,
        }

    def _inhibitor(self, rec: _Record) -> _Record | None:
        target = self._labels(rec)
        for inh in self.rules.inhibitions:
            if not matches_all(inh.target, target):
                continue
            for other in self._alerts.values():
                if other is rec:
                    continue
                source = self._labels(other)
                if matches_all(inh.source, source) and all(source.get(e) == target.get(e) for e in inh.equal):
                    return other
        return None

    # --- silences ---------------------------------------------------------------------------

    def _silence_for(self, rec: _Record) -> Silence | None:
        labels = self._labels(rec)
        for sid in sorted(self._active_silences):
            if self._active_silences[sid].matches(labels):
                return self._active_silences[sid]
        return None

    def _silence(self, rec: _Record, silence: Silence, at: dt.datetime) -> None:
        rec.silenced_by = silence.id
        self._transition(
            rec, AlertState.SILENCED, at, silence.created_by, silence.reason, extra={"silence": silence.id}
        )

    def _start_silence(self, sid: str, at: dt.datetime) -> None:
        silence = self._silences[sid]
        self._active_silences[sid] = silence
        for rec in list(self._alerts.values()):
            if rec.silenced_by is None and rec.alert.state in _LOUD and silence.matches(self._labels(rec)):
                self._silence(rec, silence, at)

    def _end_silence(self, sid: str, at: dt.datetime, by: str) -> None:
        self._active_silences.pop(sid, None)
        for rec in list(self._alerts.values()):
            if rec.silenced_by != sid:
                continue
            other = self._silence_for(rec)
            if other is not None:
                rec.silenced_by = other.id
                continue
            rec.silenced_by = None
            if rec.alert.state is AlertState.SILENCED:
                self._transition(rec, AlertState.FIRING, at, by, f"silence {sid} ended", extra={"silence": sid})
                if not rec.escalated:
                    for u in self._escalations.get(rec.rule.id, ()):
                        if at >= rec.alert.started_at + u.after:
                            self._cancel("escalate", f"{rec.alert.fingerprint}|{u.id}")
                            self._escalate(rec, u, at)
                            break

    # --- timers -----------------------------------------------------------------------------

    def _schedule(self, kind: str, key: str, at: dt.datetime) -> None:
        self._next_token += 1
        self._tokens[(kind, key)] = self._next_token
        heapq.heappush(self._timers, (at, _TIMER_ORDER[kind], kind, key, self._next_token))

    def _cancel(self, kind: str, key: str) -> None:
        self._tokens.pop((kind, key), None)

    def _advance(self, until: dt.datetime, *, inclusive: bool = True) -> None:
        while self._timers:
            at, _, kind, key, token = self._timers[0]
            if at > until or (at == until and not inclusive):
                break
            heapq.heappop(self._timers)
            if self._tokens.get((kind, key)) != token:
                continue
            del self._tokens[(kind, key)]
            if self._clock is None or at > self._clock:
                self._clock = at
            self._run(kind, key, at)
        if self._clock is None or until > self._clock:
            self._clock = until

    def _run(self, kind: str, key: str, at: dt.datetime) -> None:
        if kind == "silence_start":
            self._start_silence(key, at)
        elif kind == "silence_end":
            self._end_silence(key, at, "system")
        elif kind == "pending":
            s = self._series.get(key)
            if s is not None and s.pending_since is not None and s.fp not in self._alerts:
                self._fire_series(s, at)
        elif kind == "clear":
            s = self._series.get(key)
            if s is not None and s.fp in self._alerts:
                self._resolve(self._alerts[s.fp], at, "system", "condition cleared")
        elif kind == "absence":
            s = self._series.get(key)
            if s is not None and s.fp not in self._alerts and not s.latched:
                self._fire_series(s, at)
        elif kind == "escalate":
            fp, uid = key.rsplit("|", 1)
            rec = self._alerts.get(fp)
            u = self.rules.by_id.get(uid)
            unacknowledged = rec is not None and rec.alert.state is AlertState.FIRING and not rec.escalated
            if unacknowledged and rec is not None and isinstance(u, UnacknowledgedRule):
                self._escalate(rec, u, at)
        elif kind == "repeat":
            rec = self._alerts.get(key)
            if rec is None or rec.rule.repeat is None:
                return
            if rec.alert.state in _LOUD and rec.silenced_by is None:
                rec.repeats += 1
                self._transition(rec, rec.alert.state, at, "system", "still not acknowledged", repeat=rec.repeats)
            if rec.alert.state is not AlertState.ACKNOWLEDGED:
                self._schedule("repeat", key, at + rec.rule.repeat)

    def _record(self, alert_id: str) -> _Record:
        fp = self._ids.get(alert_id)
        if fp is None:
            raise UnknownAlert(f"no active alert {alert_id!r}")
        return self._alerts[fp]

    def _drain(self) -> list[AlertEvent]:
        out, self._out = self._out, []
        return sorted(out, key=lambda e: e.at)  # stable: causal order within an instant is kept


def operator_event(alert: Alert, state: AlertState, by: str, at: dt.datetime, reason: str | None = None) -> AlertEvent:
    """The event of an operator's ``acknowledged`` or ``resolved`` step on an alert the API holds, to
    publish on ``ioc.alerts`` (the worker's engine takes it through `AlertEngine.apply_external`).
    Raises `TransitionError` for a step the lifecycle forbids."""
    if state not in (AlertState.ACKNOWLEDGED, AlertState.RESOLVED):
        raise TransitionError(f"an operator acknowledges or resolves, not {state}")
    if state not in TRANSITIONS[alert.state]:
        raise TransitionError(f"{alert.state} → {state} is not allowed")
    return AlertEvent(
        alert_id=alert.alert_id,
        fingerprint=alert.fingerprint,
        rule=alert.rule,
        scope=alert.scope,
        severity=alert.severity,
        state=state,
        domain=alert.domain,
        audience=alert.audience,
        commune_code=alert.commune_code,
        message_vi=alert.message_vi,
        message_en=alert.message_en,
        at=at,
        by=by,
        reason=reason,
        triggered_by=alert.triggered_by,
        labels=alert.labels,
        notify=state is AlertState.RESOLVED,
    )


def _aware(t: dt.datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"times must carry an offset (got naive {t.isoformat()})")


def _us(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)
