"""Alerts: rules (`rules`), the engine (`engine`: `conditions`, `lifecycle`, `notify`, `timers`), routing, webhooks."""

from alerts.engine import (
    AlertEngine,
    AlertEngineError,
    Silence,
    SilenceError,
    UnknownAlert,
    alert_id_for,
    operator_event,
)
from alerts.model import Alert, AlertEvent, AlertState, Audience, Severity, TransitionError, fingerprint
from alerts.routing import addressed_to, audience_of, visible_to
from alerts.rule_files import RuleWatcher, default_rules, load_rules
from alerts.rules import RuleError, RuleSet

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertEngineError",
    "AlertEvent",
    "AlertState",
    "Audience",
    "RuleError",
    "RuleSet",
    "RuleWatcher",
    "Severity",
    "Silence",
    "SilenceError",
    "TransitionError",
    "UnknownAlert",
    "addressed_to",
    "alert_id_for",
    "audience_of",
    "default_rules",
    "fingerprint",
    "load_rules",
    "operator_event",
    "visible_to",
]
