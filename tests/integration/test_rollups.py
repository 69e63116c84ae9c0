"""Hourly rollups on plain PostgreSQL: last/min/max/mean/count per hour, idempotent refresh, retention.

TimescaleDB keeps `kpi_hourly` as a continuous aggregate instead (test_embedded.py checks its policies)."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from ioc.db.migrate import refresh_rollups

pytestmark = [pytest.mark.integration, pytest.mark.storage("postgresql")]
UTC = dt.UTC


def test_hourly_rollups_summarise_each_hour_and_expire(database_url: str) -> None:
    base = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=3)
    rows = [(base + dt.timedelta(minutes=m), float(v)) for m, v in [(5, 10), (20, 30), (50, 20), (65, 7), (70, 9)]]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO kpi_history (as_of, kpi, scope, win, value, seq) VALUES (%s, 'dossier.received', 'province', 'today', %s, 1)",
            rows,
        )
        # An hour older than the rollup retention, to be dropped.
        conn.execute(
            "INSERT INTO kpi_hourly (bucket, kpi, scope, win, value, samples) VALUES (%s, 'x', 'province', 'now', 1, 1)",
            (base - dt.timedelta(days=40),),
        )
        refresh_rollups(conn, since=base - dt.timedelta(hours=1), rollup_days=30)
        refresh_rollups(conn, since=base - dt.timedelta(hours=1), rollup_days=30)  # a rerun changes nothing
        got = conn.execute(
            "SELECT bucket, value, min_value, max_value, mean_value, samples FROM kpi_hourly WHERE kpi = 'dossier.received'"
            " ORDER BY bucket"
        ).fetchall()
        old = conn.execute("SELECT count(*) FROM kpi_hourly WHERE kpi = 'x'").fetchone()
    assert [(b, v, lo, hi, round(mean, 3), n) for b, v, lo, hi, mean, n in got] == [
        (base, 20.0, 10.0, 30.0, 20.0, 3),
        (base + dt.timedelta(hours=1), 9.0, 7.0, 9.0, 8.0, 2),
    ]
    assert old == (0,)
