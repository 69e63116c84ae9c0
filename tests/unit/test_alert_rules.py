"""Alert rule files: the defaults load, bad files fail with errors naming the rule and field, reloads keep good rules."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from alerts.model import Audience, Severity
from alerts.rule_files import RuleWatcher, default_rules, load_rules
from alerts.rules import EventRule, RuleError, ThresholdRule, UnacknowledgedRule
from ioc.durations import parse_duration

GOOD = """
version: 1
rules:
  - id: env.aqi_bad
    kind: threshold
    domain: env
    severity: high
    audience: [operator, commune]
    kpi: env.aqi
    window: now
    scope: "station:*"
    op: ">="
    value: 151
    clear: 140
    message: {vi: "VN_AQI {value} tại {station_name}", en: "VN_AQI {value} at {station_name}"}
"""


def test_default_rules_cover_the_issue_and_validate() -> None:
    rules = default_rules()
    ids = set(rules.by_id)
    assert {
        "cyber.incident_critical",
        "cyber.incident_high",
        "cyber.critical_unacknowledged",
        "env.aqi_bad",
        "env.aqi_very_bad",
        "water.alarm_2",
        "water.alarm_3",
        "rain.heavy_24h",
        "sensor.station_offline",
        "dossier.on_time_below_target",
        "dossier.overdue_rising",
        "platform.deadletter_rate",
    } <= ids
    escalation = rules.by_id["cyber.critical_unacknowledged"]
    assert isinstance(escalation, UnacknowledgedRule) and escalation.after == dt.timedelta(minutes=15)
    aqi = rules.by_id["env.aqi_bad"]
    assert isinstance(aqi, ThresholdRule) and (aqi.op, aqi.value) == (">=", 151)
    critical = rules.by_id["cyber.incident_critical"]
    assert isinstance(critical, EventRule) and critical.severities == ("critical",)


def test_a_valid_rule_loads_with_its_types() -> None:
    rule = load_rules(GOOD).by_id["env.aqi_bad"]
    assert isinstance(rule, ThresholdRule)
    assert rule.severity is Severity.HIGH and rule.audience == (Audience.OPERATOR, Audience.COMMUNE)
    assert rule.scopes == ("station:*",) and rule.clear == 140


@pytest.mark.parametrize(
    ("old", "new", "rule", "field", "says"),
    [
        ("    clear: 140\n", "    clear: 140\n    colour: red\n", "env.aqi_bad", "colour", "unknown key"),
        ("severity: high", "severity: urgent", "env.aqi_bad", "severity", "unknown severity"),
        ("audience: [operator, commune]", "audience: [operator, mayor]", "env.aqi_bad", "audience", "'mayor'"),
        ("value: 151", "value: lots", "env.aqi_bad", "value", "must be a number"),
        ("    value: 151\n", "", "env.aqi_bad", "value", "is required"),
        ('op: ">="', 'op: "=="', "env.aqi_bad", "op", "unknown operator"),
        ("clear: 140", "clear: 160", "env.aqi_bad", "clear", "safe side"),
        ('en: "VN_AQI {value} at {station_name}"', 'fr: "x"', "env.aqi_bad", "message", "unknown language"),
        ('en: "VN_AQI {value} at {station_name}"', 'en: "AQI {aqi}"', "env.aqi_bad", "message.en", "{aqi}"),
        ('vi: "VN_AQI {value} tại {station_name}", ', "", "env.aqi_bad", "message.vi", "is required"),
        ('scope: "station:*"', 'scope: "district:*"', "env.aqi_bad", "scope", "bad scope pattern"),
        ("window: now", "window: 2h", "env.aqi_bad", "window", "unknown window"),
        ("kind: threshold", "kind: magic", "env.aqi_bad", "kind", "unknown kind"),
        ("domain: env", "domain: weather", "env.aqi_bad", "domain", "unknown domain"),
        ("id: env.aqi_bad", "id: Env AQI", "Env AQI", "id", "lower-case"),
    ],
)
def test_an_invalid_rule_is_refused_naming_the_rule_and_field(
    old: str, new: str, rule: str, field: str, says: str
) -> None:
    assert old in GOOD
    with pytest.raises(RuleError) as info:
        load_rules(GOOD.replace(old, new))
    assert (info.value.rule, info.value.field) == (rule, field)
    assert says in str(info.value) and f"rule {rule!r}" in str(info.value)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version: 2\nrules: []\n", "unsupported version"),
        ("version: 1\nrules: []\n", "non-empty list"),
        ("version: 1\nrulez: []\n", "unknown top-level key"),
        ("version: 1\nrules: [\n", "not valid YAML"),
        (GOOD + GOOD.split("rules:\n", 1)[1], "duplicate rule id"),
        (
            GOOD
            + """  - id: esc
    kind: unacknowledged
    domain: env
    severity: high
    audience: [operator]
    rule: env.nothing
    after: 15m
    message: {vi: "x", en: "x"}
""",
            "names no rule",
        ),
        (GOOD + "inhibit:\n  - id: i\n    source: {colour: red}\n    target: {rule: x}\n", "unknown label 'colour'"),
    ],
)
def test_an_invalid_file_is_refused_with_a_clear_error(text: str, says: str) -> None:
    with pytest.raises(RuleError, match=says):
        load_rules(text)


def test_an_event_rule_validates_its_match_fields() -> None:
    text = GOOD.split("rules:\n")[0] + (
        "rules:\n  - id: cyber.x\n    kind: event\n    domain: cyber\n    severity: high\n    audience: [security]\n"
        "    match: {severity: extreme}\n    message: {vi: '{incident}', en: '{incident}'}\n"
    )
    with pytest.raises(RuleError) as info:
        load_rules(text)
    assert (info.value.rule, info.value.field) == ("cyber.x", "match.severity")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("15m", dt.timedelta(minutes=15)), ("1h30m", dt.timedelta(minutes=90)), ("2d", dt.timedelta(days=2)),
     ("45s", dt.timedelta(seconds=45)), ("0", dt.timedelta(0))],
)  # fmt: skip
def test_durations_read_as_written(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["15", "m", "1.5h", "15 minutes", ""])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _touch(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_the_watcher_reloads_a_changed_file_and_keeps_the_old_rules_when_the_new_one_is_invalid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rules.yaml"
    _touch(path, GOOD, 1_000_000_000)
    watcher = RuleWatcher(path)
    assert watcher.check() is None  # unchanged
    _touch(path, GOOD.replace("value: 151", "value: 161"), 2_000_000_000)
    reloaded = watcher.check()
    assert reloaded is not None and watcher.rules is reloaded
    rule = reloaded.by_id["env.aqi_bad"]
    assert isinstance(rule, ThresholdRule) and rule.value == 161
    _touch(path, GOOD.replace("severity: high", "severity: urgent"), 3_000_000_000)
    assert watcher.check() is None
    assert watcher.rules is reloaded and watcher.error is not None and watcher.error.field == "severity"
    _touch(path, GOOD, 4_000_000_000)
    assert watcher.check() is not None and watcher.error is None
