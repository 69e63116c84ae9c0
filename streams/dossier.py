"""Public-service dossiers (hồ sơ TTHC): the `ioc.dossier.v1` schema, the merged dossier state, and its KPIs.

A dossier's state is a merge of its events that does not depend on their order or repetition:
for each fact the earliest event by (occurred_at, event_id) wins. The KPIs count what the state
contributes (received at, completed at, due at...), so a duplicate changes nothing and a late
or out-of-order event moves exactly the counters it should (docs/design.md).
"""

from __future__ import annotations

import datetime as dt
import operator
from typing import Any, Literal

import msgspec

from ioc.errors import InvalidEvent
from ioc.registry import Registry
from streams import events
from streams.kpi import Contribution, KpiSpec, Reader, Value, count, entity_scopes, mean, percent, ratio

SCHEMA = "ioc.dossier.v1"
EventType = Literal["received", "processing", "supplement_requested", "completed", "returned", "cancelled"]
TERMINAL = frozenset({"completed", "returned", "cancelled"})


class DossierEvent(msgspec.Struct, frozen=True, gc=False):
    schema: Literal["ioc.dossier.v1"]
    event_id: str
    dossier_id: str
    type: EventType
    occurred_at: dt.datetime
    agency_code: str
    commune_code: str | None = None
    procedure_code: str | None = None
    channel: Literal["online", "in_person", "postal"] | None = None
    full_online: bool | None = None
    due_at: dt.datetime | None = None
    paid_online: bool | None = None
    digitized: bool | None = None
    result_digital: bool | None = None


_decoder = events.decoder(DossierEvent)


class Parsed(msgspec.Struct, frozen=True, gc=False):
    """A validated event with its times as integer microseconds."""

    event: DossierEvent
    t: int
    due: int | None


def parse(raw: bytes, registry: Registry, produced_us: int | None = None) -> tuple[str, Parsed]:
    """Decode and validate one record; raises `InvalidEvent` with the reason."""
    e = events.decode(_decoder, raw)
    if not e.event_id or len(e.event_id) > 200:
        raise InvalidEvent("event_id must be 1–200 characters", field="event_id")
    if not e.dossier_id or len(e.dossier_id) > 200:
        raise InvalidEvent("dossier_id must be 1–200 characters", field="dossier_id")
    if not e.agency_code or len(e.agency_code) > 100:
        raise InvalidEvent("agency_code must be 1–100 characters", field="agency_code")
    events.check_commune(e.commune_code, registry.units)
    t = events.to_us(e.occurred_at, "occurred_at", produced_us)
    due = None
    if e.type == "received":
        for name in ("channel", "full_online", "due_at"):
            if getattr(e, name) is None:
                raise InvalidEvent("required on a received event", field=name)
        assert e.due_at is not None
        due = events.to_us(e.due_at, "due_at")
        if due < t:
            raise InvalidEvent("due_at is before occurred_at", field="due_at")
        if e.channel != "online" and e.full_online:
            raise InvalidEvent("full_online requires channel online", field="full_online")
    return e.dossier_id, Parsed(e, t, due)


