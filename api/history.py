"""KPI time series from ``kpi_history``, downsampled in SQL (``time_bucket`` or ``date_bin``)."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Final

from ioc.contract import TZ
from ioc.snapshot import WINDOWS

LOCAL: Final = TZ
#: Longest range one request may cover (raw history is kept 30 days by default).
MAX_RANGE: Final = dt.timedelta(days=31)
#: Most points one request may return.
MAX_POINTS: Final = 2000
DEFAULT_RANGE: Final = dt.timedelta(hours=24)
#: Buckets tried, smallest first, when the caller names none.
AUTO_BUCKETS: Final = ("1m", "5m", "15m", "30m", "1h", "3h", "6h", "12h", "1d")
_BUCKET = re.compile(r"^([1-9][0-9]{0,3})([mhd])$")
_SPACE_OFFSET = re.compile(r"([T ][0-9:.]+) ([0-9]{2}:?[0-9]{2})$")
_UNIT_SECONDS: Final = {"m": 60, "h": 3600, "d": 86400}
#: Buckets are aligned on local midnight, so ``1d`` buckets are calendar days in Vietnam.
BUCKET_ORIGIN: Final = dt.datetime(2000, 1, 3, tzinfo=LOCAL)


class HistoryQueryError(ValueError):
    """A history request that cannot be answered as asked (answered with HTTP 400)."""


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    kpi: str
    scope: str
    window: str
    start: dt.datetime
    end: dt.datetime
    bucket: dt.timedelta
    bucket_label: str


def parse_bucket(text: str) -> dt.timedelta:
    """``1m``, ``5m``, ``1h``, ``1d`` ... as a timedelta."""
    m = _BUCKET.match(text.strip())
    if not m:
        raise HistoryQueryError(f"bucket {text!r} is not understood: use whole minutes, hours or days, e.g. 5m, 1h, 1d")
    return dt.timedelta(seconds=int(m.group(1)) * _UNIT_SECONDS[m.group(2)])


def parse_time(text: str, name: str) -> dt.datetime:
    """An ISO 8601 time; without an offset it is read in Asia/Ho_Chi_Minh."""
    try:
        # a "+" left unencoded in a query string arrives as a space
        value = dt.datetime.fromisoformat(_SPACE_OFFSET.sub(r"\1+\2", text.strip()).replace("Z", "+00:00"))
    except ValueError as exc:
        raise HistoryQueryError(f"{name} {text!r} is not an ISO 8601 time, e.g. 2026-11-22T08:00:00+07:00") from exc
    return value if value.tzinfo else value.replace(tzinfo=LOCAL)


def build_query(
    kpi: str | None,
    scope: str | None,
    window: str | None,
    start: str | None,
    end: str | None,
    bucket: str | None,
    *,
    now: dt.datetime | None = None,
) -> HistoryQuery:
    """Validate a history request; HistoryQueryError names what is wrong and how to fix it."""
    missing = [n for n, v in (("kpi", kpi), ("scope", scope), ("window", window)) if not v]
    if missing or not (kpi and scope and window):
        raise HistoryQueryError(f"missing query parameter(s): {', '.join(missing)}")
    if window not in WINDOWS:
        raise HistoryQueryError(f"window {window!r} is not one of {', '.join(WINDOWS)}")
    now = now or dt.datetime.now(dt.UTC)
    try:
        t1 = parse_time(end, "to") if end else now
        t0 = parse_time(start, "from") if start else t1 - DEFAULT_RANGE
        for t in (t0, t1):  # the answer shows both in local time, the database takes them in UTC
            t.astimezone(dt.UTC).astimezone(LOCAL)
    except OverflowError as exc:
        raise HistoryQueryError("from and to must lie within the years 1 to 9999, in UTC and in local time") from exc
    if t0 >= t1:
        raise HistoryQueryError("from must be earlier than to")
    span = t1 - t0
    if span > MAX_RANGE:
        raise HistoryQueryError(f"the range is {span}; at most {MAX_RANGE.days} days per request")
    if bucket:
        width = parse_bucket(bucket)
        label = bucket.strip()
        points = span / width
        if points > MAX_POINTS:
            raise HistoryQueryError(
                f"bucket {label} over {span} gives {int(points)} points; at most {MAX_POINTS}: "
                "use a wider bucket or a shorter range"
            )
    else:
        label = next(b for b in AUTO_BUCKETS if span / parse_bucket(b) <= MAX_POINTS)
        width = parse_bucket(label)
    return HistoryQuery(kpi, scope, window, t0, t1, width, label)


_SELECT = """
SELECT {bucket_fn}(%(bucket)s::interval, as_of, %(origin)s::timestamptz) AS t,
       (array_agg(value ORDER BY as_of DESC))[1]       AS value,
       min(value)                                      AS min,
       max(value)                                      AS max,
       avg(value)                                      AS avg,
       (array_agg(numerator ORDER BY as_of DESC))[1]   AS numerator,
       (array_agg(denominator ORDER BY as_of DESC))[1] AS denominator,
       (array_agg(status ORDER BY as_of DESC))[1]      AS status,
       max(as_of)                                      AS as_of,
       max(seq)                                        AS seq,
       count(*)                                        AS samples
FROM kpi_history
WHERE kpi = %(kpi)s AND scope = %(scope)s AND win = %(window)s
  AND as_of >= %(start)s AND as_of < %(end)s
GROUP BY t
ORDER BY t
LIMIT %(limit)s
"""


def sql_for(storage: str) -> str:
    """The downsampling query: TimescaleDB's ``time_bucket``, else PostgreSQL 14's ``date_bin``."""
    return _SELECT.format(bucket_fn="time_bucket" if storage == "timescaledb" else "date_bin")


def sql_params(q: HistoryQuery) -> dict[str, Any]:
    return {
        "bucket": q.bucket,
        "origin": BUCKET_ORIGIN,
        "kpi": q.kpi,
        "scope": q.scope,
        "window": q.window,
        "start": q.start,
        "end": q.end,
        "limit": MAX_POINTS + 1,
    }


def _local(t: Any) -> Any:
    return t.astimezone(LOCAL).isoformat() if isinstance(t, dt.datetime) else t


def point(row: tuple[Any, ...]) -> dict[str, Any]:
    """One bucket: the last value in it (and its min, max, mean), as of the bucket's last sample."""
    t, value, lo, hi, avg, num, den, status, as_of, seq, samples = row
    return {
        "t": _local(t),
        "value": value,
        "min": lo,
        "max": hi,
        "avg": avg,
        "numerator": num,
        "denominator": den,
        "status": status,
        "as_of": _local(as_of),
        "seq": seq,
        "samples": samples,
    }
