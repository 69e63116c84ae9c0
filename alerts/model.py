"""Alert core types: severities, the lifecycle and its allowed transitions, fingerprints, and the `ioc.alerts` event.

An alert is identified by its fingerprint (rule + scope): a condition that keeps holding, or
that flaps, stays one alert. Every state change is an `AlertEvent` published to `ioc.alerts`
and kept as the audit trail (who, when, why). `alerts.engine` creates them from `alerts.rules`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from enum import StrEnum
from typing import Any

import msgspec


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return list(Severity).index(self)


class AlertState(StrEnum):
    FIRING = "firing"
    ACKNOWLEDGED = "acknowledged"
    ESCALATED = "escalated"
    SILENCED = "silenced"
    RESOLVED = "resolved"


#: The lifecycle: which state may follow which. A resolved alert is final; the same condition
#: coming back later opens a new alert with the same fingerprint and a new id.
TRANSITIONS: dict[AlertState, frozenset[AlertState]] = {
    AlertState.FIRING: frozenset(
        {AlertState.ACKNOWLEDGED, AlertState.ESCALATED, AlertState.SILENCED, AlertState.RESOLVED}
    ),
    AlertState.ESCALATED: frozenset({AlertState.ACKNOWLEDGED, AlertState.SILENCED, AlertState.RESOLVED}),
    AlertState.ACKNOWLEDGED: frozenset({AlertState.RESOLVED, AlertState.SILENCED}),
    # A silenced alert may still be acknowledged: someone took it on while it was quiet.
    AlertState.SILENCED: frozenset({AlertState.FIRING, AlertState.ACKNOWLEDGED, AlertState.RESOLVED}),
    AlertState.RESOLVED: frozenset(),
}


class Audience(StrEnum):
    """Who an alert is routed to (CONTRACT §7 roles): operators see all, security the cyber ones, a commune its own."""

    OPERATOR = "operator"
    SECURITY = "security"
    COMMUNE = "commune"


class TransitionError(ValueError):
    """A lifecycle step that is not allowed from the alert's current state."""


def fingerprint(rule_id: str, scope: str) -> str:
    """Stable identity of "this rule, for this scope": the key deduplication and grouping use."""
    return hashlib.sha256(f"{rule_id}\x1f{scope}".encode()).hexdigest()[:16]


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One lifecycle event of an alert, as published to `ioc.alerts` (key: the fingerprint)."""

    schema: str = "ioc.alert.v1"
    alert_id: str
    fingerprint: str
    rule: str
    scope: str
    severity: Severity
    state: AlertState
    domain: str  # "cyber", "env", "water", "dossier", "platform", "anomaly"
    audience: tuple[Audience, ...]
    commune_code: str | None = None
    message_vi: str
    message_en: str
    at: dt.datetime
    #: Who caused this transition: "system" for the engine, else the token's subject.
    by: str = "system"
    reason: str | None = None
    #: Ids of what triggered it: incident ids, station ids, KPI keys.
    triggered_by: tuple[str, ...] = ()
    value: float | None = None
    extra: dict[str, Any] | None = None
    #: Whether the audience should be notified (sound, pop-up, page). False for events kept for the
    #: record only: the alert is silenced, inhibited by a wider one, or folded into its group's
    #: notification (`group`).
    notify: bool = True
    #: The notification group (rule + group labels + when the group opened) this event belongs to.
    group: str | None = None
    #: 0 for a lifecycle transition; n > 0 for the n-th reminder of an unchanged state (repeat interval).
    repeat: int = 0
    #: What silences and inhibitions match on besides the fields above (kpi, station, category...).
    labels: dict[str, str] | None = None


class Alert(msgspec.Struct, kw_only=True):
    """The current state of one alert, folded from its events."""

    alert_id: str
    fingerprint: str
    rule: str
    scope: str
    severity: Severity
    state: AlertState
    domain: str
    audience: tuple[Audience, ...]
    commune_code: str | None
    message_vi: str
    message_en: str
    started_at: dt.datetime
    updated_at: dt.datetime
    acknowledged_by: str | None = None
    triggered_by: tuple[str, ...] = ()
    labels: dict[str, str] | None = None
    #: An anomaly alert's evidence: detector, quantity, observed, expected range, evidence window, method.
    explanation: dict[str, Any] | None = None

    @classmethod
    def open(cls, event: AlertEvent) -> Alert:
        if event.state is not AlertState.FIRING:
            raise TransitionError(f"an alert opens firing, not {event.state}")
        return cls(
            alert_id=event.alert_id,
            fingerprint=event.fingerprint,
            rule=event.rule,
            scope=event.scope,
            severity=event.severity,
            state=event.state,
            domain=event.domain,
            audience=event.audience,
            commune_code=event.commune_code,
            message_vi=event.message_vi,
            message_en=event.message_en,
            started_at=event.at,
            updated_at=event.at,
            triggered_by=event.triggered_by,
            labels=event.labels,
            explanation=(event.extra or {}).get("explanation"),
        )

    def apply(self, event: AlertEvent) -> None:
        """Move to the event's state, refusing steps the lifecycle does not allow."""
        if event.alert_id != self.alert_id:
            raise TransitionError(f"event for {event.alert_id} applied to {self.alert_id}")
        if event.repeat and event.state is self.state:
            return  # a reminder changes nothing
        if event.state not in TRANSITIONS[self.state]:
            raise TransitionError(f"{self.state} → {event.state} is not allowed")
        self.state = event.state
        self.updated_at = event.at
        if event.severity.rank > self.severity.rank:
            self.severity = event.severity  # an escalation may raise it, never lower it
        if event.state is AlertState.ACKNOWLEDGED:
            self.acknowledged_by = event.by
        if event.state is AlertState.ESCALATED:
            # Escalation widens the audience: to the escalation rule's audience, and always operators.
            self.audience = tuple(dict.fromkeys((*self.audience, *event.audience, Audience.OPERATOR)))
        self.triggered_by = tuple(dict.fromkeys((*self.triggered_by, *event.triggered_by)))

    @property
    def active(self) -> bool:
        return self.state is not AlertState.RESOLVED
