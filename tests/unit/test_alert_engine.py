"""The alert engine: each rule kind, `for` and hysteresis, the lifecycle, escalation, repeats,
silences, inhibition, grouping and determinism. Time is passed in; nothing here waits."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import pytest

from alerts.engine import AlertEngine, SilenceError, UnknownAlert, alert_id_for, operator_event
from alerts.model import AlertEvent, AlertState, Audience, Severity, fingerprint
from alerts.rule_files import default_rules, load_rules
from alerts.rules import RuleSet
from ioc.snapshot import Snapshot
from streams.cyber import IncidentState

TZ = dt.timezone(dt.timedelta(hours=7))
T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=TZ)
STATIONS = {"AIR-1": "16681", "AIR-2": "16690", "WL-1": "16681", "WL-2": "16690", "RAIN-1": "16681"}


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def us(minutes: float) -> int:
    return int((at(minutes) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1_000_000)


_seq = iter(range(1, 10**9))


def snap(
    kpi: str,
    scope: str,
    value: float | None,
    minutes: float,
    *,
    window: str = "now",
    target: float | None = None,
    denominator: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Snapshot:
    return Snapshot(
        kpi=kpi, scope=scope, window=window, value=value, unit="", numerator=None, denominator=denominator,
        target=target, status=None, as_of=at(minutes), seq=next(_seq), extra=extra,
    )  # fmt: skip


def incident(
    iid: str,
    severity: str = "critical",
    category: str = "ddos",
    detected: float = 0,
    acknowledged: float | None = None,
    resolved: float | None = None,
    false_positive: float | None = None,
    commune: str | None = None,
) -> IncidentState:
    def step(m: float | None, name: str) -> tuple[int, str] | None:
        return None if m is None else (us(m), f"{iid}-{name}")

    return IncidentState(
        incident_id=iid, severity=severity, category=category, system=f"sys-{iid}.nghean.gov.vn", system_level=3,
        agency_code="000.00.16.H40", commune_code=commune, title=f"{category} on {iid}",
        detected=step(detected, "d"), acknowledged=step(acknowledged, "a"), resolved=step(resolved, "r"),
        false_positive=step(false_positive, "fp"),
    )  # fmt: skip


def engine(rules: RuleSet | str | None = None) -> AlertEngine:
    rs = default_rules() if rules is None else load_rules(rules) if isinstance(rules, str) else rules
    return AlertEngine(
        rs, station_communes=STATIONS, names={"station:AIR-1": "Thành Vinh", "commune:16681": "Phường Thành Vinh"}
    )


def feed(e: AlertEngine, snaps: Iterable[Snapshot]) -> list[AlertEvent]:
    out: list[AlertEvent] = []
    for s in snaps:
        out += e.on_snapshot(s, s.as_of)
    return out


def states(events: Sequence[AlertEvent], rule: str | None = None) -> list[str]:
    return [ev.state.value + ("+" if ev.repeat else "") for ev in events if rule is None or ev.rule == rule]


def rule_text(body: str, inhibit: str = "") -> str:
    return "version: 1\nrules:\n" + body + (("inhibit:\n" + inhibit) if inhibit else "")


THRESHOLD = """  - id: t
    kind: threshold
    domain: env
    severity: high
    audience: [operator, commune]
    kpi: env.aqi
    window: now
    scope: "station:*"
    op: ">"
    value: 150
    {extra}
    message: {{vi: "AQI {{value}} tại {{station_name}}", en: "AQI {{value}} at {{station_name}}"}}
