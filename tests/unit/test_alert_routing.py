"""Alert routing: who may see an alert and who is notified (CONTRACT §7); a commune never sees another's."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest

from alerts.model import AlertEvent, AlertState, Audience, Severity, fingerprint
from alerts.routing import addressed_to, audience_of, visible_to

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=7)))
STATIONS = {"AIR-16681": "16681", "AIR-16690": "16690"}


def alert(
    scope: str,
    domain: str = "env",
    commune_code: str | None = None,
    audience: tuple[Audience, ...] = (Audience.OPERATOR, Audience.COMMUNE),
    state: AlertState = AlertState.FIRING,
) -> AlertEvent:
    return AlertEvent(
        alert_id="a", fingerprint=fingerprint("r", scope), rule="r", scope=scope, severity=Severity.HIGH, state=state,
        domain=domain, audience=audience, commune_code=commune_code, message_vi="x", message_en="x", at=T0,
    )  # fmt: skip


CASES: list[tuple[str, AlertEvent, dict[tuple[str, str | None], bool]]] = [
    (
        "commune scope",
        alert("commune:16681", commune_code="16681"),
        {("operator", None): True, ("admin", None): True, ("security", None): False,
         ("commune", "16681"): True, ("commune", "16690"): False},
    ),
    (
        "station of a commune, no commune code on the alert",
        alert("station:AIR-16681"),
        {("operator", None): True, ("security", None): False, ("commune", "16681"): True, ("commune", "16690"): False},
    ),
    (
        "cyber incident of a commune",
        alert("commune:16690", domain="cyber", commune_code="16690", audience=(Audience.SECURITY,)),
        {("operator", None): True, ("security", None): True, ("commune", "16690"): True, ("commune", "16681"): False},
    ),
    (
        "province-wide",
        alert("province", domain="water", audience=(Audience.OPERATOR,)),
        {("operator", None): True, ("security", None): False, ("commune", "16681"): False},
    ),
    (
        "escalated to security",
        alert("province", domain="platform", audience=(Audience.OPERATOR, Audience.SECURITY), state=AlertState.ESCALATED),
        {("operator", None): True, ("security", None): True, ("commune", "16681"): False},
    ),
    ("unknown role", alert("province"), {("guest", None): False, ("commune", None): False}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "subject", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_role_sees_only_what_its_rights_allow(
    name: str, subject: AlertEvent, expected: dict[tuple[str, str | None], bool]
) -> None:
    as_json: dict[str, Any] = msgspec.to_builtins(subject)
    for (role, commune), visible in expected.items():
        assert visible_to(role, commune, subject, STATIONS) is visible, (name, role, commune)
        assert visible_to(role, commune, as_json, STATIONS) is visible, (name, role, commune, "json")


def test_a_commune_never_sees_another_communes_alert_whatever_its_kind() -> None:
    others = [
        alert("commune:16690", commune_code="16690"),
        alert("station:AIR-16690"),
        alert("station:AIR-16690", commune_code="16690", state=AlertState.ESCALATED),
        alert("commune:16690", domain="cyber", commune_code="16690", audience=tuple(Audience)),
    ]
    assert not any(visible_to("commune", "16681", a, STATIONS) for a in others)
    assert not any(addressed_to("commune", "16681", a, STATIONS) for a in others)


def test_notification_follows_the_audience_and_escalation_adds_operators() -> None:
    cyber = alert("province", domain="cyber", audience=(Audience.SECURITY,))
    assert addressed_to("security", None, cyber) and addressed_to("operator", None, cyber)
    own = alert("commune:16681", commune_code="16681", audience=(Audience.OPERATOR,))
    assert visible_to("commune", "16681", own) and not addressed_to("commune", "16681", own)
    escalated = alert("province", domain="cyber", audience=(Audience.SECURITY,), state=AlertState.ESCALATED)
    assert audience_of(escalated) == (Audience.SECURITY, Audience.OPERATOR)
