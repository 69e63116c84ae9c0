"""The report's environment figures and period sums, on hand-made readings and counters."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from ioc.registry import load_registry
from reports.build import PeriodReader, aqi_days, flood_hours, max_rain_24h
from reports.pdf import number
from reports.period import Period
from streams.kpi import Counters
from streams.sensor import Reading, StationState
from streams.windows import TZ

US = 1_000_000
OCT = Period.parse("2026-10")


def us(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp()) * US


def station(kind: str, **changes: object) -> StationState:
    reg = load_registry()
    st = next(s for s in reg.stations.values() if s.kind == kind and (kind != "water" or all(s.alarm_levels_m)))
    return StationState(dataclasses.replace(st, **changes))  # type: ignore[arg-type]


def test_flood_hours_hold_each_level_until_the_next_reading_and_no_longer_than_three_intervals() -> None:
    s = station("water", interval_s=3600, alarm_levels_m=(5.0, 6.0, 7.0))
    s.readings = {
        us("2026-09-30T22:00:00+07:00"): Reading("a", {"water_level_m": 6.5}),  # II before the month: from 00:00
        us("2026-10-01T01:00:00+07:00"): Reading("b", {"water_level_m": 7.2}),  # III for 2 h
        us("2026-10-01T03:00:00+07:00"): Reading("c", {"water_level_m": 5.5}),  # I, then silent: 3 h at most
        us("2026-10-10T00:00:00+07:00"): Reading("d", {"water_level_m": 4.0}),
    }
    s.changed()
    h = flood_hours(s, OCT)
    assert (h["bd1"], h["bd2"], h["bd3"]) == (6.0, 3.0, 2.0)
    assert h["hours_with_data"] == 1 + 2 + 3 + 3


def test_unknown_alarm_levels_are_not_reported_as_zero_hours() -> None:
    s = station("water", alarm_levels_m=(None, None, 24.5))
    assert (flood_hours(s, OCT)["bd1"], flood_hours(s, OCT)["bd3"]) == (None, 0.0)


def test_largest_24h_rainfall_is_a_sliding_window_reaching_into_the_day_before() -> None:
    s = station("rain")
    s.readings = {
        us("2026-09-30T12:00:00+07:00"): Reading("a", {"rain_mm": 40.0}),
        us("2026-10-01T06:00:00+07:00"): Reading("b", {"rain_mm": 30.0}),  # 70 over the 24 h to here
        us("2026-10-05T06:00:00+07:00"): Reading("c", {"rain_mm": 50.0}),
        us("2026-10-05T20:00:00+07:00"): Reading("d", {"rain_mm": 15.0}),  # 65
        us("2026-11-01T00:00:00+07:00"): Reading("e", {"rain_mm": 99.0}),  # November
    }
    s.changed()
    assert max_rain_24h(s, OCT) == (70.0, "2026-10-01T06:00:00+07:00")


def test_a_silent_rain_gauge_has_no_largest_rainfall_rather_than_zero() -> None:
    s = station("rain")
    s.readings = {us("2026-09-30T12:00:00+07:00"): Reading("a", {"rain_mm": 40.0})}
    s.changed()
    assert max_rain_24h(s, OCT) == (None, None)


def test_aqi_days_count_each_local_day_once_and_days_without_readings_as_no_data() -> None:
    s = station("air")
    for day in (1, 2):
        for hour in range(24):
            t = us(f"2026-10-{day:02d}T{hour:02d}:30:00+07:00")
            s.readings[t] = Reading(f"{day}-{hour}", {"pm25": 10.0 if day == 1 else 60.0})
    s.changed()
    days = aqi_days(s, OCT)
    assert days["good"] == 1 and days["moderate"] + days["poor"] == 1
    assert days["no_data"] == 29 and sum(days.values()) == 31


def test_a_quarter_sums_its_months_and_a_month_is_the_month_to_date_value() -> None:
    c = Counters(0)
    for month, n in ((10, 3), (11, 4), (12, 5)):
        for i in range(n):
            c.add("recv", ("province",), us(f"2026-{month:02d}-0{i + 1}T10:00:00+07:00"), 1)
    c.advance(us("2027-01-01T00:00:00+07:00") - 1)
    assert PeriodReader(c, Period.parse("2026-Q4"))("recv", "province", "mtd") == 12
    assert PeriodReader(c, Period.parse("2026-11"))("recv", "province", "mtd") == 4
    assert PeriodReader(c, Period.parse("2026-11"))("recv", "province", "now") == 12


@pytest.mark.parametrize(
    ("value", "lang", "digits", "text"),
    [(1234.5, "vi", 2, "1.234,50"), (1234.5, "en", 2, "1,234.50"), (14326.0, "vi", 0, "14.326"), (None, "vi", 2, "–")],
)
def test_figures_are_written_the_way_the_reader_writes_them(
    value: float | None, lang: str, digits: int, text: str
) -> None:
    assert number(value, lang, digits) == text


def test_periods_use_the_operating_time_zone() -> None:
    assert OCT.start.tzinfo is TZ
