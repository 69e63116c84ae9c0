"""The alert engine's state, shared by its parts: alerts and their records, condition series, silences, timers.

`EngineState` holds what `alerts.conditions`, `alerts.lifecycle` and `alerts.notify` read and change;
`alerts.engine.AlertEngine` puts the parts together. The parts call one another through the methods
declared here (each says which part defines it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from alerts.model import Alert, AlertEvent
from alerts.rules import (
    AnomalyRule,
    EventRule,
    Matcher,
    Rule,
    RuleSet,
    SnapshotRule,
    UnacknowledgedRule,
    matchers_from,
    matches_all,
)
from alerts.timers import TimerWheel
from ioc.contract import TZ
from ioc.errors import IocError

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class AlertEngineError(IocError):
    """An alert action that cannot be carried out (raised as one of its subclasses).

    AlertEngineError
     ├── UnknownAlert     no active alert has this id (never existed, or already resolved)
     └── SilenceError     a silence with bad matchers, times, author or reason
    """


class UnknownAlert(AlertEngineError, LookupError):
    """No active alert has this id."""


class SilenceError(AlertEngineError, ValueError):
    """A silence that cannot be created as given."""


def alert_id_for(fp: str, started_at: dt.datetime) -> str:
    """Deterministic alert id: the fingerprint and the start instant (µs) hashed, 16 hex digits."""
    us = (started_at - EPOCH) // dt.timedelta(microseconds=1)
    return hashlib.sha256(f"{fp}|{us}".encode()).hexdigest()[:16]




def silence_id(
    matchers: Mapping[str, str | Sequence[str]], starts: dt.datetime, ends: dt.datetime, by: str, reason: str
) -> str:
    """The id of a silence, derived from its content: the same matchers (a pattern or a list of one is
    the same), validity, author and reason give the same id wherever it is computed (the engine, the
    API). Raises ValueError for matchers `matchers_from` refuses."""
    canonical = {m.label: m.patterns for m in matchers_from(dict(matchers))}
    digest = json.dumps([canonical, us_of(starts), us_of(ends), by, reason], sort_keys=True, ensure_ascii=False)
    return "sil-" + hashlib.sha256(digest.encode()).hexdigest()[:12]


def from_us(us: int) -> dt.datetime:
    return (EPOCH + dt.timedelta(microseconds=us)).astimezone(TZ)


def aware(t: dt.datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"times must carry an offset (got naive {t.isoformat()})")


def us_of(t: dt.datetime) -> int:
    return (t - EPOCH) // dt.timedelta(microseconds=1)


class Silence(msgspec.Struct, frozen=True, kw_only=True):
    """Mutes notifications of matching alerts from ``starts_at`` to ``ends_at``; who and why are kept."""

    id: str
    matchers: dict[str, tuple[str, ...]]
    starts_at: dt.datetime
    ends_at: dt.datetime
    created_by: str
    reason: str
    expired_by: str | None = None
    expired_at: dt.datetime | None = None

    @property
    def _matchers(self) -> tuple[Matcher, ...]:
        return tuple(Matcher(k, v) for k, v in sorted(self.matchers.items()))

    def matches(self, labels: Mapping[str, str | None]) -> bool:
        return matches_all(self._matchers, labels)


@dataclass(frozen=True)
class Observation:
    """What a rule saw: the scope and the values its message, labels and audit trail are made from."""

    scope: str
    commune_code: str | None
    fields: dict[str, str]
    labels: dict[str, str]
    triggered_by: tuple[str, ...]
    value: float | None = None
    #: An anomaly finding's evidence (expected range, observed value, evidence window, method).
    explanation: dict[str, Any] | None = None


@dataclass
class Series:
    """A rule's condition for one scope (or listed id): pending, firing, clearing."""

    rule: Rule
    key: str
    fp: str
    origin: str = ""  # the snapshot scope that lists this id (absence `list` rules)
    obs: Observation | None = None
    pending_since: dt.datetime | None = None
    clear_since: dt.datetime | None = None
    #: Resolved by hand while the condition held: no new alert until it has cleared once.
    latched: bool = False
    history: list[tuple[dt.datetime, float]] = field(default_factory=list)


