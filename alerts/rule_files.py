"""Rule files: read and validate the YAML into a `RuleSet` (every error names the rule and the field), and reload on change.

The shipped rules are ``alerts/default_rules.yaml``; an operator overrides them with ``IOC_ALERT_RULES``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import string
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alerts.model import Audience, Severity
from alerts.rules import (
    ANOMALY_DETECTORS,
    ANOMALY_SCOPE_PATTERN,
    DOMAINS,
    INCIDENT_CATEGORIES,
    KINDS,
    LABELS,
    OPERATORS,
    PLACEHOLDERS,
    SCOPE_PATTERN,
    AbsenceRule,
    AnomalyRule,
    EventRule,
    Inhibition,
    Message,
    RateOfChangeRule,
    Rule,
    RuleError,
    RuleSet,
    ThresholdRule,
    UnacknowledgedRule,
    matchers_from,
)
from ioc.contract import INCIDENT_SEVERITIES
from ioc.durations import parse_duration

log = logging.getLogger(__name__)


_COMMON_KEYS = {"id", "kind", "domain", "severity", "audience", "message", "description", "repeat",
                "group_by", "group_window"}  # fmt: skip
_SNAPSHOT_KEYS = {"kpi", "window", "scope"}
_KIND_KEYS = {
    "threshold": _SNAPSHOT_KEYS
    | {"op", "value", "target_fallback", "for", "clear", "clear_margin", "clear_for", "min_denominator"},
    "rate_of_change": _SNAPSHOT_KEYS | {"increase", "within", "clear_for"},
    "absence": _SNAPSHOT_KEYS | {"after", "list", "list_scope", "for"},
    "event": {"match"},
    "unacknowledged": {"rule", "after", "escalate_to"},
    "anomaly": {"detector", "scope", "for", "clear_for"},
}
_REQUIRED = {
    "threshold": ("kpi", "window", "scope", "op", "value"),
    "rate_of_change": ("kpi", "window", "scope", "increase", "within"),
    "absence": ("kpi", "window", "scope"),
    "event": ("match",),
    "unacknowledged": ("rule", "after"),
    "anomaly": ("scope",),
}


class _Reader:
    """Typed access to one rule mapping, raising `RuleError` that names the rule and field."""

    def __init__(self, raw: Mapping[str, Any], rule: str | None, source: str) -> None:
        self.raw, self.rule, self.source = raw, rule, source

    def error(self, name: str | None, message: str) -> RuleError:
        return RuleError(message, rule=self.rule, field=name, source=self.source)

    def get(self, name: str, default: Any = None) -> Any:
        return self.raw.get(name, default)

    def string(self, name: str, *, required: bool = False) -> str | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise self.error(name, "is required")
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.error(name, f"must be a non-empty string, not {v!r}")
        return v

    def number(self, name: str, *, required: bool = False, minimum: float | None = None) -> float | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise self.error(name, "is required")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise self.error(name, f"must be a number, not {v!r}")
        if minimum is not None and v < minimum:
            raise self.error(name, f"must be ≥ {minimum:g}, not {v!r}")
        return float(v)

    def duration(self, name: str, *, required: bool = False, positive: bool = False) -> dt.timedelta | None:
        v = self.raw.get(name)
        if v is None:
            if required:
                raise self.error(name, "is required")
            return None
        try:
            d = parse_duration(v)
        except ValueError as e:
            raise self.error(name, str(e)) from None
        if positive and d <= dt.timedelta(0):
            raise self.error(name, "must be longer than 0")
        return d

    def choices(self, name: str, allowed: Sequence[str]) -> tuple[str, ...] | None:
        v = self.raw.get(name)
        if v is None:
            return None
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items:
            raise self.error(name, "must be a string or a non-empty list")
        for item in items:
            if item not in allowed:
                raise self.error(name, f"unknown value {item!r} (allowed: {', '.join(allowed)})")
        return tuple(items)


def _audiences(r: _Reader, name: str, *, required: bool) -> tuple[Audience, ...]:
    allowed = [a.value for a in Audience]
    values = r.choices(name, allowed)
    if values is None:
        if required:
            raise r.error(name, f"is required (one or more of {', '.join(allowed)})")
        return ()
    return tuple(Audience(v) for v in values)


def _message(r: _Reader, kind: str) -> Message:
    raw = r.get("message")
    if not isinstance(raw, Mapping):
        raise r.error("message", "is required: a mapping with 'vi' and 'en' texts")
    unknown = set(raw) - {"vi", "en"}
    if unknown:
        raise r.error("message", f"unknown language(s) {sorted(unknown)} (only 'vi' and 'en')")
    texts = {}
    for lang in ("vi", "en"):
        text = raw.get(lang)
        if not isinstance(text, str) or not text.strip():
            raise r.error(f"message.{lang}", "is required: a non-empty text")
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
        except ValueError as e:
            raise r.error(f"message.{lang}", f"bad placeholder syntax: {e}") from None
        bad = sorted(n for n in names if n not in PLACEHOLDERS[kind])
        if bad:
            raise r.error(
                f"message.{lang}",
                f"unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)} for a {kind} rule "
                f"(known: {', '.join(sorted(PLACEHOLDERS[kind]))})",
            )
        texts[lang] = text
    return Message(texts["vi"], texts["en"])


def _labels(r: _Reader, name: str) -> tuple[str, ...] | None:
    v = r.get(name)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise r.error(name, "must be a list of label names")
    for label in v:
        if label not in LABELS:
            raise r.error(name, f"unknown label {label!r} (known: {', '.join(LABELS)})")
    return tuple(v)


def _rule(raw: Any, index: int, defaults: Mapping[str, Any], source: str) -> Rule:
    if not isinstance(raw, Mapping):
        raise RuleError(f"rule #{index + 1} must be a mapping", source=source)
    rid = raw.get("id")
    r = _Reader(raw, rid if isinstance(rid, str) else f"#{index + 1}", source)
    rule_id = r.string("id", required=True)
    assert rule_id is not None
    if not re.fullmatch(r"[a-z][a-z0-9_.-]*", rule_id):
        raise r.error("id", "must be lower-case letters, digits, '.', '_' or '-' (e.g. env.aqi_bad)")
    kind = r.string("kind", required=True)
    if kind not in KINDS:
        raise r.error("kind", f"unknown kind {kind!r} (allowed: {', '.join(KINDS)})")
    unknown = sorted(set(raw) - _COMMON_KEYS - _KIND_KEYS[kind])
    if unknown:
        raise r.error(
            unknown[0], f"unknown key for a {kind} rule (allowed: {', '.join(sorted(_COMMON_KEYS | _KIND_KEYS[kind]))})"
        )
    for name in _REQUIRED[kind]:
        if raw.get(name) is None:
            raise r.error(name, f"is required for a {kind} rule")
    domain = r.string("domain", required=True)
    if domain not in DOMAINS:
        raise r.error("domain", f"unknown domain {domain!r} (allowed: {', '.join(DOMAINS)})")
    severity = r.string("severity", required=True)
    if severity not in {s.value for s in Severity}:
        raise r.error("severity", f"unknown severity {severity!r} (allowed: {', '.join(s.value for s in Severity)})")
    repeat_raw = raw.get("repeat", defaults.get("repeat"))
    repeat = (
        None
        if repeat_raw == "never"
        else _Reader({"repeat": repeat_raw}, r.rule, source).duration("repeat", positive=True)
    )
    group_by = _labels(r, "group_by")
    group_window = r.duration("group_window", positive=True)
    if (group_by is None) != (group_window is None):
        raise r.error("group_window" if group_by is not None else "group_by", "group_by and group_window go together")
    common: dict[str, Any] = dict(
        id=rule_id,
        kind=kind,
        domain=domain,
        severity=Severity(severity),
        audience=_audiences(r, "audience", required=True),
        message=_message(r, kind),
        description=r.string("description") or "",
        repeat=repeat,
        group_by=group_by,
        group_window=group_window,
    )
    if kind in ("threshold", "rate_of_change", "absence"):
        common.update(_snapshot_fields(r))
    if kind == "threshold":
        op = raw["op"]
        if op not in OPERATORS:
            raise r.error("op", f"unknown operator {op!r} (allowed: {', '.join(OPERATORS)})")
        value = None if raw["value"] == "target" else r.number("value")
        clear = r.number("clear")
        if clear is not None and value is not None:
            wrong_side = clear > value if op in (">", ">=") else clear < value
            if wrong_side:
                raise r.error("clear", f"must be on the safe side of the threshold {value:g} for op {op!r}")
        if clear is not None and raw.get("clear_margin") is not None:
            raise r.error("clear_margin", "give either clear or clear_margin, not both")
        return ThresholdRule(
            **common,
            op=op,
            value=value,
            target_fallback=r.number("target_fallback"),
            for_=r.duration("for") or dt.timedelta(0),
            clear=clear,
            clear_margin=r.number("clear_margin", minimum=0) or 0.0,
            clear_for=r.duration("clear_for") or dt.timedelta(0),
            min_denominator=r.number("min_denominator", minimum=0),
        )
    if kind == "rate_of_change":
        increase = r.number("increase", required=True)
        if increase is None or increase <= 0:
            raise r.error("increase", "must be a number greater than 0")
        within = r.duration("within", required=True, positive=True)
        assert within is not None
        return RateOfChangeRule(
            **common, increase=increase, within=within, clear_for=r.duration("clear_for") or dt.timedelta(0)
        )
    if kind == "absence":
        after = r.duration("after", positive=True)
        list_field = r.string("list")
        if (after is None) == (list_field is None):
            raise r.error(
                "after", "an absence rule needs exactly one of 'after' (no snapshot) or 'list' (ids in extra)"
            )
        list_scope = r.string("list_scope") or "station"
        if list_scope not in ("station", "commune", "agency"):
            raise r.error("list_scope", "must be station, commune or agency")
        return AbsenceRule(
            **common,
            after=after,
            list_field=list_field,
            list_scope=list_scope,
            for_=r.duration("for") or dt.timedelta(0),
        )
    if kind == "event":
        match = raw["match"]
        if not isinstance(match, Mapping):
            raise r.error("match", "must be a mapping (severity, category, min_system_level)")
        m = _Reader(match, r.rule, source)
        bad = sorted(set(match) - {"severity", "category", "min_system_level"})
        if bad:
            raise r.error(f"match.{bad[0]}", "unknown key (allowed: severity, category, min_system_level)")
        level = match.get("min_system_level")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 5):
            raise r.error("match.min_system_level", "must be an integer 1–5 (Decree 85/2016)")
        try:
            severities, categories = (
                m.choices("severity", INCIDENT_SEVERITIES),
                m.choices("category", INCIDENT_CATEGORIES),
            )
        except RuleError as e:
            raise r.error(f"match.{e.field}", str(e).rsplit(": ", 1)[-1]) from None
        return EventRule(**common, severities=severities, categories=categories, min_system_level=level)
    if kind == "anomaly":
        raw_scope = r.get("scope")
        scopes = [raw_scope] if isinstance(raw_scope, str) else raw_scope
        if not isinstance(scopes, list) or not scopes:
            raise r.error("scope", "must be a scope pattern or a list of them")
        for sc in scopes:
            if not isinstance(sc, str) or not ANOMALY_SCOPE_PATTERN.match(sc):
                raise r.error("scope", f"bad scope pattern {sc!r} (station:*, commune:*, category:*, system:*)")
        return AnomalyRule(
            **common,
            detectors=r.choices("detector", ANOMALY_DETECTORS),
            scopes=tuple(scopes),
            for_=r.duration("for") or dt.timedelta(0),
            clear_for=r.duration("clear_for") or dt.timedelta(0),
        )
    # unacknowledged
    after = r.duration("after", required=True, positive=True)
    assert after is not None
    target = r.string("rule", required=True)
    assert target is not None
    return UnacknowledgedRule(
        **common, target=target, after=after, escalate_to=_audiences(r, "escalate_to", required=False)
    )


def _snapshot_fields(r: _Reader) -> dict[str, Any]:
    kpi = r.string("kpi", required=True)
    window = r.string("window", required=True)
    if window not in ("1h", "24h", "today", "mtd", "now"):
        raise r.error("window", f"unknown window {window!r} (allowed: 1h, 24h, today, mtd, now)")
    raw = r.get("scope")
    scopes = [raw] if isinstance(raw, str) else raw
    if not isinstance(scopes, list) or not scopes:
        raise r.error("scope", "must be a scope pattern or a list of them")
    for s in scopes:
        if not isinstance(s, str) or not SCOPE_PATTERN.match(s):
            raise r.error("scope", f"bad scope pattern {s!r} (province, commune:*, commune:16681, station:*, agency:*)")
    return {"kpi": kpi, "window": window, "scopes": tuple(scopes)}


def _inhibition(raw: Any, index: int, source: str) -> Inhibition:
    if not isinstance(raw, Mapping):
        raise RuleError(f"inhibit #{index + 1} must be a mapping", source=source)
    iid = raw.get("id")
    name = f"inhibit {iid!r}" if isinstance(iid, str) else f"inhibit #{index + 1}"
    if not isinstance(iid, str) or not iid:
        raise RuleError("is required", rule=name, field="id", source=source)
    bad = sorted(set(raw) - {"id", "source", "target", "equal", "description"})
    if bad:
        raise RuleError(
            "unknown key (allowed: id, source, target, equal, description)", rule=name, field=bad[0], source=source
        )
    try:
        src = matchers_from(raw.get("source"), what="source")
        tgt = matchers_from(raw.get("target"), what="target")
    except ValueError as e:
        raise RuleError(str(e), rule=name, field="source/target", source=source) from None
    equal = raw.get("equal", [])
    if not isinstance(equal, list) or any(e not in LABELS for e in equal):
        raise RuleError(f"must be a list of labels ({', '.join(LABELS)})", rule=name, field="equal", source=source)
    return Inhibition(iid, src, tgt, tuple(equal))


def parse_rules(text: str, source: str = "<rules>") -> RuleSet:
    """Validate rule-file text into a `RuleSet`; raises `RuleError` naming the rule and field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RuleError(f"not valid YAML: {e}", source=source) from None
    if not isinstance(doc, Mapping):
        raise RuleError("the file must be a mapping with 'version' and 'rules'", source=source)
    bad = sorted(set(doc) - {"version", "defaults", "rules", "inhibit"})
    if bad:
        raise RuleError(f"unknown top-level key {bad[0]!r} (allowed: version, defaults, rules, inhibit)", source=source)
    if doc.get("version") != 1:
        raise RuleError(f"unsupported version {doc.get('version')!r} (this product reads version: 1)", source=source)
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping) or set(defaults) - {"repeat"}:
        raise RuleError("defaults may only set 'repeat'", source=source)
    raw_rules = doc.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RuleError("'rules' must be a non-empty list", source=source)
    rules = [_rule(raw, i, defaults, source) for i, raw in enumerate(raw_rules)]
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise RuleError("duplicate rule id", rule=rule.id, field="id", source=source)
        seen.add(rule.id)
    by_id = {r.id: r for r in rules}
    for rule in rules:
        if isinstance(rule, UnacknowledgedRule):
            target = by_id.get(rule.target)
            if target is None:
                raise RuleError(
                    f"names no rule of this file: {rule.target!r}", rule=rule.id, field="rule", source=source
                )
            if isinstance(target, UnacknowledgedRule):
                raise RuleError("cannot escalate an escalation rule", rule=rule.id, field="rule", source=source)
    raw_inhibit = doc.get("inhibit") or []
    if not isinstance(raw_inhibit, list):
        raise RuleError("'inhibit' must be a list", source=source)
    inhibitions = [_inhibition(raw, i, source) for i, raw in enumerate(raw_inhibit)]
    if len({i.id for i in inhibitions}) != len(inhibitions):
        raise RuleError("duplicate inhibit id", source=source)
    return RuleSet(tuple(rules), tuple(inhibitions), source)