"""


def threshold(extra: str = "") -> str:
    return rule_text(THRESHOLD.format(extra=extra.replace("\n", "\n    ")))


# --- threshold, for, hysteresis ---------------------------------------------------------------


def test_a_value_over_the_threshold_fires_once_with_its_scope_station_commune_and_message() -> None:
    e = engine(threshold())
    events = feed(e, [snap("env.aqi", "station:AIR-1", 120, 0), snap("env.aqi", "station:AIR-1", 160, 1),
                      snap("env.aqi", "station:AIR-1", 170, 2)])  # fmt: skip
    assert states(events) == ["firing"]
    ev = events[0]
    assert (ev.rule, ev.scope, ev.severity, ev.commune_code, ev.at) == (
        "t",
        "station:AIR-1",
        Severity.HIGH,
        "16681",
        at(1),
    )
    assert ev.triggered_by == ("env.aqi|station:AIR-1|now", "AIR-1")
    assert ev.message_vi == "AQI 160 tại Thành Vinh" and ev.message_en == "AQI 160 at Thành Vinh"
    assert ev.alert_id == alert_id_for(fingerprint("t", "station:AIR-1"), at(1)) and ev.notify


def test_a_value_flapping_around_150_every_minute_for_an_hour_gives_exactly_one_alert() -> None:
    e = engine()  # the default env.aqi_bad: ≥ 151, clears at 140 held 30 minutes
    flapping = [snap("env.aqi", "station:AIR-1", 152 if m % 2 else 148, m) for m in range(60)]
    events = feed(e, flapping) + e.tick(at(60))
    assert [(ev.rule, ev.state.value) for ev in events] == [("env.aqi_bad", "firing")]


def test_without_hysteresis_the_same_flapping_would_storm() -> None:
    e = engine(threshold())
    events = feed(e, [snap("env.aqi", "station:AIR-1", 152 if m % 2 else 148, m) for m in range(10)])
    assert states(events).count("firing") == 5  # why the default rules carry clear levels


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([(0, 160), (4, 160), (5, 160)], [("firing", 5)]),  # held for exactly 5 minutes
        ([(0, 160), (4, 140), (5, 160)], []),  # interrupted: the clock starts again
        ([(0, 160), (4, 140), (5, 160), (10, 160)], [("firing", 10)]),
        ([(0, 160)], [("firing", 5)]),  # no new snapshot: the last value holds, the tick fires it
    ],
)
def test_for_fires_only_once_the_condition_has_held_the_whole_duration(
    values: list[tuple[int, float]], expected: list[tuple[str, int]]
) -> None:
    e = engine(threshold("for: 5m"))
    events = feed(e, [snap("env.aqi", "station:AIR-1", v, m) for m, v in values]) + e.tick(at(values[-1][0] + 0.5))
    if values == [(0, 160)]:
        events += e.tick(at(5))
    assert [(ev.state.value, ev.at) for ev in events] == [(s, at(m)) for s, m in expected]


def test_the_same_events_come_out_whatever_the_tick_cadence() -> None:
    def run(ticks: Iterable[float]) -> list[AlertEvent]:
        e = engine(threshold("for: 5m\nclear: 140\nclear_for: 10m"))
        out = feed(e, [snap("env.aqi", "station:AIR-1", 160, 0), snap("env.aqi", "station:AIR-1", 130, 20)])
        for m in ticks:
            out += e.tick(at(m))
        return out

    assert run([40]) == run(range(21, 41)) == run([25, 29.99, 30, 31, 40])


@pytest.mark.parametrize(
    ("later", "expected"),
    [
        ([(1, 145), (2, 149), (3, 141)], ["firing"]),  # inside the band: still firing
        ([(1, 140)], ["firing", "resolved"]),  # at the clear level: resolved
        ([(1, 130), (2, 155)], ["firing", "resolved", "firing"]),  # a real return is a new alert
    ],
)
def test_auto_resolve_waits_for_the_clear_level(later: list[tuple[int, float]], expected: list[str]) -> None:
    e = engine(threshold("clear: 140"))
    events = feed(e, [snap("env.aqi", "station:AIR-1", v, m) for m, v in [(0, 160), *later]])
    assert states(events) == expected
    if expected[-1] == "resolved":
        assert events[-1].by == "system" and events[-1].reason == "condition cleared"


def test_clear_for_resolves_only_after_staying_clear_and_at_that_moment() -> None:
    e = engine(threshold("clear: 140\nclear_for: 10m"))
    events = feed(e, [snap("env.aqi", "station:AIR-1", 160, 0), snap("env.aqi", "station:AIR-1", 130, 1),
                      snap("env.aqi", "station:AIR-1", 155, 5), snap("env.aqi", "station:AIR-1", 130, 6)])  # fmt: skip
    events += e.tick(at(15.9))
    assert states(events) == ["firing"]
    events += e.tick(at(16))
    assert states(events) == ["firing", "resolved"] and events[-1].at == at(16)


def test_a_threshold_on_the_snapshots_own_target_with_a_minimum_denominator() -> None:
    body = """  - id: ontime
    kind: threshold
    domain: dossier
    severity: warning
    audience: [operator, commune]
    kpi: dossier.on_time_rate
    window: today
    scope: "commune:*"
    op: "<"
    value: target
    min_denominator: 10
    clear_margin: 2
    message: {vi: "{scope_name}: {value}% < {threshold}%", en: "{scope_name}: {value}% < {threshold}%"}
