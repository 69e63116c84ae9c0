"""Public-service dossiers (hồ sơ TTHC): catalogue, statutory deadlines, seeded lifecycles."""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import heapq
import io
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources

from ioc.registry import Unit
from ioc.settings import TOPIC_DOSSIER
from simulators.envelope import VN_TZ, Event, event_id, iso, lognormal_minutes, poisson_arrivals

logger = logging.getLogger(__name__)

SCHEMA = "ioc.dossier.v1"

# Plan 348's starting point: about 55–70 % of dossiers online, the rest mostly at the counter.
CHANNEL_WEIGHTS = {"online": 0.63, "in_person": 0.34, "postal": 0.03}
#: Share of online dossiers of eligible procedures that run fully online (toàn trình).
FULL_ONLINE_SHARE = 0.62
#: Share of dossiers handled by provincial departments (commune_code null); the rest at UBND xã.
PROVINCIAL_SHARE = 0.2
#: Vinh's wards carry the heaviest counters; other wards next; rural communes least.
VINH_WARDS = frozenset({"16681", "16690", "16702", "16708", "17920"})
# Outcome and lifecycle probabilities in normal operation.
P_CANCELLED = 0.025
P_RETURNED = 0.035
P_SUPPLEMENT = 0.06
P_LATE = 0.05
# Office hours used for deadlines: a deadline falls at the end of a working day.
CLOSE_OF_BUSINESS = dt.time(17, 0)
SAME_DAY_CUTOFF = dt.time(15, 0)
DIURNAL_PEAK = 2.9
#: Granularity of the backfill that makes up for follow-up events a fresh run lacks.
BACKFILL_WINDOW = dt.timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class Agency:
    agency_code: str
    name: str
    level: str  # "province" | "commune"
    commune_code: str | None


@dataclass(frozen=True, slots=True)
class Procedure:
    procedure_code: str
    name: str
    level: str  # "province" | "commune"
    agency_code: str | None  # None: the commune's own UBND
    working_days: int  # 0 = same working day
    has_fee: bool
    full_online_eligible: bool
    weight: float


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Who handles dossiers and which procedures they handle."""

    agencies: Mapping[str, Agency]
    procedures: Sequence[Procedure]
    commune_agency: Mapping[str, str]  # commune code -> its UBND's agency code


def _csv(name: str) -> list[dict[str, str]]:
    text = resources.files("ioc.data").joinpath(name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def commune_agency_code(index: int) -> str:
    """The agency code given to a commune's UBND that is missing from ``agencies.csv``."""
    return f"000.{index % 99 + 1:02d}.{80 + index // 99}.H40"


def load_catalogue(units: Mapping[str, Unit]) -> Catalogue:
    """Agencies and procedures shipped in ``ioc/data``; every unit gets a UBND agency."""
    agencies = {
        row["agency_code"]: Agency(row["agency_code"], row["name"], row["level"], row["commune_code"] or None)
        for row in _csv("agencies.csv")
    }
    commune_agency = {a.commune_code: a.agency_code for a in agencies.values() if a.commune_code}
    for index, code in enumerate(sorted(set(units) - set(commune_agency))):
        agency = Agency(commune_agency_code(index), f"UBND {units[code].name}", "commune", code)
        agencies[agency.agency_code] = agency
        commune_agency[code] = agency.agency_code
    procedures = [
        Procedure(
            procedure_code=row["procedure_code"],
            name=row["name"],
            level=row["level"],
            agency_code=row["agency_code"] or None,
            working_days=int(row["working_days"]),
            has_fee=row["fee"] == "1",
            full_online_eligible=row["full_online_eligible"] == "1",
            weight=float(row["weight"]),
        )
        for row in _csv("procedures.csv")
    ]
    commune_agency = {code: commune_agency[code] for code in units}
    return Catalogue(agencies=agencies, procedures=procedures, commune_agency=commune_agency)


def statutory_deadline(received: dt.datetime, working_days: int) -> dt.datetime:
    """Close of business on the ``working_days``-th working day after receipt (Mon–Fri only).

    Same-day procedures (0 days) are due at close of business on the day of receipt, or of the
    next working day when received after 15:00 or outside a working day (the chứng thực rule).
    """
    local = received.astimezone(VN_TZ)
    day = local.date()
    if working_days == 0:
        if day.weekday() >= 5 or local.time() >= SAME_DAY_CUTOFF:
            day = _next_working_day(day)
    else:
        for _ in range(working_days):
            day = _next_working_day(day)
    return dt.datetime.combine(day, CLOSE_OF_BUSINESS, VN_TZ)


