"""Event-time counters behind every windowed KPI: integer sums per minute, local day and local month.

A `Series` holds one integer quantity (dossiers received, seconds of processing, hundredths of
a millimetre of rain...) for one scope, bucketed by the minute of its event time, and keeps
running sums for the sliding windows `1h` and `24h` that end at the engine's clock, plus sums per
calendar day and month in Asia/Ho_Chi_Minh. Integers make every sum exact, so the result does not
depend on the order events arrive in, which is what lets `ioc replay` and the worker agree.

Window semantics, at one-minute resolution: `1h` is the 60 one-minute buckets ending with the
bucket that holds `as_of`; `24h` the last 1,440; `today` the local calendar day of `as_of`; `mtd`
its local calendar month. `past` is the sum of every bucket strictly before the minute of
`as_of` (used for "due before now").
"""

from __future__ import annotations

import datetime as dt

from ioc.contract import TZ, UTC_OFFSET_S

__all__ = ["TZ", "UTC_OFFSET_S"]  # re-exported: callers of the window functions take it from here too
MINUTES_1H = 60
MINUTES_24H = 1440
#: Minute buckets are kept this long behind the clock (the 24-hour window plus lateness slack).
KEEP_MINUTES = MINUTES_24H + 120
#: Local days kept: enough for month-to-date of this and the previous month.
KEEP_DAYS = 64


def epoch_s(t: dt.datetime) -> int:
    """Whole seconds since the epoch of an aware datetime."""
    return int(t.timestamp() // 1)


def minute_of(ts: int) -> int:
    return ts // 60


def local_day_of(ts: int) -> int:
    """Days since 1970-01-01 in local (UTC+7) time."""
    return (ts + UTC_OFFSET_S) // 86400


def local_month_of(ts: int) -> int:
    """Months since 0000-01 of the local calendar month holding ``ts``."""
    d = dt.date(1970, 1, 1) + dt.timedelta(days=local_day_of(ts))
    return d.year * 12 + d.month - 1


def local_day_of_minute(minute: int) -> int:
    return (minute * 60 + UTC_OFFSET_S) // 86400


_months: dict[int, int] = {}


def local_month_of_day(day: int) -> int:
    """Months since 0000-01 of a local day number (cached: a handful of distinct days are live)."""
    month = _months.get(day)
    if month is None:
        d = dt.date(1970, 1, 1) + dt.timedelta(days=day)
        month = _months[day] = d.year * 12 + d.month - 1
    return month


def from_epoch(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, TZ)


class Series:
    """One integer quantity bucketed by minute, with sliding and calendar sums (see module doc).

    Only buckets at or before the clock count anywhere: an event stamped after the clock (a
    producer's clock running ahead) has not happened yet, and enters every sum when the clock
    reaches its minute. `level` (the sum of every bucket up to the clock) turns +1/−1 pairs into
    states: "in progress" is +1 at receipt and −1 at the outcome.
    """

    __slots__ = ("days", "level", "minutes", "months", "sum_1h", "sum_24h")

    def __init__(self) -> None:
        self.minutes: dict[int, int] = {}
        self.days: dict[int, int] = {}
        self.months: dict[int, int] = {}
        self.sum_1h = 0
        self.sum_24h = 0
        self.level = 0

    def add(self, minute: int, amount: int, now_m: int) -> None:
        minutes = self.minutes
        minutes[minute] = minutes.get(minute, 0) + amount
        if minute <= now_m:
            self._count(minute, amount, now_m)

    def _count(self, minute: int, amount: int, now_m: int) -> None:
        """Add a bucket at or before the clock to every sum that holds it."""
        self.level += amount
        if minute > now_m - MINUTES_1H:
            self.sum_1h += amount
        if minute > now_m - MINUTES_24H:
            self.sum_24h += amount
        day = local_day_of_minute(minute)
        self.days[day] = self.days.get(day, 0) + amount
        month = local_month_of_day(day)
        self.months[month] = self.months.get(month, 0) + amount

    def advance(self, old_m: int, new_m: int) -> None:
        """Move the clock from minute ``old_m`` to ``new_m`` (forward only)."""
        if new_m <= old_m:
            return
        minutes = self.minutes
        # Buckets the clock reaches now: (old_m, new_m]. Usually none or one.
        if new_m - old_m <= len(minutes):
            entering = [(m, minutes[m]) for m in range(old_m + 1, new_m + 1) if m in minutes]
        else:
            entering = sorted((m, v) for m, v in minutes.items() if old_m < m <= new_m)
        for m, v in entering:
            self._count(m, v, new_m)
        # Buckets that slid out of the sliding windows (they entered them at the latest at old_m).
        self.sum_1h -= _sum_range(minutes, max(old_m - MINUTES_1H + 1, 0), min(new_m - MINUTES_1H, old_m))
        self.sum_24h -= _sum_range(minutes, max(old_m - MINUTES_24H + 1, 0), min(new_m - MINUTES_24H, old_m))

    def prune(self, now_m: int) -> None:
        """Forget minute buckets that no sliding window can reach (sums and `level` keep their value)."""
        horizon = now_m - KEEP_MINUTES
        for m in [m for m in self.minutes if m < horizon]:
            del self.minutes[m]
        day_horizon = now_m // 1440 - KEEP_DAYS
        for d in [d for d in self.days if d < day_horizon]:
            del self.days[d]
        month_horizon = local_month_of_day(max(day_horizon, 0)) - 2
        for mo in [mo for mo in self.months if mo < month_horizon]:
            del self.months[mo]

    def window(self, window: str, day: int, month: int) -> int:
        if window == "1h":
            return self.sum_1h
        if window == "24h":
            return self.sum_24h
        if window == "today":
            return self.days.get(day, 0)
        if window == "mtd":
            return self.months.get(month, 0)
        if window == "now":
            return self.level
        raise ValueError(f"unknown window {window!r}")

    def is_empty(self) -> bool:
        return not (self.minutes or self.days or self.level)


def _sum_range(minutes: dict[int, int], first: int, last: int) -> int:
    """Sum of buckets in [first, last], iterating whichever is smaller: the range or the dict."""
    if last < first:
        return 0
    if last - first + 1 <= len(minutes):
        get = minutes.get
        return sum(get(m, 0) for m in range(first, last + 1))
    return sum(v for m, v in minutes.items() if first <= m <= last)