"""
    e = engine(rule_text(body))

    def s(v: float, m: int, den: float = 50) -> Snapshot:
        return snap("dossier.on_time_rate", "commune:16681", v, m, window="today", target=90, denominator=den)

    events = feed(e, [s(50, 0, den=3), s(85, 1), s(91, 2), s(93, 3)])
    assert states(events) == ["firing", "resolved"]  # 3 dossiers say nothing; 91 is inside the margin
    assert events[0].message_en == "Phường Thành Vinh: 85% < 90%" and events[0].commune_code == "16681"


# --- rate of change, absence, dead letters ----------------------------------------------------

RISING = """  - id: rising
    kind: rate_of_change
    domain: dossier
    severity: warning
    audience: [operator, commune]
    kpi: dossier.overdue
    window: now
    scope: "commune:*"
    increase: 5
    within: 1h
    message: {vi: "+{increase} trong {within}", en: "+{increase} within {within} ({from_value} → {value})"}
"""


def test_a_backlog_rising_by_the_amount_within_the_duration_fires_and_resolves_when_it_stops() -> None:
    e = engine(rule_text(RISING))
    values = [(0, 10), (20, 12), (40, 15), (70, 16), (100, 16)]  # at 70 the hour back starts at 12: +4
    events = feed(e, [snap("dossier.overdue", "commune:16681", v, m) for m, v in values])
    assert [(ev.state.value, ev.at) for ev in events] == [("firing", at(40)), ("resolved", at(70))]
    assert events[0].message_en == "+5 within 1h (10 → 15)"


def test_a_slow_rise_spread_over_more_than_the_duration_does_not_fire() -> None:
    e = engine(rule_text(RISING))
    events = feed(e, [snap("dossier.overdue", "commune:16681", 10 + m // 20, m) for m in range(0, 300, 20)])
    assert events == []


def test_stations_listed_offline_fire_one_alert_each_and_resolve_when_they_report_again() -> None:
    e = engine()

    def offline(m: int, *stations: str) -> Snapshot:
        return snap("sensor.offline", "province", len(stations), m, extra={"stations": list(stations)})

    # The default rule holds 15 minutes: a station back within that never fires (a cold start).
    events = feed(e, [offline(0), offline(1, "AIR-2"), offline(2, "AIR-2", "WL-1"), offline(3, "WL-1"),
                      offline(10), offline(11, "AIR-2"), offline(20, "AIR-2", "WL-1"), offline(27, "AIR-2", "WL-1"),
                      offline(36, "WL-1"), offline(40)])  # fmt: skip
    got = [(ev.state.value, ev.scope, ev.commune_code, ev.at) for ev in events if ev.rule == "sensor.station_offline"]
    assert got == [
        ("firing", "station:AIR-2", "16690", at(26)),  # missing since 11
        ("firing", "station:WL-1", "16681", at(35)),  # missing since 20
        ("resolved", "station:AIR-2", "16690", at(36)),
        ("resolved", "station:WL-1", "16681", at(40)),
    ]


def test_no_snapshot_for_a_scope_for_the_duration_fires_and_the_next_one_resolves() -> None:
    body = """  - id: silent
    kind: absence
    domain: env
    severity: warning
    audience: [operator]
    kpi: env.aqi
    window: now
    scope: "station:*"
    after: 30m
    message: {vi: "{station} im lặng {after}", en: "{station} silent for {after}"}
