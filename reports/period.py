"""Report periods (a local calendar month or quarter) and when the scheduled run makes them."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from ioc.contract import US
from streams.windows import TZ

#: The scheduled run: 00:30 local time on the 1st of each month.
SCHEDULE_DAY, SCHEDULE_TIME = 1, dt.time(0, 30)
#: Years a period may be in (the previous period and the end stay within what datetime holds).
MIN_YEAR, MAX_YEAR = 2000, 2999


class PeriodError(ValueError):
    """A period that cannot be read (``2026-13``, ``2026-Q5``)."""


@dataclass(frozen=True, order=True)
class Period:
    """A calendar month (``months == 1``) or quarter (``months == 3``) in Asia/Ho_Chi_Minh."""

    year: int
    first_month: int
    months: int

    @classmethod
    def parse(cls, text: str) -> Period:
        m = re.fullmatch(r"([0-9]{4})-([0-9]{2})", text.strip())
        q = re.fullmatch(r"([0-9]{4})-[Qq]([1-4])", text.strip())
        if m and 1 <= int(m.group(2)) <= 12:
            period = cls(int(m.group(1)), int(m.group(2)), 1)
        elif q:
            period = cls(int(q.group(1)), 3 * int(q.group(2)) - 2, 3)
        else:
            raise PeriodError(f"{text!r} is neither a month YYYY-MM nor a quarter YYYY-Qn")
        if not MIN_YEAR <= period.year <= MAX_YEAR:
            raise PeriodError(f"{text!r}: the year must be {MIN_YEAR}–{MAX_YEAR}")
        return period

    @property
    def label(self) -> str:
        if self.months == 3:
            return f"{self.year}-Q{(self.first_month + 2) // 3}"
        return f"{self.year}-{self.first_month:02d}"

    @property
    def kind(self) -> str:
        return "quarter" if self.months == 3 else "month"

    def month_indexes(self) -> tuple[int, ...]:
        """The months it spans as ``year * 12 + month - 1`` (the numbering of `streams.windows`)."""
        first = self.year * 12 + self.first_month - 1
        return tuple(range(first, first + self.months))

    @property
    def start(self) -> dt.datetime:
        return dt.datetime(self.year, self.first_month, 1, tzinfo=TZ)

    @property
    def end(self) -> dt.datetime:
        """The first instant after the period."""
        n = self.year * 12 + self.first_month - 1 + self.months
        return dt.datetime(n // 12, n % 12 + 1, 1, tzinfo=TZ)

    @property
    def as_of_us(self) -> int:
        """The last microsecond of the period: the instant whose month-to-date is the whole month."""
        return int(self.end.timestamp()) * US - 1

    def previous(self) -> Period:
        n = self.year * 12 + self.first_month - 1 - self.months
        return Period(n // 12, n % 12 + 1, self.months)

    def days(self) -> list[dt.date]:
        d, end = self.start.date(), self.end.date()
        out = []
        while d < end:
            out.append(d)
            d += dt.timedelta(days=1)
        return out


def last_month(now: dt.datetime) -> Period:
    """The calendar month before the one holding ``now`` (local time)."""
    local = now.astimezone(TZ)
    return Period(local.year, local.month, 1).previous()


def next_run(now: dt.datetime) -> dt.datetime:
    """When the scheduled run comes next after ``now``: 00:30 local on the 1st."""
    local = now.astimezone(TZ)
    this = dt.datetime.combine(local.date().replace(day=SCHEDULE_DAY), SCHEDULE_TIME, TZ)
    if this > local:
        return this
    n = local.year * 12 + local.month
    return dt.datetime(n // 12, n % 12 + 1, SCHEDULE_DAY, SCHEDULE_TIME.hour, SCHEDULE_TIME.minute, tzinfo=TZ)


def due_period(now: dt.datetime) -> Period:
    """The month a run at ``now`` makes: the month before ``now``'s, once its 00:30 on the 1st has passed;
    before that (00:00-00:30 on the 1st) still the month before the previous one."""
    local = now.astimezone(TZ)
    scheduled = dt.datetime.combine(local.date().replace(day=SCHEDULE_DAY), SCHEDULE_TIME, TZ)
    p = last_month(local)
    return p if local >= scheduled else p.previous()