class DossierState(msgspec.Struct, gc=False, array_like=True):
    """What is known of one dossier, merged from its events (see the module docstring).

    Stored as a JSON array in field order (`streams.sink`): about half the bytes of an object, and
    bytes are what the database pays for per dossier. Holds no cycles, so the garbage collector
    does not track it (the worker holds hundreds of thousands of these).
    """

    dossier_id: str
    last_event: int = 0
    commune_code: str | None = None
    agency_code: str | None = None
    procedure_code: str | None = None
    #: Rank of the event the scope fields came from: (0 for `received` else 1, occurred_at µs, event_id).
    scope_rank: tuple[int, int, str] | None = None
    received: tuple[int, str] | None = None
    channel: str | None = None
    full_online: bool | None = None
    due: int | None = None
    outcome: str | None = None
    outcome_src: tuple[int, str] | None = None
    paid_online: bool | None = None
    digitized: bool | None = None
    result_digital: bool | None = None

    def merge(self, p: Parsed) -> bool:
        """Fold one event in; True when the state changed."""
        e, key = p.event, (p.t, p.event.event_id)
        changed = False
        if p.t > self.last_event:
            self.last_event = p.t
            changed = True
        is_received = e.type == "received"
        if is_received and events.earlier(self.received, key):
            self.received = key
            self.channel, self.full_online, self.due = e.channel, e.full_online, p.due
            changed = True
        rank = (0 if is_received else 1, *key)
        if self.scope_rank is None or rank < self.scope_rank:
            self.scope_rank = rank
            self.commune_code, self.agency_code, self.procedure_code = e.commune_code, e.agency_code, e.procedure_code
            changed = True
        if e.type in TERMINAL and events.earlier(self.outcome_src, key):
            self.outcome, self.outcome_src = e.type, key
            self.paid_online, self.digitized, self.result_digital = e.paid_online, e.digitized, e.result_digital
            changed = True
        return changed

    @property
    def terminal(self) -> bool:
        return self.outcome is not None

    def scopes(self) -> tuple[str, ...]:
        return entity_scopes(self.commune_code, self.agency_code)

    def kpi_key(self) -> tuple[Any, ...]:
        """Every field `scopes()` and `contributions()` read: equal keys, equal KPI effects."""
        return _kpi_key(self)

    @classmethod
    def from_key(cls, key: tuple[Any, ...]) -> DossierState:
        """A stand-in with just the KPI fields of ``key`` (to compute what a past state contributed)."""
        return cls("", **dict(zip(KPI_FIELDS, key, strict=True)))

    def contributions(self) -> dict[Contribution, int]:
        c: dict[Contribution, int] = {}
        r = self.received[0] if self.received else None
        if r is not None:
            c[("recv", r)] = 1
            if self.channel == "online":
                c[("recv_online", r)] = 1
            if self.full_online:
                c[("recv_full_online", r)] = 1
        if self.outcome == "completed" and self.outcome_src is not None:
            done = self.outcome_src[0]
            c[("comp", done)] = 1
            if self.due is not None:
                c[("comp_due", done)] = 1
                if done <= self.due:
                    c[("comp_ontime", done)] = 1
            if self.paid_online is not None:
                c[("comp_fee", done)] = 1
                if self.paid_online:
                    c[("comp_paid_online", done)] = 1
            if self.digitized:
                c[("comp_digitized", done)] = 1
            if self.result_digital:
                c[("comp_result_digital", done)] = 1
            if r is not None:
                c[("comp_timed", done)] = 1
                c[("comp_us", done)] = max(done - r, 0)
        if r is not None:
            # States as +1/−1 over time (levels, see streams.windows): in progress from receipt to
            # the outcome; overdue from the minute after due_at (completion at due_at is on time)
            # until the outcome.
            end = max(self.outcome_src[0], r) if self.outcome_src is not None else None
            c[("in_progress", r)] = 1
            if end is not None:
                c[("in_progress", end)] = c.get(("in_progress", end), 0) - 1
            if self.due is not None:
                overdue_from = max(r, (self.due // US_PER_MIN + 1) * US_PER_MIN)
                if end is None or end // US_PER_MIN > overdue_from // US_PER_MIN:
                    c[("overdue", overdue_from)] = 1
                    if end is not None:
                        c[("overdue", end)] = c.get(("overdue", end), 0) - 1
        return c


US_PER_HOUR = 3_600_000_000
US_PER_MIN = 60_000_000
KPI_FIELDS = (
    "commune_code", "agency_code", "received", "channel", "full_online", "due",
    "outcome", "outcome_src", "paid_online", "digitized", "result_digital",
)  # fmt: skip
_kpi_key = operator.attrgetter(*KPI_FIELDS)


def _progress_index(r: Reader, scope: str, window: str) -> Value:
    """Decision 766: (completed on time in window + in progress not overdue) ÷ (completed in window + in progress).

    Completed dossiers count where their due_at is known (as for `on_time_rate`); every dossier in
    progress has one, since `received` requires it.
    """
    in_progress = r("in_progress", scope, "now")
    overdue = r("overdue", scope, "now")
    num = r("comp_ontime", scope, window) + in_progress - overdue
    den = r("comp_due", scope, window) + in_progress
    return ratio(num, den, 100)


WINDOWED = ("1h", "24h", "today", "mtd")
SCOPES = ("province", "commune", "agency")

KPIS = (
    KpiSpec(
        "dossier.received", "dossiers", WINDOWED, SCOPES, count("recv"), "dossiers with a received event in the window"
    ),
    KpiSpec(
        "dossier.completed",
        "dossiers",
        WINDOWED,
        SCOPES,
        count("comp"),
        "dossiers with a completed event in the window (returned/cancelled are not completed)",
    ),
    KpiSpec(
        "dossier.on_time_rate",
        "%",
        WINDOWED,
        SCOPES,
        percent("comp_ontime", "comp_due"),
        "% of dossiers completed in the window with completion time ≤ due_at (over those whose due_at is known)",
    ),
    KpiSpec(
        "dossier.progress_index", "%", ("today", "mtd"), SCOPES, _progress_index, "Decision 766 progress indicator"
    ),
    KpiSpec(
        "dossier.in_progress",
        "dossiers",
        ("now",),
        SCOPES,
        count("in_progress"),
        "received, not completed/returned/cancelled",
    ),
    KpiSpec(
        "dossier.overdue",
        "dossiers",
        ("now",),
        SCOPES,
        count("overdue"),
        "in progress with due_at before as_of (minute resolution)",
    ),
    KpiSpec(
        "dossier.online_rate",
        "%",
        ("24h", "today", "mtd"),
        SCOPES,
        percent("recv_online", "recv"),
        "% of dossiers received in the window with channel online (Plan 348 #51)",
    ),
    KpiSpec(
        "dossier.full_online_rate",
        "%",
        ("24h", "today", "mtd"),
        SCOPES,
        percent("recv_full_online", "recv"),
        "% of dossiers received in the window submitted full-online (Plan 348 #50)",
    ),
    KpiSpec(
        "dossier.online_payment_rate",
        "%",
        ("today", "mtd"),
        SCOPES,
        percent("comp_paid_online", "comp_fee"),
        "% of completed dossiers with a fee that were paid online (Plan 348 #46)",
    ),
    KpiSpec(
        "dossier.digitized_rate",
        "%",
        ("today", "mtd"),
        SCOPES,
        percent("comp_digitized", "comp"),
        "% of completed dossiers digitised (Plan 348 #43)",
    ),
    KpiSpec(
        "dossier.digital_result_rate",
        "%",
        ("today", "mtd"),
        SCOPES,
        percent("comp_result_digital", "comp"),
        "% of completed dossiers with an electronic result (Plan 348 #44)",
    ),
    KpiSpec(
        "dossier.avg_processing_hours",
        "h",
        ("24h", "today", "mtd"),
        SCOPES,
        mean("comp_us", "comp_timed", US_PER_HOUR),
        "mean hours from received to completed over dossiers completed in the window",
    ),
)
