"""The database schema, in two flavours chosen at run time: TimescaleDB, or plain PostgreSQL.

Tables
    kpi_latest      the current snapshot of every (kpi, scope, window); the API's `GET /api/kpis`
    kpi_history     every published snapshot (time series; hypertable or range-partitioned by day)
    dossier_state   one row per dossier: the merged, idempotent state of its lifecycle events
    incident_state  one row per incident, likewise
    sensor_reading  one row per (station, observed_at) (time series, like kpi_history)
    ioc_meta        key/value facts about this database (which storage flavour it uses)
    alert_event     the audit trail: every alert lifecycle event (AlertEvent), who and when
    alert_current   the current state of every alert (one row per alert_id)
    alert_silence   silences (matchers, validity, who and why, who expired them)
    report          stored monthly and quarterly reports (the document's numbers; files are rendered from it)

The state tables are what the stream worker rebuilds its in-memory state from after a restart;
the KPIs themselves are always derivable from them (docs/design.md).
"""

from __future__ import annotations

from typing import Final

#: Time-series tables and their time column (hypertables, or else daily range partitions).
TIME_SERIES: Final = {"kpi_history": "as_of", "sensor_reading": "observed_at"}

CORE: Final = """
CREATE TABLE IF NOT EXISTS ioc_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE IF NOT EXISTS kpi_latest (
    kpi         text             NOT NULL,
    scope       text             NOT NULL,
    win         text             NOT NULL,
    value       double precision,
    unit        text             NOT NULL,
    numerator   double precision,
    denominator double precision,
    target      double precision,
    status      text,
    as_of       timestamptz      NOT NULL,
    seq         bigint           NOT NULL,
    extra       jsonb,
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (kpi, scope, win)
);
CREATE INDEX IF NOT EXISTS kpi_latest_scope ON kpi_latest (scope);
-- "suspect" while an anomaly detector doubts the station behind the value (streams/anomaly.py).
ALTER TABLE kpi_latest ADD COLUMN IF NOT EXISTS quality text;

CREATE TABLE IF NOT EXISTS dossier_state (
    dossier_id      text PRIMARY KEY,
    partition       integer,
    state           jsonb       NOT NULL,
    terminal        boolean     NOT NULL DEFAULT false,
    last_event_at   timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- What a restart reloads (streams.sink.RESTART_QUERY): open entities, and recently finished ones. Each row is
-- in one of the two partial indexes, so a write maintains two indexes, not three (earlier builds also had
-- a full one, *_state_recent).
-- The input partition a dossier's records come from, and the topic's partition count then (written
-- by the worker; NULL from `ioc replay` and earlier builds): a shard rebuild reads its own rows.
ALTER TABLE dossier_state ADD COLUMN IF NOT EXISTS partitions smallint;
CREATE INDEX IF NOT EXISTS dossier_state_open ON dossier_state (last_event_at) WHERE NOT terminal;
DROP INDEX IF EXISTS dossier_state_recent;
CREATE INDEX IF NOT EXISTS dossier_state_closed ON dossier_state (last_event_at) WHERE terminal;

CREATE TABLE IF NOT EXISTS incident_state (
    incident_id     text PRIMARY KEY,
    partition       integer,
    state           jsonb       NOT NULL,
    terminal        boolean     NOT NULL DEFAULT false,
    last_event_at   timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS incident_state_open ON incident_state (last_event_at) WHERE NOT terminal;
DROP INDEX IF EXISTS incident_state_recent;
CREATE INDEX IF NOT EXISTS incident_state_closed ON incident_state (last_event_at) WHERE terminal;

CREATE TABLE IF NOT EXISTS alert_event (
    id           bigserial   PRIMARY KEY,
    alert_id     text        NOT NULL,
    fingerprint  text        NOT NULL,
    state        text        NOT NULL,
    at           timestamptz NOT NULL,
    by           text        NOT NULL,
    event        jsonb       NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    -- the same event written twice (a replayed batch) is one row
    UNIQUE (alert_id, state, at, by)
);
CREATE INDEX IF NOT EXISTS alert_event_alert ON alert_event (alert_id, at);

CREATE TABLE IF NOT EXISTS alert_current (
    alert_id     text        PRIMARY KEY,
    fingerprint  text        NOT NULL,
    rule         text        NOT NULL,
    scope        text        NOT NULL,
    severity     text        NOT NULL,
    state        text        NOT NULL,
    domain       text        NOT NULL,
    commune_code text,
    started_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    alert        jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_current_active ON alert_current (state, severity) WHERE state <> 'resolved';

CREATE TABLE IF NOT EXISTS alert_silence (
    id          text        PRIMARY KEY,
    matchers    jsonb       NOT NULL,
    starts_at   timestamptz NOT NULL,
    ends_at     timestamptz NOT NULL,
    created_by  text        NOT NULL,
    reason      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expired_at  timestamptz,
    expired_by  text
);

CREATE TABLE IF NOT EXISTS report (
    period      text        NOT NULL,
    scope       text        NOT NULL,
    made_at     timestamptz NOT NULL,
    source      text        NOT NULL,
    document    jsonb       NOT NULL,
    PRIMARY KEY (period, scope)
);
"""