def _next_working_day(day: dt.date) -> dt.date:
    day += dt.timedelta(days=1)
    while day.weekday() >= 5:
        day += dt.timedelta(days=1)
    return day


@dataclass(frozen=True, slots=True)
class DossierConditions:
    """How a scenario bends dossier traffic at one moment (1.0 = normal)."""

    rate_factor: float = 1.0
    late_factor: float = 1.0
    supplement_factor: float = 1.0
    #: Multiplies the time officials take, so a surge builds a backlog.
    slowdown: float = 1.0


NORMAL = DossierConditions()
_CHANNELS = tuple(CHANNEL_WEIGHTS)
_CHANNEL_CUM = tuple(itertools.accumulate(CHANNEL_WEIGHTS.values()))

#: Expected events per dossier in normal operation (received, processing, supplement, outcome).
EVENTS_PER_DOSSIER = 1.0 + (1.0 - P_CANCELLED * 0.4) + P_SUPPLEMENT + 1.0


def diurnal_weight(moment: dt.datetime) -> float:
    """Relative dossier intake by local hour and weekday, averaging 1.0 over a week (±1 %)."""
    local = moment.astimezone(VN_TZ)
    hour = local.hour + local.minute / 60
    weekday = local.weekday()
    morning = 7.0 <= hour < 11.5
    if weekday == 6:
        return 0.31
    if weekday == 5:  # some one-stop counters open on Saturday mornings
        return 1.1 if morning else 0.31
    return DIURNAL_PEAK if morning or 13.5 <= hour < 17.0 else 0.43


class _Lifecycle:
    """One dossier's fixed fields and its remaining scheduled steps (oldest first)."""

    __slots__ = ("agency_code", "commune_code", "dossier_id", "procedure_code", "steps")

    def __init__(
        self,
        dossier_id: str,
        agency_code: str,
        commune_code: str | None,
        procedure_code: str,
        steps: list[tuple[dt.datetime, dict[str, object]]],
    ) -> None:
        self.dossier_id = dossier_id
        self.agency_code = agency_code
        self.commune_code = commune_code
        self.procedure_code = procedure_code
        self.steps = steps


def mean_events_within(
    catalogue: Catalogue,
    units: Mapping[str, Unit],
    horizon: dt.timedelta,
    start: dt.datetime,
    samples: int = 3000,
) -> float:
    """Mean events per dossier that fall within ``horizon`` of its receipt (a fixed-seed sample)."""
    sim = DossierSimulator(random.Random(0), catalogue, units, dossiers_per_s=1.0)
    total = 0
    for _ in range(samples):
        received = start + dt.timedelta(seconds=sim.rng.uniform(0, 7 * 86400))
        life = sim._new_dossier(received, None)
        total += sum(1 for at, _ in life.steps if at - received <= horizon)
    return total / samples


