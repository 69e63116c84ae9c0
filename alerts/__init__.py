"""Alerts: rules over KPI snapshots and raw events, the alert lifecycle, routing (the engine arrives with issue 4)."""

from alerts.model import Alert, AlertEvent, AlertState, Audience, Severity, TransitionError, fingerprint

__all__ = ["Alert", "AlertEvent", "AlertState", "Audience", "Severity", "TransitionError", "fingerprint"]