"""
    e = engine(rule_text(body))
    events = feed(e, [snap("env.aqi", "station:AIR-1", 50, 0), snap("env.aqi", "station:AIR-1", 50, 10)])
    events += e.tick(at(39))
    assert events == []
    events += e.tick(at(41))
    events += e.on_snapshot(snap("env.aqi", "station:AIR-1", 50, 50), at(50))
    assert [(ev.state.value, ev.at) for ev in events] == [("firing", at(40)), ("resolved", at(50))]
    assert events[0].message_en == "AIR-1 silent for 30m"


def test_a_dead_letter_rate_above_the_threshold_for_five_minutes_fires() -> None:
    e = engine()
    events = e.on_deadletters(5, 50, at(0))  # 10 % but of too few records
    events += e.on_deadletters(30, 1000, at(1)) + e.tick(at(5.9))
    assert events == []
    events += e.on_deadletters(40, 1100, at(6))
    assert [(ev.rule, ev.state.value, ev.scope, ev.at) for ev in events] == [
        ("platform.deadletter_rate", "firing", "province", at(6))
    ]


# --- incidents, escalation, acknowledgement, repeat -------------------------------------------


def test_a_critical_incident_fires_at_detection_naming_the_incident() -> None:
    e = engine()
    events = e.on_incident(incident("INC-1", commune="16681"), at(0))
    assert [(ev.rule, ev.state.value, ev.scope, ev.triggered_by, ev.at) for ev in events] == [
        ("cyber.incident_critical", "firing", "commune:16681", ("INC-1",), at(0))
    ]
    assert "INC-1" in events[0].message_vi and events[0].domain == "cyber"
    assert events[0].audience == (Audience.SECURITY, Audience.OPERATOR)


@pytest.mark.parametrize(("severity", "rule"), [("high", "cyber.incident_high"), ("low", None), ("medium", None)])
def test_incident_rules_match_on_severity(severity: str, rule: str | None) -> None:
    events = engine().on_incident(incident("INC-1", severity=severity), at(0))
    assert [ev.rule for ev in events] == ([rule] if rule else [])


def test_a_critical_incident_unacknowledged_is_escalated_exactly_at_15_minutes() -> None:
    e = engine()
    e.on_incident(incident("INC-1"), at(0))
    assert e.tick(at(14) + dt.timedelta(seconds=59)) == []
    events = e.tick(at(15))
    assert [(ev.state.value, ev.at, ev.by) for ev in events] == [("escalated", at(15), "system")]
    assert Audience.OPERATOR in events[0].audience and events[0].extra == {
        "escalation_rule": "cyber.critical_unacknowledged"
    }
    assert events[0].message_en.startswith("Not acknowledged after 15m — CRITICAL security incident INC-1")
    assert e.active()[0].state is AlertState.ESCALATED


@pytest.mark.parametrize("ack_minute", [1, 14.99, 15])
def test_an_acknowledgement_up_to_the_deadline_prevents_the_escalation(ack_minute: float) -> None:
    e = engine()
    alert_id = e.on_incident(incident("INC-1"), at(0))[0].alert_id
    ack = e.acknowledge(alert_id, "nguyen.van.a", at(ack_minute), "đang xử lý")
    assert [(ev.state.value, ev.by, ev.reason, ev.notify) for ev in ack] == [
        ("acknowledged", "nguyen.van.a", "đang xử lý", False)
    ]
    assert e.tick(at(600)) == []  # no escalation, no reminders


def test_an_acknowledged_incident_event_acknowledges_the_alert_by_the_soc() -> None:
    e = engine()
    e.on_incident(incident("INC-1"), at(0))
    events = e.on_incident(incident("INC-1", acknowledged=10), at(10)) + e.tick(at(60))
    assert [(ev.state.value, ev.by, ev.at) for ev in events] == [("acknowledged", "soc", at(10))]
    events = e.on_incident(incident("INC-1", acknowledged=10, resolved=50), at(70))
    assert [(ev.state.value, ev.at) for ev in events] == [("resolved", at(50))] and e.active() == []


def test_a_late_acknowledgement_event_still_takes_effect_at_its_own_time() -> None:
    e = engine()
    # Detected and acknowledged within 5 minutes, but the worker hears of both only at 20 minutes.
    events = e.on_incident(incident("INC-1", acknowledged=5), at(20))
    assert states(events) == ["firing", "acknowledged"]


def test_a_false_positive_resolves_and_never_escalates() -> None:
    e = engine()
    e.on_incident(incident("INC-1"), at(0))
    events = e.on_incident(incident("INC-1", false_positive=3), at(3)) + e.tick(at(60))
    assert states(events) == ["resolved"] and events[0].by == "soc"


def test_repeat_reminds_while_unacknowledged_and_acknowledging_stops_it() -> None:
    e = engine()  # cyber.incident_critical repeats every 30 minutes
    alert_id = e.on_incident(incident("INC-1"), at(0))[0].alert_id
    events = e.tick(at(61))
    assert [(states([ev])[0], ev.repeat, ev.at) for ev in events] == [
        ("escalated", 0, at(15)), ("escalated+", 1, at(30)), ("escalated+", 2, at(60)),
    ]  # fmt: skip
    e.acknowledge(alert_id, "tran.thi.b", at(62))
    assert e.tick(at(300)) == []


def test_an_acknowledgement_made_in_the_api_stops_the_escalation() -> None:
    e = engine()
    e.on_incident(incident("INC-1"), at(0))
    alert = e.active()[0]
    ack = operator_event(alert, AlertState.ACKNOWLEDGED, "le.van.c", at(5), "qua API")
    assert e.apply_external(ack) and not e.apply_external(ack)  # applied once, then a no-op
    assert e.tick(at(120)) == [] and e.active()[0].acknowledged_by == "le.van.c"


def test_acting_on_an_unknown_alert_is_refused() -> None:
    with pytest.raises(UnknownAlert):
        engine().acknowledge("nope", "x", at(0))


def test_a_manual_resolve_does_not_re_fire_until_the_condition_has_cleared() -> None:
    e = engine(threshold("clear: 140"))
    alert_id = feed(e, [snap("env.aqi", "station:AIR-1", 160, 0)])[0].alert_id
    events = e.resolve(alert_id, "nguyen.van.a", at(1), "cảm biến lỗi")
    events += feed(e, [snap("env.aqi", "station:AIR-1", 165, 2), snap("env.aqi", "station:AIR-1", 130, 3),
                       snap("env.aqi", "station:AIR-1", 170, 4)])  # fmt: skip
    assert [(ev.state.value, ev.by) for ev in events] == [("resolved", "nguyen.van.a"), ("firing", "system")]


# --- silences ---------------------------------------------------------------------------------


def test_a_silence_suppresses_notifications_but_the_alert_keeps_its_state_and_resolves() -> None:
    e = engine(threshold("clear: 140"))
    sil = e.add_silence({"rule": "t", "scope": "station:AIR-*"}, at(0), at(60), "admin.d", "bảo trì trạm")
    events = feed(e, [snap("env.aqi", "station:AIR-1", 160, 1), snap("env.aqi", "station:AIR-1", 120, 10)])
    assert [(ev.state.value, ev.notify, ev.by) for ev in events] == [
        ("firing", False, "system"), ("silenced", False, "admin.d"), ("resolved", False, "system"),
    ]  # fmt: skip
    assert events[1].reason == "bảo trì trạm" and events[1].extra is not None and events[1].extra["silence"] == sil.id


def test_a_silence_that_does_not_match_changes_nothing_and_one_that_expires_lets_the_alert_speak() -> None:
    e = engine(threshold())
    e.add_silence({"scope": "station:AIR-2"}, at(0), at(30), "admin.d", "bảo trì")
    sil = e.add_silence({"scope": "station:AIR-1"}, at(0), at(30), "admin.d", "bảo trì")
    events = feed(e, [snap("env.aqi", "station:AIR-2", 160, 1), snap("env.aqi", "station:AIR-1", 160, 2)])
    assert [(ev.scope, ev.state.value) for ev in events] == [
        ("station:AIR-2", "firing"), ("station:AIR-2", "silenced"),
        ("station:AIR-1", "firing"), ("station:AIR-1", "silenced"),
    ]  # fmt: skip
    events = e.expire_silence(sil.id, "admin.d", at(10))
    assert [(ev.scope, ev.state.value, ev.notify, ev.by) for ev in events] == [
        ("station:AIR-1", "firing", True, "admin.d")
    ]
    events = e.tick(at(30))
    assert [(ev.scope, ev.state.value, ev.notify, ev.at) for ev in events] == [
        ("station:AIR-2", "firing", True, at(30))
    ]


def test_a_silence_starting_later_silences_alerts_already_firing_when_it_starts() -> None:
    e = engine()
    e.on_incident(incident("INC-1"), at(0))
    e.add_silence({"category": "ddos"}, at(5), at(40), "soc.lead", "diễn tập")
    events = e.tick(at(39))
    assert [(ev.state.value, ev.at) for ev in events] == [("silenced", at(5))]  # no escalation while silenced
    events = e.tick(at(40))
    # Back to firing when the silence ends, and overdue for escalation: escalated at once.
    assert [(ev.state.value, ev.at) for ev in events] == [("firing", at(40)), ("escalated", at(40))]


@pytest.mark.parametrize(
    ("matchers", "starts", "ends", "by", "reason"),
    [({}, 0, 10, "a", "b"), ({"colour": "red"}, 0, 10, "a", "b"), ({"rule": "t"}, 10, 0, "a", "b"),
     ({"rule": "t"}, 0, 10, "", "b"), ({"rule": "t"}, 0, 10, "a", " ")],
)  # fmt: skip
def test_a_malformed_silence_is_refused(matchers: dict[str, str], starts: int, ends: int, by: str, reason: str) -> None:
    with pytest.raises(SilenceError):
        engine().add_silence(matchers, at(starts), at(ends), by, reason)


# --- inhibition, grouping ---------------------------------------------------------------------


def test_a_province_flood_alarm_inhibits_the_per_gauge_notifications_but_not_their_state() -> None:
    e = engine()
    events = feed(e, [snap("water.alarm_level", "province", 3, 0, extra={"station": "WL-1"}),
                      snap("water.alarm_level", "station:WL-1", 3, 0), snap("water.alarm_level", "station:WL-2", 2, 1)])  # fmt: skip
    got = [(ev.rule, ev.scope, ev.state.value, ev.notify) for ev in events]
    assert got == [
        ("water.alarm_3_province", "province", "firing", True),
        ("water.alarm_2", "station:WL-1", "firing", False),
        ("water.alarm_3", "station:WL-1", "firing", False),
        ("water.alarm_2", "station:WL-2", "firing", False),
    ]
    province_id = events[0].alert_id
    assert all(ev.extra == {"inhibited_by": province_id} for ev in events[1:]) and len(e.active()) == 4


def test_when_the_inhibiting_alert_resolves_the_held_back_alerts_are_announced() -> None:
    e = engine()
    feed(e, [snap("water.alarm_level", "province", 3, 0), snap("water.alarm_level", "station:WL-2", 2, 0)])
    events = feed(e, [snap("water.alarm_level", "province", 2, 5)]) + e.tick(at(35))
    assert [(ev.rule, states([ev])[0], ev.notify, ev.at) for ev in events] == [
        ("water.alarm_3_province", "resolved", True, at(35)),
        ("water.alarm_2", "firing+", True, at(35)),
    ]


def test_twenty_ddos_incidents_within_the_group_window_are_one_notification() -> None:
    e = engine()
    events: list[AlertEvent] = []
    for i in range(20):
        events += e.on_incident(incident(f"DDOS-{i:02}", detected=i * 0.25), at(i * 0.25))
    firing = [ev for ev in events if ev.state is AlertState.FIRING]
    assert len(firing) == 20 and len(e.active()) == 20  # each incident keeps its own alert
    assert [ev.notify for ev in firing] == [True] + [False] * 19
    assert len({ev.group for ev in firing}) == 1 and firing[0].group is not None
    # Their escalations at 15 minutes are one notification too.
    escalated = e.tick(at(20))
    assert len(escalated) == 20 and sum(ev.notify for ev in escalated) == 1
    # A DDoS an hour later is news again.
    later = e.on_incident(incident("DDOS-LATE", detected=80), at(80))
    assert [ev.notify for ev in later if ev.state is AlertState.FIRING] == [True]


def test_grouping_keeps_categories_apart() -> None:
    e = engine()
    events = e.on_incident(incident("A", category="ddos"), at(0)) + e.on_incident(
        incident("B", category="malware"), at(1)
    )
    assert [ev.notify for ev in events] == [True, True]


# --- rules reload, determinism ----------------------------------------------------------------


def test_reloading_rules_resolves_alerts_of_removed_rules_and_applies_new_thresholds() -> None:
    e = engine(threshold())
    feed(e, [snap("env.aqi", "station:AIR-1", 160, 0)])
    events = e.set_rules(load_rules(threshold().replace("id: t", "id: t2")), at(1))
    assert [(ev.rule, ev.state.value, ev.reason) for ev in events] == [
        ("t", "resolved", "rule t removed from the rule set")
    ]
    assert states(feed(e, [snap("env.aqi", "station:AIR-1", 160, 2)])) == ["firing"]


def _scenario() -> list[bytes]:
    e = engine()
    out: list[AlertEvent] = []
    for m in range(90):
        out += e.on_snapshot(snap("env.aqi", "station:AIR-1", 140 + (m % 7) * 5, m), at(m))
        out += e.on_snapshot(snap("water.alarm_level", "station:WL-1", 2 if 20 < m < 50 else 1, m), at(m))
        if m % 9 == 0:
            out += e.on_incident(incident(f"INC-{m}", severity="critical" if m % 2 else "high", detected=m), at(m))
        if m == 30:
            out += e.acknowledge(e.active()[0].alert_id, "op", at(m))
        out += e.tick(at(m + 0.5))
    return [msgspec.json.encode(ev) for ev in out]


def test_the_same_inputs_in_the_same_order_give_byte_identical_alert_events() -> None:
    first = _scenario()
    assert first == _scenario() and len(first) > 10


def test_times_without_an_offset_are_refused() -> None:
    with pytest.raises(ValueError, match="offset"):
        engine().tick(dt.datetime(2026, 11, 22, 8, 0))


@pytest.mark.parametrize(
    ("kpi", "value", "wider", "narrower"),
    [("water.alarm_level", 3, "water.alarm_3", "water.alarm_2"), ("env.aqi", 230, "env.aqi_very_bad", "env.aqi_bad")],
)
def test_the_worse_level_at_a_station_inhibits_the_lesser_one_there_only(
    kpi: str, value: float, wider: str, narrower: str
) -> None:
    e = engine()
    events = feed(e, [snap(kpi, "station:WL-1", value, 0), snap(kpi, "station:WL-2", value, 0)])
    # Rules fire in file order (the lesser first), so the lesser at WL-1 was announced before the worse one
    # existed; from then on the worse one holds the lesser back at its own station, never at another.
    assert {(ev.rule, ev.scope): ev.notify for ev in events} == {
        (narrower, "station:WL-1"): True, (wider, "station:WL-1"): True,
        (narrower, "station:WL-2"): True, (wider, "station:WL-2"): True,
    }  # fmt: skip
    reminders = e.tick(at(4 * 60))
    assert {(ev.rule, ev.scope): ev.notify for ev in reminders} == {
        (narrower, "station:WL-1"): False, (wider, "station:WL-1"): True,
        (narrower, "station:WL-2"): False, (wider, "station:WL-2"): True,
    }  # fmt: skip


def test_alerts_restored_after_a_restart_do_not_fire_again_and_still_escalate_and_take_an_ack() -> None:
    first = engine()
    t0 = at(0)
    state = IncidentState(
        "SOC-R", severity="critical", category="malware", system="x", agency_code="A",
        detected=(int(t0.timestamp() * 1_000_000), "e1"),
    )  # fmt: skip
    fired = first.on_incident(state, t0)
    assert [e.state.value for e in fired] == ["firing"]
    open_before = first.active()
    # A new worker: the same incident state comes again (replayed input), and the open alert is restored.
    second = engine()
    assert second.restore(open_before, at(5)) == 1
    assert second.on_incident(state, at(5)) == []  # no second alert for the same incident
    escalated = second.tick(at(15))
    assert [(e.alert_id, e.state.value) for e in escalated] == [(fired[0].alert_id, "escalated")]
    alert = second.get(fired[0].alert_id)
    assert alert is not None
    ack = operator_event(alert, AlertState.ACKNOWLEDGED, "soc", at(16))
    assert second.apply_external(ack)
    assert second.get(fired[0].alert_id).state is AlertState.ACKNOWLEDGED  # type: ignore[union-attr]