KPI_HISTORY: Final = """
CREATE TABLE IF NOT EXISTS kpi_history (
    as_of       timestamptz      NOT NULL,
    kpi         text             NOT NULL,
    scope       text             NOT NULL,
    win         text             NOT NULL,
    value       double precision,
    numerator   double precision,
    denominator double precision,
    status      text,
    seq         bigint           NOT NULL,
    PRIMARY KEY (kpi, scope, win, as_of)
){partition_clause};
"""

SENSOR_READING: Final = """
CREATE TABLE IF NOT EXISTS sensor_reading (
    observed_at timestamptz NOT NULL,
    station_id  text        NOT NULL,
    kind        text        NOT NULL,
    event_id    text        NOT NULL,
    "values"    jsonb       NOT NULL,
    PRIMARY KEY (station_id, observed_at)
){partition_clause};
"""

# --- TimescaleDB flavour -------------------------------------------------------------------

TIMESCALE_HYPERTABLE: Final = """
SELECT create_hypertable('{table}', by_range('{column}', INTERVAL '1 day'), if_not_exists => TRUE);
"""

# Only while compression is off: TimescaleDB refuses to change it once chunks are compressed.
TIMESCALE_COMPRESSION: Final = """
ALTER TABLE {table} SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = '{segment_by}',
    timescaledb.compress_orderby = '{column} DESC'
);
"""

TIMESCALE_POLICIES: Final = """
SELECT add_compression_policy('{table}', INTERVAL '{compress_after_days} days',
                              if_not_exists => TRUE);
SELECT remove_retention_policy('{table}', if_exists => TRUE);
SELECT add_retention_policy('{table}', INTERVAL '{retention_days} days', if_not_exists => TRUE);
"""

SEGMENT_BY: Final = {"kpi_history": "kpi, scope, win", "sensor_reading": "station_id"}

# --- plain PostgreSQL flavour --------------------------------------------------------------

PLAIN_PARTITION_FUNCTIONS: Final = """
CREATE OR REPLACE FUNCTION ioc_ensure_partitions(parent regclass, first_day date, last_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date := first_day;
    made integer := 0;
    nsp name;
    base name;
    part text;
BEGIN
    SELECT n.nspname, c.relname INTO nsp, base
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = parent;
    -- A default partition catches rows outside the daily ones, so an insert never fails.
    IF to_regclass(format('%I.%I', nsp, base || '_default')) IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s DEFAULT',
                       nsp, base || '_default', parent);
    END IF;
    WHILE d <= last_day LOOP
        part := base || '_' || to_char(d, 'YYYYMMDD');
        IF to_regclass(format('%I.%I', nsp, part)) IS NULL THEN
            BEGIN
                -- Days are UTC days whatever the session's TimeZone (bounds that moved with it
                -- would overlap), as TimescaleDB aligns its daily chunks.
                EXECUTE format('CREATE TABLE %I.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                               nsp, part, parent,
                               d::timestamp AT TIME ZONE 'UTC',
                               (d + 1)::timestamp AT TIME ZONE 'UTC');
                made := made + 1;
            EXCEPTION WHEN check_violation OR invalid_object_definition THEN
                -- rows for that day already sit in the default partition (or a foreign partition
                -- overlaps the day): leave them there
                RAISE NOTICE 'partition % not created: %', part, SQLERRM;
            END;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN made;
END $$;

CREATE OR REPLACE FUNCTION ioc_drop_partitions_before(parent regclass, cutoff date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
    deflt regclass;
    time_column name;
BEGIN
    FOR part IN
        SELECT c.oid::regclass AS rel FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent AND c.relkind IN ('r', 'p') AND c.relname ~ '_[0-9]{8}$'
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < cutoff
    LOOP
        EXECUTE format('DROP TABLE %s', part.rel);
        dropped := dropped + 1;
    END LOOP;
    -- Rows that landed in the default partition expire too, or they would be kept for ever.
    SELECT c.oid::regclass INTO deflt FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
     WHERE i.inhparent = parent AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    SELECT a.attname INTO time_column FROM pg_partitioned_table p
      JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
     WHERE p.partrelid = parent;
    IF deflt IS NOT NULL AND time_column IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s WHERE %I < %L',
                       deflt, time_column, cutoff::timestamp AT TIME ZONE 'UTC');
    END IF;
    RETURN dropped;
END $$;
"""


