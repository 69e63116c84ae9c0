"""Report periods and the schedule, with an injected clock."""

from __future__ import annotations

import datetime as dt

import pytest

from reports.period import Period, PeriodError, due_period, next_run
from streams.windows import TZ, local_month_of


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


@pytest.mark.parametrize(
    ("text", "label", "start", "end"),
    [
        ("2026-10", "2026-10", "2026-10-01T00:00:00+07:00", "2026-11-01T00:00:00+07:00"),
        ("2026-12", "2026-12", "2026-12-01T00:00:00+07:00", "2027-01-01T00:00:00+07:00"),
        ("2026-Q4", "2026-Q4", "2026-10-01T00:00:00+07:00", "2027-01-01T00:00:00+07:00"),
        ("2027-q1", "2027-Q1", "2027-01-01T00:00:00+07:00", "2027-04-01T00:00:00+07:00"),
    ],
)
def test_periods_are_local_calendar_months_and_quarters(text: str, label: str, start: str, end: str) -> None:
    p = Period.parse(text)
    assert (p.label, p.start, p.end) == (label, at(start), at(end))
    assert local_month_of(p.as_of_us // 1_000_000) == p.month_indexes()[-1]
    assert local_month_of((p.as_of_us + 1) // 1_000_000) == p.month_indexes()[-1] + 1


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-Q5", "26-10", "october", "0000-01", "9999-12", "٢٠٢٦-10"])
def test_a_bad_period_is_refused(text: str) -> None:
    with pytest.raises(PeriodError):
        Period.parse(text)


def test_previous_period_crosses_the_year() -> None:
    assert Period.parse("2027-01").previous().label == "2026-12"
    assert Period.parse("2027-Q1").previous().label == "2026-Q4"


@pytest.mark.parametrize(
    ("now", "run", "due"),
    [
        ("2026-11-01T00:29:59+07:00", "2026-11-01T00:30:00+07:00", "2026-09"),
        ("2026-11-01T00:30:00+07:00", "2026-12-01T00:30:00+07:00", "2026-10"),
        ("2026-10-31T17:29:00+00:00", "2026-11-01T00:30:00+07:00", "2026-09"),  # 00:30 local is 17:30 UTC
        ("2026-10-31T17:31:00+00:00", "2026-12-01T00:30:00+07:00", "2026-10"),
        ("2026-12-15T09:00:00+07:00", "2027-01-01T00:30:00+07:00", "2026-11"),
        ("2027-01-01T00:45:00+07:00", "2027-02-01T00:30:00+07:00", "2026-12"),
    ],
)
def test_the_schedule_is_0030_local_on_the_first_for_the_month_before(now: str, run: str, due: str) -> None:
    assert next_run(at(now)) == at(run)
    assert next_run(at(now)).tzinfo is TZ
    assert due_period(at(now)).label == due