def load_rules(path_or_text: str | os.PathLike[str]) -> RuleSet:
    """Load a rule file (a path) or rule text (a string holding YAML with a newline)."""
    if isinstance(path_or_text, str) and "\n" in path_or_text:
        return parse_rules(path_or_text)
    path = Path(path_or_text)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RuleError(f"cannot read the rule file: {e.strerror or e}", source=str(path)) from None
    return parse_rules(text, str(path))


def default_rules() -> RuleSet:
    """The rules shipped with the product (`alerts/default_rules.yaml`)."""
    text = resources.files("alerts").joinpath("default_rules.yaml").read_text(encoding="utf-8")
    return parse_rules(text, "alerts/default_rules.yaml")


class RuleWatcher:
    """Reloads a rule file when its modification time changes; an invalid new file keeps the old rules.

    Call `check()` now and then (the worker's clock tick): it returns the new `RuleSet` when one was
    loaded, else None; ``error`` holds the last load error (None once a good file is loaded).
    """

    def __init__(self, path: str | os.PathLike[str], initial: RuleSet | None = None) -> None:
        self.path = Path(path)
        self.error: RuleError | None = None
        self._mtime: int | None = None
        self.rules: RuleSet = initial if initial is not None else self._load_first()

    def _load_first(self) -> RuleSet:
        self._mtime = self._stat()
        return load_rules(self.path)

    def _stat(self) -> int | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def check(self) -> RuleSet | None:
        mtime = self._stat()
        if mtime is None or mtime == self._mtime:
            return None
        self._mtime = mtime
        try:
            rules = load_rules(self.path)
        except RuleError as e:
            self.error = e
            log.error("alert rules not reloaded, keeping the previous ones: %s", e)
            return None
        self.error = None
        self.rules = rules
        log.info("alert rules reloaded from %s: %d rules", self.path, len(rules.rules))
        return rules