# --- hourly rollups of the KPI history (kept for years) ------------------------------------

#: TimescaleDB: a continuous aggregate, refreshed and trimmed by policies. Created outside a
#: transaction block (TimescaleDB refuses continuous aggregates inside one).
TIMESCALE_ROLLUP = """
CREATE MATERIALIZED VIEW IF NOT EXISTS kpi_hourly WITH (timescaledb.continuous) AS
SELECT time_bucket(INTERVAL '1 hour', as_of) AS bucket, kpi, scope, win,
       last(value, as_of) AS value, min(value) AS min_value, max(value) AS max_value,
       avg(value) AS mean_value, count(*) AS samples
FROM kpi_history
GROUP BY bucket, kpi, scope, win
WITH NO DATA;
"""
TIMESCALE_ROLLUP_POLICIES = """
SELECT add_continuous_aggregate_policy('kpi_hourly', start_offset => INTERVAL '3 days',
       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '30 minutes', if_not_exists => TRUE);
SELECT remove_retention_policy('kpi_hourly', if_exists => TRUE);
SELECT add_retention_policy('kpi_hourly', INTERVAL '{rollup_days} days', if_not_exists => TRUE);
"""

#: Plain PostgreSQL: a table the worker's maintenance job refreshes (`refresh_rollups`).
PLAIN_ROLLUP = """
CREATE TABLE IF NOT EXISTS kpi_hourly (
    bucket      timestamptz      NOT NULL,
    kpi         text             NOT NULL,
    scope       text             NOT NULL,
    win         text             NOT NULL,
    value       double precision,
    min_value   double precision,
    max_value   double precision,
    mean_value  double precision,
    samples     bigint           NOT NULL,
    PRIMARY KEY (kpi, scope, win, bucket)
);
CREATE INDEX IF NOT EXISTS kpi_hourly_bucket ON kpi_hourly (bucket);
"""
#: Recompute the hours touched in the last ``%(since)s`` (idempotent: a rerun writes the same rows).
PLAIN_ROLLUP_REFRESH = """
INSERT INTO kpi_hourly (bucket, kpi, scope, win, value, min_value, max_value, mean_value, samples)
SELECT date_bin(INTERVAL '1 hour', as_of, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, kpi, scope, win,
       (array_agg(value ORDER BY as_of DESC))[1], min(value), max(value), avg(value), count(*)
FROM kpi_history
WHERE as_of >= date_bin(INTERVAL '1 hour', %(since)s::timestamptz, TIMESTAMPTZ '2000-01-01 00:00:00+00')
GROUP BY 1, kpi, scope, win
ON CONFLICT (kpi, scope, win, bucket) DO UPDATE
SET value = EXCLUDED.value, min_value = EXCLUDED.min_value, max_value = EXCLUDED.max_value,
    mean_value = EXCLUDED.mean_value, samples = EXCLUDED.samples
"""
PLAIN_ROLLUP_RETENTION = "DELETE FROM kpi_hourly WHERE bucket < %(cutoff)s"
