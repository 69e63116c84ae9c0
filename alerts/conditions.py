"""Conditions: how each kind of rule judges what it is fed (thresholds, rates of change, absences, incidents, findings).

A condition rule's series for one scope moves pending → firing → clearing → resolved
(`ConditionsMixin._condition`); what a rule saw becomes an `Observation`, from which the alert's
message, labels and audit trail are made. Opening and closing the alert is `alerts.lifecycle`'s.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable

from alerts.inputs import Finding, Incident
from alerts.model import AlertState, fingerprint
from alerts.rules import AbsenceRule, EventRule, RateOfChangeRule, Rule, SnapshotRule, ThresholdRule
from alerts.state import EngineState, Observation, Series, from_us
from alerts.timers import Timer, TimerKind
from ioc.contract import TZ
from ioc.durations import format_duration
from ioc.snapshot import Snapshot

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def _fmt3(v: float | None) -> str:
    """A measured value to at most three decimals (water levels are read to the centimetre)."""
    return "?" if v is None else f"{round(v, 3):g}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "?"
    r = round(v, 1)
    return str(int(r)) if r == int(r) else f"{r:g}"


class ConditionsMixin(EngineState):
    """Rule evaluation: from a snapshot, an incident or a finding to a series' state, and to `_fire`/`_resolve`."""

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
        self._timers.schedule(Timer(TimerKind.ABSENCE, s.key), t + rule.after)

    def _condition(
        self,
        s: Series,
        t: dt.datetime,
        breach: bool,
        cleared: bool,
        hold: dt.timedelta,
        clear_for: dt.timedelta,
        obs: Observation,
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
                    self._timers.schedule(Timer(TimerKind.CLEAR, s.key), s.clear_since + clear_for)
            else:
                s.clear_since = None
                self._timers.cancel(Timer(TimerKind.CLEAR, s.key))
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
                self._timers.schedule(Timer(TimerKind.PENDING, s.key), deadline)
        else:
            s.pending_since = None
            self._timers.cancel(Timer(TimerKind.PENDING, s.key))

    def _fire_series(self, s: Series, at: dt.datetime) -> None:
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
            at = from_us(us)
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

    def _observe(self, snap: Snapshot, scope: str, more: dict[str, str]) -> Observation:
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
        return Observation(scope, commune, fields, labels, triggered, snap.value)

    def _observe_incident(self, st: Incident) -> Observation:
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
        return Observation(scope, st.commune_code, fields, labels, (st.incident_id,))

    def _observe_finding(self, f: Finding) -> Observation:
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
        return Observation(f.scope, commune, fields, labels, triggered, f.observed, f.explanation())

    def _series_for(self, rule: Rule, key: str, scope: str) -> Series:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = Series(rule, key, fingerprint(rule.id, scope))
        return s
