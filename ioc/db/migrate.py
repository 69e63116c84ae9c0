"""`ioc db migrate`: create or upgrade the schema on TimescaleDB or plain PostgreSQL."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import psycopg

from ioc.db import schema
from ioc.errors import ConfigurationError

log = logging.getLogger(__name__)

#: Days of partitions created ahead of today on plain PostgreSQL.
PARTITIONS_AHEAD_DAYS = 7

#: Advisory-lock key that serialises concurrent migrations (a parameter: PostgreSQL < 16 has no
#: underscores in numeric literals).
MIGRATION_LOCK_KEY = 4_348_766


class Storage(StrEnum):
    TIMESCALEDB = "timescaledb"
    POSTGRESQL = "postgresql"


@dataclass(frozen=True)
class TimescaleFacts:
    """What the server says about TimescaleDB before the first migration chooses a flavour."""

    #: The extension's files are installed (``pg_available_extensions``).
    installed: bool
    #: ``SHOW shared_preload_libraries``: TimescaleDB works only when its library is listed there.
    preload: str
    #: The extension already exists in this database.
    created: bool


def preloaded(preload: str) -> bool:
    """Whether ``shared_preload_libraries`` lists TimescaleDB (``timescaledb``, or a path ending in it)."""
    names = [item.strip().strip('"').rsplit("/", 1)[-1] for item in preload.split(",")]
    return any(name in ("timescaledb", "timescaledb.so") for name in names)


def choose_storage(facts: TimescaleFacts, probe: Callable[[], str | None]) -> tuple[Storage, str | None]:
    """The flavour a first migration uses, and the one warning to log when TimescaleDB is installed
    but cannot be used (None: nothing to say).

    ``probe`` enables the extension and returns None, or the error that prevented it; it is called
    only when the library is preloaded and the extension not yet created, because on a server that
    did not preload it, ``CREATE EXTENSION timescaledb`` fails with a FATAL error that closes the
    connection.
    """
    if not facts.installed:
        return Storage.POSTGRESQL, None
    if not preloaded(facts.preload):
        return Storage.POSTGRESQL, (
            f"TimescaleDB is installed but not preloaded (shared_preload_libraries = {facts.preload!r}); "
            "using plain PostgreSQL. To use it, add timescaledb to shared_preload_libraries and restart the server"
        )
    if facts.created:
        return Storage.TIMESCALEDB, None
    error = probe()
    if error is not None:
        return Storage.POSTGRESQL, f"TimescaleDB is preloaded but cannot be enabled ({error}); using plain PostgreSQL"
    return Storage.TIMESCALEDB, None


def _timescale_facts(conn: psycopg.Connection) -> TimescaleFacts:
    installed = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    preload = conn.execute("SHOW shared_preload_libraries").fetchone()
    created = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return TimescaleFacts(installed is not None, str(preload[0]) if preload else "", created is not None)


def _create_extension(database_url: str) -> str | None:
    """``CREATE EXTENSION timescaledb`` as the first command of a connection of its own (what
    TimescaleDB asks for, and whatever error it raises cannot break the migration's connection)."""
    try:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=30) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:  # not permitted, a version mismatch, a FATAL that closed the connection
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


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
    with psycopg.connect(database_url, autocommit=True) as lock:
        # Serialise concurrent migrations (two `ioc dev` components starting together).
        lock.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            storage = storage_of(lock)
            if storage is None:
                storage, warning = choose_storage(_timescale_facts(lock), lambda: _create_extension(database_url))
                if warning:
                    log.warning("%s", warning)
            elif storage is Storage.TIMESCALEDB and not preloaded(_timescale_facts(lock).preload):
                raise ConfigurationError(
                    "this database was migrated with TimescaleDB, but the server no longer preloads it: "
                    "add timescaledb to shared_preload_libraries and restart the server"
                )
            # The schema on a connection opened after the extension was enabled (by the probe's own).
            with psycopg.connect(database_url, autocommit=True) as conn:
                _apply_schema(conn, storage, retention_days=retention_days, rollup_days=rollup_days, today=today)
        finally:
            lock.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return storage


def _apply_schema(
    conn: psycopg.Connection, storage: Storage, *, retention_days: int, rollup_days: int, today: dt.date
) -> None:
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
