"""The report's content, computed from an `Engine` holding the period's states (see `reports.source`).

Dossier indicators are the catalogue's own `KpiSpec`s evaluated over the period's calendar months,
so a month's figure is the KPI's month-to-date value at the month's last instant. The Decision 766
groups, the cyber and the environment sections are computed here from the same states and counters.
Every function is pure: the same engine and period give the same document.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from ioc.contract import INCIDENT_SEVERITIES, US
from ioc.registry import Registry
from reports.period import Period
from streams import aqi, cyber, dossier
from streams.cyber import IncidentState
from streams.dossier import DossierState
from streams.engine import Engine
from streams.kpi import Counters, KpiSpec, Reader, status_of
from streams.sensor import US_PER_HOUR, StationState, alarm_level
from streams.windows import TZ, UTC_OFFSET_S

SCHEMA = "ioc.report.v1"

#: Circular 20/2017/TT-BTTTT as DOMAIN.md reads it: an incident is reported within 5 days.
REPORTING_DEADLINE_US = 5 * 86400 * US
#: A water level holds until the next reading, but no longer than this many of the gauge's intervals.
LEVEL_HOLD_INTERVALS = 3

#: Names of the dossier indicators (Vietnamese, English), in the order a report lists them.
INDICATOR_NAMES: dict[str, tuple[str, str]] = {
    "dossier.received": ("Hồ sơ tiếp nhận", "Dossiers received"),
    "dossier.completed": ("Hồ sơ đã giải quyết", "Dossiers completed"),
    "dossier.on_time_rate": ("Tỷ lệ giải quyết đúng hạn", "Completed on time"),
    "dossier.progress_index": ("Chỉ số tiến độ giải quyết (QĐ 766)", "Handling progress index (Decision 766)"),
    "dossier.in_progress": ("Hồ sơ đang giải quyết (cuối kỳ)", "In progress at period end"),
    "dossier.overdue": ("Hồ sơ quá hạn (cuối kỳ)", "Overdue at period end"),
    "dossier.online_rate": ("Tỷ lệ hồ sơ trực tuyến", "Received online"),
    "dossier.full_online_rate": ("Tỷ lệ hồ sơ trực tuyến toàn trình", "Received full-online"),
    "dossier.online_payment_rate": ("Tỷ lệ thanh toán trực tuyến", "Fees paid online"),
    "dossier.digitized_rate": ("Tỷ lệ hồ sơ được số hóa", "Dossiers digitised"),
    "dossier.digital_result_rate": ("Tỷ lệ cấp kết quả điện tử", "Electronic results issued"),
    "dossier.avg_processing_hours": ("Thời gian giải quyết bình quân", "Mean handling time"),
}


class PeriodReader(Reader):
    """Counters read over a period's calendar months (``mtd`` = the sum of its months): for a single
    month exactly what `Reader` gives for ``mtd`` at the month's last instant."""

    __slots__ = ("month_indexes",)

    def __init__(self, counters: Counters, period: Period) -> None:
        super().__init__(counters, period.as_of_us)
        self.month_indexes = period.month_indexes()

    def __call__(self, name: str, scope: str, window: str) -> int:
        if window != "mtd":
            return super().__call__(name, scope, window)
        series = self.counters.series.get((name, scope))
        if series is None:
            return 0
        return sum(series.months.get(m, 0) for m in self.month_indexes)


def indicator_window(spec: KpiSpec) -> str:
    """The period's window of a catalogue KPI: ``mtd`` (over the period), else its state at the end."""
    return "mtd" if "mtd" in spec.windows else "now"


@dataclass(frozen=True)
class Figures:
    """Everything of one period read from the engine at the period's end, for every scope."""

    period: Period
    reader: PeriodReader
    incident_reader: PeriodReader
    dossiers: Mapping[str, DossierState]
    incidents: Mapping[str, IncidentState]


def read(engine: Engine, period: Period) -> Figures:
    """Move the engine's clock to the end of ``period`` and read it (call for an earlier period first)."""
    engine.advance(period.as_of_us)
    return Figures(
        period,
        PeriodReader(engine.dossiers.counters, period),
        PeriodReader(engine.incidents.counters, period),
        engine.dossiers.states,  # type: ignore[arg-type]
        engine.incidents.states,  # type: ignore[arg-type]
    )