@dataclass
class Record:
    """One active alert and what the engine needs beyond `Alert` to run its lifecycle."""

    alert: Alert
    rule: Rule
    key: str
    fields: dict[str, str]
    labels: dict[str, str]
    value: float | None
    silenced_by: str | None = None
    inhibited_by: str | None = None
    notified: bool = False
    escalated: bool = False
    repeats: int = 0


class EngineState:
    """What the engine knows: its rules, the active alerts, condition series, silences, timers and its clock."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        station_communes: Mapping[str, str] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        #: station id → commune code (a station alert belongs to its commune).
        self.station_communes = dict(station_communes or {})
        #: scope → display name (``commune:16681`` → ``Phường Thành Vinh``), for messages.
        self.names = dict(names or {})
        self.rules = rules
        self._alerts: dict[str, Record] = {}  # fingerprint → active alert
        self._ids: dict[str, str] = {}  # alert id → fingerprint
        self._series: dict[str, Series] = {}
        self._silences: dict[str, Silence] = {}
        self._active_silences: dict[str, Silence] = {}
        self._groups: dict[str, tuple[str, dt.datetime]] = {}  # group key → (group id, open until)
        self._timers = TimerWheel()
        self._clock: dt.datetime | None = None
        self._seen: dict[str, dt.datetime] = {}  # snapshot key → latest as_of
        self._latched_incidents: set[tuple[str, str]] = set()
        self._out: list[AlertEvent] = []
        self._index()

    def _index(self) -> None:
        self._by_kpi: dict[tuple[str, str], list[SnapshotRule]] = {}
        self._event_rules: list[EventRule] = []
        self._escalations: dict[str, list[UnacknowledgedRule]] = {}
        self._anomaly_rules: list[AnomalyRule] = []
        for rule in self.rules.rules:
            if isinstance(rule, SnapshotRule):
                self._by_kpi.setdefault((rule.kpi, rule.window), []).append(rule)
            elif isinstance(rule, EventRule):
                self._event_rules.append(rule)
            elif isinstance(rule, UnacknowledgedRule):
                self._escalations.setdefault(rule.target, []).append(rule)
            elif isinstance(rule, AnomalyRule):
                self._anomaly_rules.append(rule)

    # -- between the parts: each is defined by the part named ----------------------------------

    def _fire(self, rule: Rule, fp: str, key: str, at: dt.datetime, obs: Observation) -> None:
        """Open an alert (`alerts.lifecycle`)."""
        raise NotImplementedError

    def _acknowledge(self, rec: Record, at: dt.datetime, by: str, reason: str | None) -> None:
        """Record an acknowledgement (`alerts.lifecycle`)."""
        raise NotImplementedError

    def _resolve(self, rec: Record, at: dt.datetime, by: str, reason: str | None) -> None:
        """Resolve an alert (`alerts.lifecycle`)."""
        raise NotImplementedError

    def _emit(self, rec: Record, event: AlertEvent, *, opening: bool = False) -> None:
        """Decide whether an event notifies, then record and output it (`alerts.notify`)."""
        raise NotImplementedError

    def _labels(self, rec: Record) -> dict[str, str | None]:
        """The labels silences, inhibitions and groups match on (`alerts.notify`)."""
        raise NotImplementedError

    def _inhibitor(self, rec: Record) -> Record | None:
        """The active alert that inhibits this one, if any (`alerts.notify`)."""
        raise NotImplementedError

    def _advance(self, until: dt.datetime, *, inclusive: bool = True) -> None:
        """Run the timers due by ``until``, in time order (`alerts.engine`)."""
        raise NotImplementedError