class DossierSimulator:
    """Seeded dossier traffic: Poisson intake weighted by commune, lifecycles scheduled ahead.

    Pure: no clock, no I/O. ``events()`` yields contract events in event-time order, forever,
    or until ``until`` when given (steps after it are never scheduled, which bounds memory).
    """

    def __init__(
        self,
        rng: random.Random,
        catalogue: Catalogue,
        units: Mapping[str, Unit],
        *,
        dossiers_per_s: float,
        conditions: Callable[[dt.datetime], DossierConditions] = lambda _t: NORMAL,
        peak_rate_factor: float = 1.0,
        diurnal: bool = False,
        backfill: bool = False,
    ) -> None:
        self.rng = rng
        self.backfill = backfill
        self.catalogue = catalogue
        self.dossiers_per_s = dossiers_per_s
        self.conditions = conditions
        self.peak_rate_factor = max(1.0, peak_rate_factor)
        self.diurnal = diurnal
        self._units = units
        self._communes = sorted(units)
        self._commune_weights = list(
            itertools.accumulate(
                (6.0 if c in VINH_WARDS else 3.0 if units[c].kind == "phuong" else 1.0) * rng.uniform(0.6, 1.4)
                for c in self._communes
            )
        )
        by_level: dict[str, list[Procedure]] = {"commune": [], "province": []}
        for p in catalogue.procedures:
            by_level[p.level].append(p)
        self._procedures = by_level
        self._procedure_weights = {
            level: list(itertools.accumulate(p.weight for p in ps)) for level, ps in by_level.items()
        }
        self._serials: dict[tuple[str, dt.date], int] = {}

    def events(
        self, start: dt.datetime, until: dt.datetime | None = None, *, follow_up: bool = False
    ) -> Iterator[Event]:
        """Contract events in event-time order.

        Dossiers are received until ``until``; their later steps are dropped, or with ``follow_up``
        go on past it (a back-fill's open dossiers, continued live: `simulators.backfill`).

        With ``backfill``, extra intake makes up for follow-up events (processing, completion)
        that a run started from nothing lacks: in each window the steps already scheduled into it
        are counted and the shortfall against the steady state is added as new dossiers. The event
        rate thus holds from the first minute instead of climbing for weeks.
        """
        window_s = BACKFILL_WINDOW.total_seconds()
        steady_followups = 0.0
        quick = 1.0
        if self.backfill:
            steady = mean_events_within(self.catalogue, self._units, dt.timedelta(days=400), start)
            quick = mean_events_within(self.catalogue, self._units, BACKFILL_WINDOW / 2, start)
            steady_followups = self.dossiers_per_s * (steady - 1.0) * window_s
        scheduled: dict[int, int] = {}
        backfill_rate = (0, 0.0)  # (window index, extra dossiers per second)
        peak = self.dossiers_per_s * self.peak_rate_factor * (DIURNAL_PEAK if self.diurnal else 1.0)
        peak += steady_followups / window_s / quick

        def window(t: dt.datetime) -> int:
            return int((t - start).total_seconds() // window_s)

        def rate_at(t: dt.datetime) -> float:
            nonlocal backfill_rate
            shape = diurnal_weight(t) if self.diurnal else 1.0
            rate = self.dossiers_per_s * self.conditions(t).rate_factor * shape
            if self.backfill:
                k = window(t)
                if backfill_rate[0] != k or (k == 0 and backfill_rate[1] == 0.0):
                    for old in [w for w in scheduled if w < k]:
                        del scheduled[old]
                    shortfall = max(0.0, steady_followups - scheduled.get(k, 0))
                    backfill_rate = (k, shortfall / window_s / quick)
                rate += backfill_rate[1]
            return rate

        arrivals = poisson_arrivals(self.rng, start, peak, rate_at, ends=until)
        next_arrival = next(arrivals, None)
        pending: list[tuple[dt.datetime, int, _Lifecycle]] = []
        tiebreak = itertools.count()
        while True:
            if next_arrival is not None and (not pending or next_arrival <= pending[0][0]):
                if until is not None and next_arrival > until:
                    next_arrival = None
                    continue
                life = self._new_dossier(next_arrival, None if follow_up else until)
                heapq.heappush(pending, (life.steps[0][0], next(tiebreak), life))
                if self.backfill:
                    for at, _ in life.steps[1:]:
                        scheduled[window(at)] = scheduled.get(window(at), 0) + 1
                next_arrival = next(arrivals, None)
                continue
            if not pending:
                return
            at, _, life = heapq.heappop(pending)
            _, fields = life.steps.pop(0)
            yield self._event(life, at, fields)
            if life.steps:
                heapq.heappush(pending, (life.steps[0][0], next(tiebreak), life))

    def _event(self, life: _Lifecycle, at: dt.datetime, fields: dict[str, object]) -> Event:
        value: dict[str, object] = {
            "schema": SCHEMA,
            "event_id": event_id(self.rng),
            "dossier_id": life.dossier_id,
            "type": fields["type"],
            "occurred_at": iso(at),
            "commune_code": life.commune_code,
            "agency_code": life.agency_code,
            "procedure_code": life.procedure_code,
        }
        value.update((k, v) for k, v in fields.items() if k != "type")
        return Event(TOPIC_DOSSIER, life.dossier_id, at, value)

    def _pick(self, cumulative: list[float]) -> int:
        """Index drawn in proportion to the weights whose running sums are ``cumulative``."""
        return min(len(cumulative) - 1, bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1]))

    def _new_dossier(self, received: dt.datetime, until: dt.datetime | None) -> _Lifecycle:
        rng = self.rng
        cond = self.conditions(received)
        level = "province" if rng.random() < PROVINCIAL_SHARE else "commune"
        if not self._procedures[level]:
            level = "commune" if level == "province" else "province"
        procedures = self._procedures[level]
        proc = procedures[self._pick(self._procedure_weights[level])]
        if level == "commune":
            commune_code = self._communes[self._pick(self._commune_weights)]
            commune: str | None = commune_code
            agency = self.catalogue.commune_agency[commune_code]
        else:
            commune = None
            agency = proc.agency_code or "000.00.15.H40"
        local_day = received.astimezone(VN_TZ).date()
        serial = self._serials.get((agency, local_day), 0) + 1
        self._serials[(agency, local_day)] = serial
        if len(self._serials) > 50_000:  # keep only today's counters
            self._serials = {k: v for k, v in self._serials.items() if k[1] >= local_day}
        dossier_id = f"{agency}-{local_day:%y%m%d}-{serial:04d}"

        channel = rng.choices(_CHANNELS, cum_weights=_CHANNEL_CUM, k=1)[0]  # cum_weights: one rng draw
        full_online = channel == "online" and proc.full_online_eligible and rng.random() < FULL_ONLINE_SHARE
        due = statutory_deadline(received, proc.working_days)
        steps: list[tuple[dt.datetime, dict[str, object]]] = [
            (
                received,
                {
                    "type": "received",
                    "channel": channel,
                    "full_online": full_online,
                    "due_at": iso(due),
                },
            ),
        ]
        # The counter takes in-person dossiers into processing at once; online ones wait in a queue.
        pickup = lognormal_minutes(rng, 40.0 if channel != "in_person" else 4.0, 0.9) * cond.slowdown
        t = received + max(pickup, dt.timedelta(seconds=5))
        outcome = rng.random()
        if outcome < P_CANCELLED * 0.4:  # withdrawn before anyone opened it
            steps.append((t, {"type": "cancelled"}))
            return self._lifecycle(dossier_id, agency, commune, proc, steps, until)
        steps.append((t, {"type": "processing"}))
        span = max(due - t, dt.timedelta(minutes=20))
        if rng.random() < P_SUPPLEMENT * cond.supplement_factor:
            t += span * rng.uniform(0.05, 0.4)
            steps.append((t, {"type": "supplement_requested"}))
            t += lognormal_minutes(rng, 60 * 24, 0.8)  # the citizen brings what was missing
            span = max(due - t, dt.timedelta(minutes=20))
        if outcome < P_CANCELLED:
            steps.append((t + span * rng.uniform(0.1, 0.6), {"type": "cancelled"}))
        elif outcome < P_CANCELLED + P_RETURNED:
            steps.append((t + span * rng.uniform(0.2, 0.9), {"type": "returned"}))
        else:
            if rng.random() < min(0.9, P_LATE * cond.late_factor):
                done = max(t, due) + dt.timedelta(hours=rng.uniform(0.5, 72.0))
            else:
                done = t + min(self._effort(proc) * cond.slowdown, span * 0.98)
            steps.append(
                (
                    max(done, t + dt.timedelta(seconds=30)),
                    self._completion(proc, channel, full_online),
                )
            )
        return self._lifecycle(dossier_id, agency, commune, proc, steps, until)

    def _effort(self, proc: Procedure) -> dt.timedelta:
        """Time officials spend: minutes at the counter, about a third of the term otherwise."""
        if proc.working_days == 0:
            return lognormal_minutes(self.rng, 15.0, 0.8)
        return lognormal_minutes(self.rng, proc.working_days * 0.35 * 24 * 60, 0.6)

    def _completion(self, proc: Procedure, channel: str, full_online: bool) -> dict[str, object]:
        rng = self.rng
        online = channel == "online"
        paid_online = (rng.random() < (0.8 if online else 0.2)) if proc.has_fee else None
        digitized = rng.random() < (0.95 if online else 0.45)
        result_digital = rng.random() < (0.9 if full_online else 0.55 if online else 0.3)
        return {
            "type": "completed",
            "paid_online": paid_online,
            "digitized": digitized,
            "result_digital": result_digital,
        }

    @staticmethod
    def _lifecycle(
        dossier_id: str,
        agency: str,
        commune: str | None,
        proc: Procedure,
        steps: list[tuple[dt.datetime, dict[str, object]]],
        until: dt.datetime | None,
    ) -> _Lifecycle:
        steps.sort(key=lambda s: s[0])
        if until is not None:
            steps = [s for s in steps if s[0] <= until] or steps[:1]
        return _Lifecycle(dossier_id, agency, commune, proc.procedure_code, steps)
