"""Alert rules: the kinds a rule file may hold, as frozen dataclasses (reading the file: `alerts.rule_files`).

A rule file has ``version: 1``, optional ``defaults`` (``repeat``), a list of ``rules`` and a list
of ``inhibit`` entries. Rule kinds:

- ``threshold``: a KPI value compared with a number or the snapshot's own target, held ``for`` a
  while before firing; it resolves only once the value passes a ``clear`` level (hysteresis) and
  stays there ``clear_for``.
- ``rate_of_change``: a KPI value rising by at least ``increase`` within ``within``.
- ``absence``: no snapshot of a KPI for a scope ``after`` a while, or (with ``list``) every id the
  snapshot's ``extra[list]`` names (``sensor.offline`` lists silent stations).
- ``event``: a security incident matching severity/category/system level, firing at detection.
- ``unacknowledged``: an alert of another rule still not acknowledged ``after`` a while is
  escalated to a wider audience.
- ``anomaly``: a finding of the anomaly detectors (`streams.anomaly`: ``stuck``, ``spike``, ``drift``,
  ``unresponsive``, ``dossier_surge``, ``incident_burst``) for a matching scope fires while it is
  open, and resolves ``clear_for`` after the detector closes it.

Every error names the rule and the field, e.g. ``rule 'env.aqi_bad', field 'value': must be a number``.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from alerts.model import Audience, Severity
from ioc.errors import ConfigurationError

log = logging.getLogger(__name__)

KINDS = ("threshold", "rate_of_change", "absence", "event", "unacknowledged", "anomaly")
DOMAINS = ("cyber", "env", "water", "dossier", "platform", "anomaly")
#: The detectors of `streams.anomaly` an ``anomaly`` rule can name.
ANOMALY_DETECTORS = ("stuck", "spike", "drift", "unresponsive", "dossier_surge", "incident_burst")
OPERATORS = (">", ">=", "<", "<=")
#: Incident fields (CONTRACT §1) an ``event`` rule can match.
INCIDENT_CATEGORIES = (
    "malware", "phishing", "ddos", "intrusion", "defacement", "data_leak", "brute_force", "vulnerability", "other",
)  # fmt: skip
#: Labels a matcher, ``group_by`` or ``equal`` may name (alert fields first, then rule-specific labels).
LABELS = (
    "rule", "scope", "severity", "domain", "commune_code", "state",
    "kpi", "window", "station", "incident", "category", "system", "agency_code", "detector",
)  # fmt: skip
SCOPE_PATTERN = re.compile(r"^(province|(commune|agency|station):[A-Za-z0-9_.*?\[\]-]+)$")
#: Scopes an anomaly finding may have besides those of KPIs (incident bursts per category or system).
ANOMALY_SCOPE_PATTERN = re.compile(r"^(province|(commune|agency|station|category|system):[A-Za-z0-9_.*?\[\]-]+)$")

_COMMON = {"rule", "scope", "scope_name", "commune", "commune_name", "severity"}
_SNAPSHOT = _COMMON | {"kpi", "window", "value", "unit", "threshold", "target", "station", "station_name",
                       "label_vi", "label_en"}  # fmt: skip
_INCIDENT = _COMMON | {"incident", "category", "system", "system_level", "title", "incident_severity"}
_ANOMALY = _COMMON | {"detector", "station", "station_name", "quantity", "observed", "expected", "expected_low",
                      "expected_high", "window_from", "window_to", "method", "category", "system"}  # fmt: skip
#: Which placeholders a message of each kind may use.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "threshold": frozenset(_SNAPSHOT),
    "rate_of_change": frozenset(_SNAPSHOT | {"increase", "within", "from_value"}),
    "absence": frozenset(_COMMON | {"kpi", "window", "after", "station", "station_name"}),
    "event": frozenset(_INCIDENT),
    # An escalation speaks about an alert of any kind; placeholders its alert lacks render as "?".
    "anomaly": frozenset(_ANOMALY),
    "unacknowledged": frozenset(
        _SNAPSHOT | _INCIDENT | _ANOMALY | {"increase", "within", "from_value", "after", "alert"}
    ),
}


class RuleError(ConfigurationError):
    """A rule file that cannot be used: names the file, the rule and the field at fault."""

    def __init__(self, message: str, *, rule: str | None = None, field: str | None = None, source: str = "") -> None:
        self.rule, self.field, self.source = rule, field, source
        where = []
        if source:
            where.append(source)
        if rule is not None:
            where.append(f"rule {rule!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class Matcher:
    """One label and the glob patterns (any of) its value must match: ``scope: "station:*"``."""

    label: str
    patterns: tuple[str, ...]

    def matches(self, labels: Mapping[str, str | None]) -> bool:
        value = labels.get(self.label)
        if value is None:
            return "" in self.patterns
        return any(fnmatchcase(value, p) for p in self.patterns)


def matchers_from(raw: Any, *, what: str = "matchers") -> tuple[Matcher, ...]:
    """Validate ``{label: pattern | [patterns]}`` into matchers; ValueError names the bad label."""
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{what} must be a non-empty mapping of label → pattern(s)")
    out = []
    for label, value in raw.items():
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r} in {what} (known: {', '.join(LABELS)})")
        patterns = (value,) if isinstance(value, str) else value
        if not isinstance(patterns, (list, tuple)) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{what}[{label!r}] must be a string or a non-empty list of strings")
        out.append(Matcher(label, tuple(patterns)))
    return tuple(sorted(out, key=lambda m: m.label))


def matches_all(matchers: Sequence[Matcher], labels: Mapping[str, str | None]) -> bool:
    return all(m.matches(labels) for m in matchers)


class _Lenient(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


@dataclass(frozen=True)
class Message:
    """The alert text in Vietnamese and English, with ``{placeholders}`` filled from the alert."""

    vi: str
    en: str

    def render(self, fields: Mapping[str, str]) -> tuple[str, str]:
        values = _Lenient(fields)
        return self.vi.format_map(values), self.en.format_map(values)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """What every rule has: identity, severity, who is told, the text, and notification timing."""

    id: str
    kind: str
    domain: str
    severity: Severity
    audience: tuple[Audience, ...]
    message: Message
    description: str = ""
    #: Remind the audience this often while the alert stays unacknowledged; None = never.
    repeat: dt.timedelta | None = None
    #: Notifications of this rule with equal values of these labels within ``group_window`` of the
    #: group's first one are folded into that one (a DDoS burst across twenty systems is one).
    group_by: tuple[str, ...] | None = None
    group_window: dt.timedelta | None = None


@dataclass(frozen=True, kw_only=True)
class SnapshotRule(Rule):
    """A rule over KPI snapshots of one KPI and window, for scopes matching ``scopes`` (globs)."""

    kpi: str
    window: str
    scopes: tuple[str, ...]

    def applies_to(self, kpi: str, window: str, scope: str) -> bool:
        return kpi == self.kpi and window == self.window and any(fnmatchcase(scope, p) for p in self.scopes)


@dataclass(frozen=True, kw_only=True)
class ThresholdRule(SnapshotRule):
    op: str
    #: The threshold; None when the snapshot's own ``target`` is used (``value: target``).
    value: float | None
    target_fallback: float | None = None
    for_: dt.timedelta = dt.timedelta(0)
    #: Hysteresis: the alert resolves only once the value is at or past ``clear`` (absolute), or
    #: ``clear_margin`` away from the threshold on the good side, for ``clear_for``.
    clear: float | None = None
    clear_margin: float = 0.0
    clear_for: dt.timedelta = dt.timedelta(0)
    #: Ignore snapshots whose denominator is smaller (a rate over three dossiers says nothing).
    min_denominator: float | None = None

    @property
    def uses_target(self) -> bool:
        return self.value is None


@dataclass(frozen=True, kw_only=True)
class RateOfChangeRule(SnapshotRule):
    increase: float
    within: dt.timedelta
    clear_for: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True, kw_only=True)
class AbsenceRule(SnapshotRule):
    #: No snapshot for a scope for this long fires (mode 1).
    after: dt.timedelta | None = None
    #: Or (mode 2): each id in ``extra[list]`` of the snapshot is absent, as scope ``<list_scope>:<id>``.
    list_field: str | None = None
    list_scope: str = "station"
    for_: dt.timedelta = dt.timedelta(0)


@dataclass(frozen=True, kw_only=True)
class EventRule(Rule):
    """Security incidents (``ioc.cyber.incidents``) matching all given criteria fire at detection."""

    severities: tuple[str, ...] | None = None
    categories: tuple[str, ...] | None = None
    min_system_level: int | None = None


@dataclass(frozen=True, kw_only=True)
class UnacknowledgedRule(Rule):
    """An alert of rule ``target`` still unacknowledged ``after`` its start is escalated."""

    target: str
    after: dt.timedelta
    #: Added to the alert's audience on escalation (operators always are).
    escalate_to: tuple[Audience, ...]


@dataclass(frozen=True, kw_only=True)
class AnomalyRule(Rule):
    """Findings of the named detectors (all when None) for scopes matching ``scopes`` (globs)."""

    detectors: tuple[str, ...] | None
    scopes: tuple[str, ...]
    for_: dt.timedelta = dt.timedelta(0)
    clear_for: dt.timedelta = dt.timedelta(0)

    def applies_to(self, detector: str, scope: str) -> bool:
        return (self.detectors is None or detector in self.detectors) and any(
            fnmatchcase(scope, p) for p in self.scopes
        )


@dataclass(frozen=True)
class Inhibition:
    """While an active alert matches ``source``, notifications of alerts matching ``target`` (with the
    same values of the ``equal`` labels) are suppressed; the inhibited alerts keep their state."""

    id: str
    source: tuple[Matcher, ...]
    target: tuple[Matcher, ...]
    equal: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    inhibitions: tuple[Inhibition, ...] = ()
    source: str = ""
    by_id: dict[str, Rule] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id.update({r.id: r for r in self.rules})

    def of_kind(self, cls: type[Rule]) -> list[Rule]:
        return [r for r in self.rules if isinstance(r, cls)]
