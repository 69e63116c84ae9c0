"""History requests: buckets, ranges and point limits, with messages that say what to fix."""

from __future__ import annotations

import datetime as dt

import pytest

from api.history import MAX_POINTS, HistoryQueryError, build_query, parse_bucket, sql_for

NOW = dt.datetime(2026, 11, 22, 1, 15, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m", 60), ("5m", 300), ("15m", 900), ("1h", 3600), ("6h", 21600), ("1d", 86400)],
)
def test_bucket_is_parsed(text: str, seconds: int) -> None:
    assert parse_bucket(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0m", "5", "5x", "1w", "-1h", "1.5h", "10s", "99999m"])
def test_bad_bucket_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(HistoryQueryError, match=r"e\.g\. 5m"):
        parse_bucket(text)


def test_defaults_are_the_last_24_hours_with_a_fitting_bucket() -> None:
    q = build_query("dossier.received", "province", "today", None, None, None, now=NOW)
    assert q.end == NOW and q.end - q.start == dt.timedelta(hours=24)
    assert q.bucket_label == "1m"


def test_a_month_gets_a_coarser_automatic_bucket() -> None:
    q = build_query("env.aqi", "province", "now", "2026-10-23T00:00:00+07:00", "2026-11-22T00:00:00+07:00", None)
    assert q.bucket_label == "30m"
    assert (q.end - q.start) / q.bucket <= MAX_POINTS


def test_time_without_offset_is_local() -> None:
    q = build_query("env.aqi", "province", "now", "2026-11-22T00:00", "2026-11-22T06:00", "1h")
    assert q.start == dt.datetime(2026, 11, 21, 17, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((None, "province", "now", None, None, None), "missing query parameter.*kpi"),
        (("env.aqi", None, None, None, None, None), "scope, window"),
        (("env.aqi", "province", "week", None, None, None), "window 'week'"),
        (("env.aqi", "province", "now", "yesterday", None, None), "ISO 8601"),
        (
            (
                "env.aqi",
                "province",
                "now",
                "2026-11-22T08:00+07:00",
                "2026-11-22T07:00+07:00",
                None,
            ),
            "earlier",
        ),
        (
            (
                "env.aqi",
                "province",
                "now",
                "2026-01-01T00:00+07:00",
                "2026-11-22T00:00+07:00",
                None,
            ),
            "31 days",
        ),
        (
            (
                "env.aqi",
                "province",
                "now",
                "2026-11-01T00:00+07:00",
                "2026-11-22T00:00+07:00",
                "1m",
            ),
            "wider bucket",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(args: tuple[str | None, ...], message: str) -> None:
    with pytest.raises(HistoryQueryError, match=message):
        build_query(*args, now=NOW)


@pytest.mark.parametrize(("storage", "function"), [("timescaledb", "time_bucket("), ("postgresql", "date_bin(")])
def test_downsampling_function_follows_the_storage(storage: str, function: str) -> None:
    assert function in sql_for(storage)
