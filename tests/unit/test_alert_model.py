"""The alert lifecycle's rules: allowed transitions, audit fields, fingerprints."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from alerts import Alert, AlertEvent, AlertState, Audience, Severity, TransitionError, fingerprint

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=7)))


def event(state: AlertState, minutes: int = 0, by: str = "system") -> AlertEvent:
    return AlertEvent(
        alert_id="a1",
        fingerprint=fingerprint("cyber.critical_unacked", "province"),
        rule="cyber.critical_unacked",
        scope="province",
        severity=Severity.CRITICAL,
        state=state,
        domain="cyber",
        audience=(Audience.SECURITY,),
        message_vi="Sự cố nghiêm trọng chưa được tiếp nhận",
        message_en="Critical incident not acknowledged",
        at=T0 + dt.timedelta(minutes=minutes),
        by=by,
        triggered_by=("INC-1",),
    )


def test_fingerprint_is_stable_and_distinguishes_rule_and_scope() -> None:
    assert fingerprint("r", "province") == fingerprint("r", "province")
    assert fingerprint("r", "commune:16681") != fingerprint("r", "commune:16690")
    assert fingerprint("r1", "province") != fingerprint("r2", "province")


def test_lifecycle_records_who_acknowledged_and_escalation_widens_the_audience() -> None:
    alert = Alert.open(event(AlertState.FIRING))
    alert.apply(event(AlertState.ESCALATED, 15))
    assert Audience.OPERATOR in alert.audience
    alert.apply(event(AlertState.ACKNOWLEDGED, 16, by="nguyen.van.a"))
    assert (alert.state, alert.acknowledged_by) == (AlertState.ACKNOWLEDGED, "nguyen.van.a")
    alert.apply(event(AlertState.RESOLVED, 60))
    assert not alert.active and alert.updated_at == T0 + dt.timedelta(minutes=60)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        ([AlertState.FIRING, AlertState.RESOLVED], AlertState.ACKNOWLEDGED),
        ([AlertState.FIRING, AlertState.ACKNOWLEDGED], AlertState.ESCALATED),
        ([AlertState.FIRING], AlertState.FIRING),
    ],
)
def test_steps_the_lifecycle_forbids_are_refused(path: list[AlertState], bad: AlertState) -> None:
    alert = Alert.open(event(path[0]))
    for state in path[1:]:
        alert.apply(event(state))
    with pytest.raises(TransitionError):
        alert.apply(event(bad))


def test_an_alert_cannot_open_in_another_state() -> None:
    with pytest.raises(TransitionError):
        Alert.open(event(AlertState.ACKNOWLEDGED))


def test_alert_event_round_trips_as_json() -> None:
    e = event(AlertState.FIRING)
    assert msgspec.json.decode(msgspec.json.encode(e), type=AlertEvent) == e
