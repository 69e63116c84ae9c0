"""Security-operations incidents: the `ioc.incident.v1` schema, the merged incident state, and the cyber KPIs.

Severity levels are the product's own (low/medium/high/critical; no official graded scale was
found, DOMAIN.md). An incident's severity is the highest any of its events gave it. Each
lifecycle step keeps its earliest event by (occurred_at, event_id); a false positive is removed
from every count, including counts it already contributed to.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import operator
from typing import Any, Literal

import msgspec

from ioc.contract import INCIDENT_SEVERITIES, SEVERITY_RANK, IncidentSeverity, IncidentStep
from ioc.errors import InvalidEvent
from ioc.registry import Registry
from streams import events
from streams.kpi import Contribution, KpiSpec, count, entity_scopes, mean

SCHEMA = "ioc.incident.v1"
Severity = IncidentSeverity
Category = Literal[
    "malware", "phishing", "ddos", "intrusion", "defacement", "data_leak", "brute_force", "vulnerability", "other"
]


class IncidentEvent(msgspec.Struct, frozen=True, gc=False):
    schema: Literal["ioc.incident.v1"]
    event_id: str
    incident_id: str
    type: IncidentStep
    occurred_at: dt.datetime
    severity: Severity | None = None
    category: Category | None = None
    system: str | None = None
    system_level: int | None = None
    agency_code: str | None = None
    commune_code: str | None = None
    source_ip: str | None = None
    title: str | None = None


_decoder = events.decoder(IncidentEvent)


class Parsed(msgspec.Struct, frozen=True, gc=False):
    event: IncidentEvent
    t: int


def parse(raw: bytes, registry: Registry, produced_us: int | None = None) -> tuple[str, Parsed]:
    """Decode and validate one record; raises `InvalidEvent` with the reason."""
    e = events.decode(_decoder, raw)
    for name in ("event_id", "incident_id"):
        value = getattr(e, name)
        if not value or len(value) > 200:
            raise InvalidEvent("must be 1–200 characters", field=name)
    if e.type == "detected":
        for name in ("severity", "category"):
            if getattr(e, name) is None:
                raise InvalidEvent("required on a detected event", field=name)
    if e.system_level is not None and not 1 <= e.system_level <= 5:
        raise InvalidEvent("must be 1–5 (Decree 85/2016)", field="system_level")
    if e.title is not None and len(e.title) > 500:
        raise InvalidEvent("longer than 500 characters", field="title")
    if e.source_ip is not None:
        try:
            ipaddress.ip_address(e.source_ip)
        except ValueError:
            raise InvalidEvent(f"not an IPv4/IPv6 address: {e.source_ip[:60]!r}", field="source_ip") from None
    events.check_commune(e.commune_code, registry.units)
    return e.incident_id, Parsed(e, events.to_us(e.occurred_at, "occurred_at", produced_us))


class IncidentState(msgspec.Struct, gc=False, array_like=True):
    """What is known of one incident, merged from its events; stored like `DossierState`."""

    incident_id: str
    last_event: int = 0
    severity: str | None = None
    category: str | None = None
    system: str | None = None
    system_level: int | None = None
    agency_code: str | None = None
    commune_code: str | None = None
    title: str | None = None
    #: Rank of the event the descriptive fields came from: (0 for `detected` else 1, time, event_id).
    info_rank: tuple[int, int, str] | None = None
    detected: tuple[int, str] | None = None
    acknowledged: tuple[int, str] | None = None
    contained: tuple[int, str] | None = None
    resolved: tuple[int, str] | None = None
    false_positive: tuple[int, str] | None = None

    def merge(self, p: Parsed) -> bool:
        e, key = p.event, (p.t, p.event.event_id)
        changed = False
        if p.t > self.last_event:
            self.last_event, changed = p.t, True
        if events.earlier(getattr(self, e.type), key):
            setattr(self, e.type, key)
            changed = True
        if e.severity is not None and (
            self.severity is None or SEVERITY_RANK[e.severity] > SEVERITY_RANK[self.severity]
        ):
            self.severity, changed = e.severity, True
        rank = (0 if e.type == "detected" else 1, *key)
        if self.info_rank is None or rank < self.info_rank:
            self.info_rank = rank
            self.category = e.category or self.category
            self.system, self.system_level = e.system or self.system, e.system_level or self.system_level
            self.agency_code, self.commune_code = e.agency_code, e.commune_code
            self.title = e.title or self.title
            changed = True
        return changed

    @property
    def terminal(self) -> bool:
        return self.resolved is not None or self.false_positive is not None

    def scopes(self) -> tuple[str, ...]:
        return entity_scopes(self.commune_code, self.agency_code)

    def kpi_key(self) -> tuple[Any, ...]:
        """Every field `scopes()` and `contributions()` read: equal keys, equal KPI effects."""
        return _kpi_key(self)

    @classmethod
    def from_key(cls, key: tuple[Any, ...]) -> IncidentState:
        """A stand-in with just the KPI fields of ``key``."""
        return cls("", **dict(zip(KPI_FIELDS, key, strict=True)))

    def contributions(self) -> dict[Contribution, int]:
        c: dict[Contribution, int] = {}
        if self.detected is None or self.false_positive is not None:
            return c
        d = self.detected[0]
        c[("detected", d)] = 1
        if self.severity:
            c[(f"detected.{self.severity}", d)] = 1
        # Open from detection until resolution (a level: +1, then −1; contained is still open).
        names = ("open", f"open.{self.severity}") if self.severity else ("open",)
        for name in names:
            c[(name, d)] = 1
        if self.resolved is not None:
            end = max(self.resolved[0], d)
            for name in names:
                c[(name, end)] = c.get((name, end), 0) - 1
        if self.acknowledged is not None:
            a = self.acknowledged[0]
            c[("ack_n", a)] = 1
            c[("ack_us", a)] = max(a - d, 0)
        if self.resolved is not None:
            r = self.resolved[0]
            c[("res_n", r)] = 1
            c[("res_us", r)] = max(r - d, 0)
        return c


US_PER_MINUTE = 60_000_000
KPI_FIELDS = ("commune_code", "agency_code", "severity", "detected", "acknowledged", "resolved", "false_positive")
_kpi_key = operator.attrgetter(*KPI_FIELDS)
SCOPES = ("province", "agency", "commune")

KPIS = (
    KpiSpec(
        "cyber.incidents",
        "incidents",
        ("1h", "24h", "today"),
        SCOPES,
        count("detected"),
        "incidents detected in the window, false positives excluded",
    ),
    *(
        KpiSpec(
            f"cyber.incidents.{sev}",
            "incidents",
            ("1h", "24h", "today"),
            SCOPES,
            count(f"detected.{sev}"),
            f"{sev} incidents detected in the window, false positives excluded",
        )
        for sev in INCIDENT_SEVERITIES
    ),
    KpiSpec(
        "cyber.open", "incidents", ("now",), SCOPES, count("open"), "detected, not resolved and not a false positive"
    ),
    *(
        KpiSpec(f"cyber.open.{sev}", "incidents", ("now",), SCOPES, count(f"open.{sev}"), f"open {sev} incidents")
        for sev in INCIDENT_SEVERITIES
    ),
    KpiSpec(
        "cyber.mtta_minutes",
        "min",
        ("24h", "mtd"),
        ("province", "agency"),
        mean("ack_us", "ack_n", US_PER_MINUTE),
        "mean minutes detected → acknowledged over incidents acknowledged in the window",
    ),
    KpiSpec(
        "cyber.mttr_minutes",
        "min",
        ("24h", "mtd"),
        ("province", "agency"),
        mean("res_us", "res_n", US_PER_MINUTE),
        "mean minutes detected → resolved over incidents resolved in the window",
    ),
)
