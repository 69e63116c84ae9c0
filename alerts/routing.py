"""Who gets which alert: the audience a rule addresses, and what each role may see (CONTRACT §7).

Two questions, kept apart:

- `visible_to`: may this caller see the alert at all (lists, the ``alerts`` channel)? Operators
  and admins see everything; security staff the cyber domain and whatever is addressed to them;
  a commune user only alerts of their own commune (its scope, one of its stations, or its code).
- `addressed_to`: should this caller be *notified* (sound, pop-up)? Visible, and the caller's role
  is in the alert's audience (escalation widens it). Operators and admins always are.

Alerts may be given as `Alert`, `AlertEvent` or the JSON mapping the API holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from alerts.model import Alert, AlertEvent, AlertState, Audience

AlertLike = Alert | AlertEvent | Mapping[str, Any]
#: Roles that see every alert (CONTRACT §7).
SEES_ALL = frozenset({"operator", "admin"})


def _get(alert: AlertLike, name: str) -> Any:
    return alert.get(name) if isinstance(alert, Mapping) else getattr(alert, name, None)


def audience_of(alert: AlertLike) -> tuple[Audience, ...]:
    """The roles the alert is addressed to; an escalated alert always includes operators."""
    audience = tuple(Audience(a) for a in (_get(alert, "audience") or ()))
    state = _get(alert, "state")
    if state is not None and AlertState(state) is AlertState.ESCALATED and Audience.OPERATOR not in audience:
        audience = (*audience, Audience.OPERATOR)
    return audience


def commune_of_alert(alert: AlertLike, station_communes: Mapping[str, str] | None = None) -> str | None:
    """The commune an alert belongs to: its ``commune_code``, its ``commune:`` scope, or its station's commune."""
    code = _get(alert, "commune_code")
    if code:
        return str(code)
    scope = str(_get(alert, "scope") or "")
    if scope.startswith("commune:"):
        return scope[8:]
    if scope.startswith("station:") and station_communes is not None:
        return station_communes.get(scope[8:])
    return None


def visible_to(
    role: str, commune: str | None, alert: AlertLike, station_communes: Mapping[str, str] | None = None
) -> bool:
    """Whether a caller of ``role`` (and ``commune``, for commune users) may see the alert."""
    if role in SEES_ALL:
        return True
    if role == "security":
        return _get(alert, "domain") == "cyber" or Audience.SECURITY in audience_of(alert)
    if role == "commune":
        return commune is not None and commune_of_alert(alert, station_communes) == commune
    return False


def addressed_to(
    role: str, commune: str | None, alert: AlertLike, station_communes: Mapping[str, str] | None = None
) -> bool:
    """Whether the caller should be notified of the alert: visible, and its role is in the audience."""
    if not visible_to(role, commune, alert, station_communes):
        return False
    return role in SEES_ALL or role in {a.value for a in audience_of(alert)}
