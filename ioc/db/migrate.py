"""`ioc db migrate`: create or upgrade the schema on TimescaleDB or plain PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
from enum import StrEnum

import psycopg

from ioc.db import schema

log = logging.getLogger(__name__)

#: Days of partitions created ahead of today on plain PostgreSQL.
PARTITIONS_AHEAD_DAYS = 7

#: Advisory-lock key that serialises concurrent migrations (a parameter: PostgreSQL < 16 has no
#: underscores in numeric literals).
MIGRATION_LOCK_KEY = 4_348_766


class Storage(StrEnum):
    TIMESCALEDB = "timescaledb"
    POSTGRESQL = "postgresql"


def _timescale_available(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if row is None:
        return False
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:  # installed but not preloaded, or not permitted
        log.warning("timescaledb is installed but cannot be enabled (%s); using plain PostgreSQL", exc)
        return False
    return True


def storage_of(conn: psycopg.Connection) -> Storage | None:
    """The flavour this database was migrated with, or None before the first migration."""
    if conn.execute("SELECT to_regclass('ioc_meta')").fetchone() == (None,):
        return None
    row = conn.execute("SELECT value FROM ioc_meta WHERE key = 'storage'").fetchone()
    return Storage(row[0]) if row else None


def _compression_enabled(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute(
        "SELECT compression_enabled FROM timescaledb_information.hypertables WHERE hypertable_name = %s",
        (table,),
    ).fetchone()
    return bool(row and row[0])


def _log_notice(diag: psycopg.errors.Diagnostic) -> None:
    message = diag.message_primary or ""
    log.log(logging.WARNING if message.startswith("partition ") else logging.DEBUG, "%s", message)


def ensure_partitions(conn: psycopg.Connection, first_day: dt.date, last_day: dt.date) -> int:
    """Create the daily (UTC) partitions of every time-series table for [first_day, last_day].

    Plain PostgreSQL only; returns 0 on TimescaleDB, which makes its chunks itself.
    """
    if storage_of(conn) is not Storage.POSTGRESQL:
        return 0
    made = 0
    # The SQL function reports days it could not split off the default partition as notices.
    conn.add_notice_handler(_log_notice)
    try:
        for table in schema.TIME_SERIES:
            row = conn.execute(
                "SELECT ioc_ensure_partitions(%s::regclass, %s, %s)", (table, first_day, last_day)
            ).fetchone()
            made += int(row[0]) if row else 0
    finally:
        conn.remove_notice_handler(_log_notice)
    return made


def drop_expired(conn: psycopg.Connection, retention_days: int, today: dt.date | None = None) -> int:
    """Drop daily partitions (and default-partition rows) older than the retention period.

    Plain PostgreSQL only; returns 0 on TimescaleDB, whose retention policy does this.
    """
    if storage_of(conn) is not Storage.POSTGRESQL:
        return 0
    cutoff = (today or dt.date.today()) - dt.timedelta(days=retention_days)
    dropped = 0
    for table in schema.TIME_SERIES:
        row = conn.execute("SELECT ioc_drop_partitions_before(%s::regclass, %s)", (table, cutoff)).fetchone()
        dropped += int(row[0]) if row else 0
    return dropped


def refresh_rollups(conn: psycopg.Connection, *, since: dt.datetime, rollup_days: int) -> int:
    """Plain PostgreSQL: recompute the hourly rollups from ``since`` on and drop those past retention
    (TimescaleDB does both with its continuous-aggregate and retention policies)."""
    if storage_of(conn) is not Storage.POSTGRESQL:
        return 0
    cur = conn.execute(schema.PLAIN_ROLLUP_REFRESH, {"since": since})
    refreshed = cur.rowcount
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=rollup_days)
    conn.execute(schema.PLAIN_ROLLUP_RETENTION, {"cutoff": cutoff})
    return refreshed


def migrate(
    database_url: str, *, retention_days: int = 30, rollup_days: int = 3650, today: dt.date | None = None
) -> Storage:
    """Create or upgrade the schema; idempotent, safe to run from several processes at once."""
    today = today or dt.date.today()
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Serialise concurrent migrations (two `ioc dev` components starting together).
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            storage = storage_of(conn)
            if storage is None:
                storage = Storage.TIMESCALEDB if _timescale_available(conn) else Storage.POSTGRESQL
            with conn.transaction():
                conn.execute(schema.CORE)
                if storage is Storage.TIMESCALEDB:
                    conn.execute(schema.KPI_HISTORY.format(partition_clause=""))
                    conn.execute(schema.SENSOR_READING.format(partition_clause=""))
                    for table, column in schema.TIME_SERIES.items():
                        params = {
                            "table": table,
                            "column": column,
                            "segment_by": schema.SEGMENT_BY[table],
                            "compress_after_days": max(1, min(7, retention_days - 1)),
                            "retention_days": retention_days,
                        }
                        conn.execute(schema.TIMESCALE_HYPERTABLE.format(**params))
                        if not _compression_enabled(conn, table):
                            conn.execute(schema.TIMESCALE_COMPRESSION.format(**params))
                        conn.execute(schema.TIMESCALE_POLICIES.format(**params))
                else:
                    conn.execute(schema.KPI_HISTORY.format(partition_clause=" PARTITION BY RANGE (as_of)"))
                    conn.execute(schema.SENSOR_READING.format(partition_clause=" PARTITION BY RANGE (observed_at)"))
                    conn.execute(schema.PLAIN_PARTITION_FUNCTIONS)
                    conn.execute(schema.PLAIN_ROLLUP)
                conn.execute(
                    "INSERT INTO ioc_meta (key, value) VALUES ('storage', %s) ON CONFLICT (key) DO NOTHING",
                    (storage.value,),
                )
            if storage is Storage.TIMESCALEDB:
                conn.execute(schema.TIMESCALE_ROLLUP)  # not in a transaction block: TimescaleDB requires it
                conn.execute(schema.TIMESCALE_ROLLUP_POLICIES.format(rollup_days=rollup_days))
            if storage is Storage.POSTGRESQL:
                made = ensure_partitions(
                    conn,
                    today - dt.timedelta(days=2),
                    today + dt.timedelta(days=PARTITIONS_AHEAD_DAYS),
                )
                log.info("plain PostgreSQL storage: native daily range partitions (%d new)", made)
            else:
                log.info(
                    "TimescaleDB storage: hypertables with compression and %d-day retention",
                    retention_days,
                )
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return storage