def indicator_values(f: Figures, scope: str) -> dict[str, tuple[float | None, float | None, float | None]]:
    return {
        spec.name: spec.compute(f.reader, scope, indicator_window(spec))[:3]
        for spec in dossier.KPIS
        if spec.name in INDICATOR_NAMES
    }


@cache
def _eligible_procedures() -> frozenset[str]:
    text = resources.files("ioc.data").joinpath("procedures.csv").read_text(encoding="utf-8")
    return frozenset(r["procedure_code"] for r in csv.DictReader(io.StringIO(text)) if r["full_online_eligible"] == "1")


@cache
def _agencies() -> list[dict[str, str]]:
    text = resources.files("ioc.data").joinpath("agencies.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def agency_names() -> dict[str, str]:
    return {r["agency_code"]: r["name"] for r in _agencies()}


def commune_agencies() -> frozenset[str]:
    """Agency codes of the communes' own UBND (ranked as communes, so left out of the agency ranking)."""
    return frozenset(r["agency_code"] for r in _agencies() if r["level"] == "commune")


def full_online_of_eligible(f: Figures) -> dict[str, tuple[int, int]]:
    """Per scope: (received full-online, received) over dossiers of procedures eligible for full-online
    (``ioc/data/procedures.csv``) received in the period; a dossier without a known procedure counts."""
    eligible = _eligible_procedures()
    out: dict[str, list[int]] = {}
    start, end = int(f.period.start.timestamp()) * US, f.period.as_of_us
    for s in f.dossiers.values():
        if s.received is None or not start <= s.received[0] <= end:
            continue
        if s.procedure_code is not None and s.procedure_code not in eligible:
            continue
        for scope in s.scopes():
            n = out.setdefault(scope, [0, 0])
            n[1] += 1
            n[0] += 1 if s.full_online else 0
    return {k: (v[0], v[1]) for k, v in out.items()}


# --- Decision 766 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group766:
    key: str
    name_vi: str
    name_en: str
    points: float
    formula: str
    #: The formula in a table cell: Vietnamese, English.
    short: tuple[str, str] = ("", "")


#: The groups these events can score (docs/reports.md gives each formula's source and what is assumed).
GROUPS_766 = (
    Group766(
        "progress",
        "Tiến độ giải quyết",
        "Handling progress",
        20,
        "20 × (completed on time in the period + in progress within deadline at its end)"
        " ÷ (completed in the period + in progress at its end)",
        (
            "20 × (đúng hạn + còn hạn) ÷ (đã xong + đang xử lý)",
            "20 × (on time + in time) ÷ (done + open)",
        ),
    ),
    Group766(
        "online_service",
        "Dịch vụ công trực tuyến",
        "Online public services",
        12,
        "12 × full-online dossiers ÷ dossiers of procedures eligible for full-online, received in the period",
        ("12 × toàn trình ÷ hồ sơ của TTHC đủ điều kiện", "12 × full-online ÷ dossiers of eligible procedures"),
    ),
    Group766(
        "online_payment",
        "Thanh toán trực tuyến",
        "Online payment",
        10,
        "10 × dossiers paid online ÷ completed dossiers with a fee",
        ("10 × thanh toán trực tuyến ÷ hồ sơ có phí", "10 × paid online ÷ with a fee"),
    ),
    Group766(
        "digitisation",
        "Số hóa hồ sơ",
        "Digitisation",
        22,
        "11 × digitised ÷ completed + 11 × electronic results ÷ completed (data reuse not in the events)",
        ("11 × số hóa + 11 × kết quả điện tử (÷ đã giải quyết)", "11 × digitised + 11 × e-results (÷ done)"),
    ),
)
NOT_SCORED_766 = (
    ("publicity", "Công khai, minh bạch", "Publicity, transparency", 18,
     "việc công bố thủ tục và đồng bộ trạng thái hồ sơ lên Cổng DVC quốc gia không có trong sự kiện hồ sơ",
     "procedure publication and the national portal's synchronisation are not in the dossier events"),
    ("satisfaction", "Mức độ hài lòng", "Satisfaction", 18,
     "phản ánh, kiến nghị và khảo sát mức độ hài lòng không có trong sự kiện hồ sơ",
     "complaints and satisfaction surveys are not in the dossier events"),
)  # fmt: skip


def score_766(f: Figures, scope: str, eligible: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    r = f.reader

    def rate(num: int, den: int) -> float | None:
        return num / den if den else None

    in_progress, overdue = r("in_progress", scope, "now"), r("overdue", scope, "now")
    comp = r("comp", scope, "mtd")
    fo_num, fo_den = eligible.get(scope, (0, 0))
    rates: dict[str, tuple[float | None, list[float | None]]] = {
        "progress": (
            None,
            [rate(r("comp_ontime", scope, "mtd") + in_progress - overdue, r("comp_due", scope, "mtd") + in_progress)],
        ),
        "online_service": (None, [rate(fo_num, fo_den)]),
        "online_payment": (None, [rate(r("comp_paid_online", scope, "mtd"), r("comp_fee", scope, "mtd"))]),
        "digitisation": (
            None,
            [rate(r("comp_digitized", scope, "mtd"), comp), rate(r("comp_result_digital", scope, "mtd"), comp)],
        ),
    }
    groups = []
    total, scorable = 0.0, 0.0
    for g in GROUPS_766:
        parts = rates[g.key][1]
        known = [p for p in parts if p is not None]
        if len(known) < len(parts):
            score = None
        else:
            score = round(sum(p * g.points / len(parts) for p in known), 2)
            total += score
            scorable += g.points
        groups.append(
            {
                "group": g.key,
                "name_vi": g.name_vi,
                "name_en": g.name_en,
                "points": g.points,
                "score": score,
                "rates": [None if p is None else round(100 * p, 2) for p in parts],
                "formula": g.formula,
                "formula_short_vi": g.short[0],
                "formula_short_en": g.short[1],
            }
        )
    return {
        "groups": groups,
        "total": round(total, 2),
        "points_scored_of": scorable,
        "percent_of_scorable": round(100 * total / scorable, 2) if scorable else None,
        "not_scored": [
            {"group": k, "name_vi": vi, "name_en": en, "points": p, "why_vi": why_vi, "why_en": why_en}
            for k, vi, en, p, why_vi, why_en in NOT_SCORED_766
        ],
    }


# --- cyber --------------------------------------------------------------------------------------


def cyber_section(f: Figures, scope: str) -> dict[str, Any]:
    r = f.incident_reader
    mean = {
        name: spec.compute(r, scope, "mtd")[0]
        for spec in cyber.KPIS
        for name in (spec.name,)
        if name in ("cyber.mtta_minutes", "cyber.mttr_minutes")
    }
    by_category: dict[str, int] = {}
    overdue: list[dict[str, Any]] = []
    start_us = int(f.period.start.timestamp()) * US
    as_of = f.period.as_of_us
    for iid in sorted(f.incidents):
        s = f.incidents[iid]
        if s.detected is None or s.false_positive is not None or scope not in s.scopes():
            continue
        d = s.detected[0]
        if start_us <= d <= as_of:
            cat = s.category or "other"
            by_category[cat] = by_category.get(cat, 0) + 1
        # Past the 5-day deadline during the period: not resolved within 5 days of detection, the
        # deadline falling in the period (or earlier, still unresolved at its start).
        deadline = d + REPORTING_DEADLINE_US
        resolved = s.resolved[0] if s.resolved is not None and s.resolved[0] <= as_of else None
        if d <= as_of and deadline <= as_of and (resolved is None or resolved > deadline):
            if resolved is not None and resolved < start_us:
                continue
            overdue.append(
                {
                    "incident_id": iid,
                    "severity": s.severity,
                    "category": s.category,
                    "system": s.system,
                    "detected_at": _iso(d),
                    "resolved_at": _iso(resolved) if resolved is not None else None,
                    "days_open": round(((resolved or as_of) - d) / (86400 * US), 1),
                }
            )
    return {
        "detected": r("detected", scope, "mtd"),
        "by_severity": {sev: r(f"detected.{sev}", scope, "mtd") for sev in INCIDENT_SEVERITIES},
        "by_category": dict(sorted(by_category.items(), key=lambda kv: (-kv[1], kv[0]))),
        "open_at_end": r("open", scope, "now"),
        "mtta_minutes": mean["cyber.mtta_minutes"],
        "mttr_minutes": mean["cyber.mttr_minutes"],
        "acknowledged": r("ack_n", scope, "mtd"),
        "resolved": r("res_n", scope, "mtd"),
        "past_reporting_deadline": overdue,
    }


def _iso(us: int) -> str:
    return dt.datetime.fromtimestamp(us / US, TZ).isoformat(timespec="seconds")


# --- environment --------------------------------------------------------------------------------


def _day_start_us(day: dt.date) -> int:
    return int(dt.datetime.combine(day, dt.time(), TZ).timestamp()) * US


def aqi_days(state: StationState, period: Period) -> dict[str, int]:
    """Days per VN_AQI band (daily AQI of Decision 1459 over each local day's hourly means); ``no_data``
    for days without a reading."""
    counts = {b.label_en.lower().replace(" ", "_"): 0 for b in aqi.BANDS}
    counts["no_data"] = 0
    for day in period.days():
        first = _day_start_us(day) // US_PER_HOUR
        end_us = _day_start_us(day + dt.timedelta(days=1)) - 1
        series = {p: state.hourly_means(p, first, first + 23, end_us)[::-1] for p in aqi.POLLUTANTS}
        result = aqi.daily_aqi(series)
        if result is None:
            counts["no_data"] += 1
        else:
            band = aqi.band_of(result.aqi)
            counts[band.label_en.lower().replace(" ", "_")] += 1
    return counts


def flood_hours(state: StationState, period: Period) -> dict[str, float | None]:
    """Hours at or above each alarm level BĐ I–III: each reading's level holds until the next reading,
    at most 3 intervals of the gauge."""
    st = state.station
    start, end = int(period.start.timestamp()) * US, period.as_of_us + 1
    times = [t for t in state.times() if t < end]
    hold = LEVEL_HOLD_INTERVALS * st.interval_s * US
    hours = [0.0, 0.0, 0.0]
    covered = 0.0
    for i, t in enumerate(times):
        nxt = times[i + 1] if i + 1 < len(times) else end
        a, b = max(t, start), min(nxt, t + hold, end)
        if b <= a:
            continue
        level = state.readings[t].values.get("water_level_m")
        if level is None:
            continue
        covered += b - a
        reached = alarm_level(level, st.alarm_levels_m) or 0.0
        for k in range(int(reached)):
            hours[k] += (b - a) / US_PER_HOUR
    out: dict[str, float | None] = {
        f"bd{k + 1}": (round(hours[k], 1) if st.alarm_levels_m[k] is not None else None) for k in range(3)
    }
    out["hours_with_data"] = round(covered / US_PER_HOUR, 1)
    return out


def max_rain_24h(state: StationState, period: Period) -> tuple[float | None, str | None]:
    """The largest rainfall over any 24 h ending within the period (mm), and when that window ends;
    (None, None) for a gauge without a reading in the period (silent, not dry)."""
    start, end = int(period.start.timestamp()) * US, period.as_of_us
    times = [t for t in state.times() if t <= end]
    if not any(t >= start for t in times):
        return None, None
    best, best_end = 0.0, None
    lo, total = 0, 0.0
    for t in times:
        total += state.readings[t].values.get("rain_mm", 0.0)
        while times[lo] <= t - 24 * US_PER_HOUR:
            total -= state.readings[times[lo]].values.get("rain_mm", 0.0)
            lo += 1
        if t >= start and round(total, 2) > best:
            best, best_end = round(total, 2), _iso(t)
    return best, best_end


def environment_section(
    engine: Engine, registry: Registry, period: Period, communes: Iterable[str] | None
) -> dict[str, Any]:
    wanted = None if communes is None else set(communes)
    air, water, rain = [], [], []
    for sid in sorted(engine.sensors.stations):
        state = engine.sensors.stations[sid]
        st = state.station
        if wanted is not None and st.commune_code not in wanted:
            continue
        base = {"station": sid, "name": st.name, "commune": st.commune_code}
        if st.kind == "air":
            air.append({**base, "days": aqi_days(state, period)})
        elif st.kind == "water":
            water.append({**base, "river": st.river, "levels_m": list(st.alarm_levels_m), **flood_hours(state, period)})
        elif st.kind == "rain":
            mm, ending = max_rain_24h(state, period)
            rain.append({**base, "max_24h_mm": mm, "ending_at": ending})
    top = max(
        (r for r in rain if r["max_24h_mm"] is not None), key=lambda x: (x["max_24h_mm"], x["station"]), default=None
    )
    return {
        "aqi_bands": [
            {
                "band": b.label_en.lower().replace(" ", "_"),
                "label_vi": b.label_vi,
                "label_en": b.label_en,
                "low": b.low,
                "high": b.high,
                "colour": b.colour,
            }
            for b in aqi.BANDS
        ],
        "air": air,
        "water": water,
        "rain": rain,
        "max_rain_24h": top,
    }


__all__ = ["UTC_OFFSET_S", "status_of"]
