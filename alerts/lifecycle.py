"""The alert lifecycle: open (fire), acknowledge, escalate, silence, resolve; every step an `AlertEvent`.

firing → acknowledged → resolved, plus silenced and escalated (ThingsBoard's lifecycle); who,
when and why are kept on every step. Whether a step notifies is `alerts.notify`'s decision.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from alerts.model import TRANSITIONS, Alert, AlertEvent, AlertState, Audience, Severity, TransitionError
from alerts.notify import LOUD
from alerts.rules import EventRule, Rule, UnacknowledgedRule, _Lenient
from alerts.state import EngineState, Observation, Record, Silence, alert_id_for
from alerts.timers import Timer, TimerKind
from ioc.durations import format_duration


class LifecycleMixin(EngineState):
    """The steps of an alert's life, and the silences that hold its notifications back."""

    def _fire(self, rule: Rule, fp: str, key: str, at: dt.datetime, obs: Observation) -> None:
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
        rec = Record(Alert.open(event), rule, key, fields, dict(obs.labels), obs.value)
        self._alerts[fp] = rec
        self._ids[event.alert_id] = fp
        silence = self._silence_for(rec)
        rec.silenced_by = silence.id if silence else None
        self._emit(rec, event, opening=True)
        if silence is not None:
            self._silence(rec, silence, at)
        for u in self._escalations.get(rule.id, ()):
            self._timers.schedule(Timer(TimerKind.ESCALATE, fp, u.id), at + u.after)
        if rule.repeat is not None:
            self._timers.schedule(Timer(TimerKind.REPEAT, fp), at + rule.repeat)

    def _transition(
        self,
        rec: Record,
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

    def _acknowledge(self, rec: Record, at: dt.datetime, by: str, reason: str | None) -> None:
        self._transition(rec, AlertState.ACKNOWLEDGED, at, by, reason)
        self._quiet(rec)

    def _quiet(self, rec: Record) -> None:
        """An acknowledged alert is neither escalated nor repeated, and no longer silenced."""
        rec.silenced_by = None
        fp = rec.alert.fingerprint
        for u in self._escalations.get(rec.rule.id, ()):
            self._timers.cancel(Timer(TimerKind.ESCALATE, fp, u.id))
        self._timers.cancel(Timer(TimerKind.REPEAT, fp))

    def _resolve(self, rec: Record, at: dt.datetime, by: str, reason: str | None) -> None:
        self._transition(rec, AlertState.RESOLVED, at, by, reason)
        self._forget(rec, at)

    def _forget(self, rec: Record, at: dt.datetime) -> None:
        fp = rec.alert.fingerprint
        self._quiet(rec)
        del self._alerts[fp]
        del self._ids[rec.alert.alert_id]
        s = self._series.get(rec.key)
        if s is not None:
            s.pending_since = s.clear_since = None
            self._timers.cancel(Timer(TimerKind.CLEAR, s.key))
            self._timers.cancel(Timer(TimerKind.PENDING, s.key))
        # Alerts this one was holding back may speak now.
        for other in list(self._alerts.values()):
            held = other.inhibited_by == rec.alert.alert_id and other.alert.state in LOUD
            if held and other.silenced_by is None and self._inhibitor(other) is None:
                other.repeats += 1
                self._transition(
                    other, other.alert.state, at, "system", f"no longer inhibited by {rec.alert.alert_id}",
                    repeat=other.repeats,
                )  # fmt: skip

    def _latch(self, rec: Record) -> None:
        if isinstance(rec.rule, EventRule):
            self._latched_incidents.add((rec.rule.id, rec.labels.get("incident", "")))
        s = self._series.get(rec.key)
        if s is not None:
            s.latched = True
            self._timers.cancel(Timer(TimerKind.ABSENCE, s.key))

    def _escalate(self, rec: Record, u: UnacknowledgedRule, at: dt.datetime) -> None:
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

    def _silence_for(self, rec: Record) -> Silence | None:
        labels = self._labels(rec)
        for sid in sorted(self._active_silences):
            if self._active_silences[sid].matches(labels):
                return self._active_silences[sid]
        return None

    def _silence(self, rec: Record, silence: Silence, at: dt.datetime) -> None:
        rec.silenced_by = silence.id
        self._transition(
            rec, AlertState.SILENCED, at, silence.created_by, silence.reason, extra={"silence": silence.id}
        )

    def _start_silence(self, sid: str, at: dt.datetime) -> None:
        silence = self._silences[sid]
        self._active_silences[sid] = silence
        for rec in list(self._alerts.values()):
            if rec.silenced_by is None and rec.alert.state in LOUD and silence.matches(self._labels(rec)):
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
                            self._timers.cancel(Timer(TimerKind.ESCALATE, rec.alert.fingerprint, u.id))
                            self._escalate(rec, u, at)
                            break


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
