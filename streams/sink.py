"""The worker's database side: writing entity states, readings and KPI snapshots, and rebuilding state on start.

Every write is an idempotent upsert keyed by the natural identity of what it stores (dossier_id,
incident_id, (station_id, observed_at), (kpi, scope, window[, as_of])), so replaying any part of
the input writes the same rows again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec
import psycopg

from ioc.contract import US
from ioc.settings import TOPIC_DOSSIER
from ioc.snapshot import Snapshot
from streams import cyber, dossier
from streams.engine import ENTITY_HORIZON_US, Engine
from streams.sensor import KEEP_US, Parsed, Reading, SensorEvent

log = logging.getLogger(__name__)
#: Rows loaded between two turns of the event loop while state is rebuilt.
YIELD_EVERY = 2000

_encode = msgspec.json.Encoder().encode
S = TypeVar("S", dossier.DossierState, cyber.IncidentState)


class StateDecoder(Generic[S]):
    """Reads a stored entity state: a JSON array in field order (what `write_changes` writes), or the
    JSON object with named fields that earlier builds wrote (rows not rewritten since)."""

    def __init__(self, cls: type[S]) -> None:
        self.cls: type[S] = cls
        self._array: msgspec.json.Decoder[S] = msgspec.json.Decoder(cls)
        fields = [(f.name, f.type, f.default) for f in msgspec.structs.fields(cls)]
        self._object: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            msgspec.defstruct(f"Legacy{cls.__name__}", fields)
        )

    def decode(self, text: str | bytes) -> S:
        if text[:1] in ("[", b"["):
            return self._array.decode(text)
        return self.cls(**msgspec.structs.asdict(self._object.decode(text)))


_dossier_decoder = StateDecoder(dossier.DossierState)
_incident_decoder = StateDecoder(cyber.IncidentState)


def _ts(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / US, dt.UTC)


class Changes:
    """Entity states and readings changed since the last take: what one flush makes durable."""

    __slots__ = ("dossiers", "incidents", "partition_count", "partitions", "readings")

    def __init__(
        self,
        dossiers: dict[str, Any],
        incidents: dict[str, Any],
        readings: dict[tuple[str, int], tuple[str, Reading]],
        partitions: dict[str, int] | None = None,
        partition_count: int = 0,
    ) -> None:
        self.dossiers = dossiers
        self.incidents = incidents
        self.readings = readings
        #: The input partition each dossier's records come from (its shard), when known, of
        #: ``partition_count``: stored with the row, so a shard rebuild reads its own rows only.
        self.partitions: dict[str, int] = partitions if partitions is not None else {}
        self.partition_count = partition_count

    def __len__(self) -> int:
        return len(self.dossiers) + len(self.incidents) + len(self.readings)

    def split(self, parts: int) -> list[Changes]:
        """Up to ``parts`` disjoint shares (dossiers dealt out in turn; incidents and readings, which
        are few, in the first), to be written by concurrent transactions: the keys differ, so they
        never wait for each other, and each is an idempotent upsert, so a share written twice after a
        failure, or one written and one not, still ends in the same rows once every share is written."""
        if parts <= 1 or len(self.dossiers) < 2 * SPLIT_MIN_ROWS:
            return [self]
        parts = min(parts, len(self.dossiers) // SPLIT_MIN_ROWS)
        items = list(self.dossiers.items())
        shares = [Changes(dict(items[i::parts]), {}, {}, self.partitions, self.partition_count) for i in range(parts)]
        shares[0].incidents, shares[0].readings = self.incidents, self.readings
        return shares


#: Below this many dossier rows per share a flush is not split (a transaction has its own cost).
SPLIT_MIN_ROWS = 2000


def take_changes(engine: Engine) -> Changes:
    """Take (and clear) what the engine changed; the rows are encoded when written."""
    changes = Changes(engine.dossiers.changed, engine.incidents.changed, engine.sensors.changed)
    engine.dossiers.changed, engine.incidents.changed, engine.sensors.changed = {}, {}, {}
    return changes


#: Staging tables, one per connection, emptied at each commit: rows are COPYed in, then merged
#: into the real tables with one set-based upsert (far cheaper than a statement per row).
STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_dossier (id text, state jsonb, terminal boolean, last_us bigint, part integer,
    parts smallint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_incident (id text, state jsonb, terminal boolean, last_us bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_reading (station_id text, observed_us bigint, kind text, event_id text, vals jsonb)
    ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_kpi (kpi text, scope text, win text, value float8, unit text, numerator float8,
    denominator float8, target float8, status text, as_of timestamptz, seq bigint, extra jsonb, hist boolean,
    quality text)
    ON COMMIT DELETE ROWS;
"""
#: Snapshots: one COPY into staging, then one set-based upsert into each table (the newest seq wins);
#: `hist` marks the rows the history takes (`ioc.snapshot.HistorySampler`).
MERGE_LATEST = """
INSERT INTO kpi_latest (kpi, scope, win, value, unit, numerator, denominator, target, status, as_of, seq, extra, updated_at,
    quality)
SELECT DISTINCT ON (kpi, scope, win) kpi, scope, win, value, unit, numerator, denominator, target, status, as_of, seq,
    extra, now(), quality
FROM stage_kpi ORDER BY kpi, scope, win, seq DESC
ON CONFLICT (kpi, scope, win) DO UPDATE
SET value = EXCLUDED.value, unit = EXCLUDED.unit, numerator = EXCLUDED.numerator, denominator = EXCLUDED.denominator,
    target = EXCLUDED.target, status = EXCLUDED.status, as_of = EXCLUDED.as_of, seq = EXCLUDED.seq,
    extra = EXCLUDED.extra, updated_at = now(), quality = EXCLUDED.quality
WHERE kpi_latest.seq <= EXCLUDED.seq
"""
MERGE_HISTORY = """
INSERT INTO kpi_history (as_of, kpi, scope, win, value, numerator, denominator, status, seq)
SELECT DISTINCT ON (kpi, scope, win, as_of) as_of, kpi, scope, win, value, numerator, denominator, status, seq
FROM stage_kpi WHERE hist ORDER BY kpi, scope, win, as_of, seq DESC
ON CONFLICT (kpi, scope, win, as_of) DO UPDATE
SET value = EXCLUDED.value, numerator = EXCLUDED.numerator, denominator = EXCLUDED.denominator,
    status = EXCLUDED.status, seq = EXCLUDED.seq
"""
EPOCH_US = "(timestamptz 'epoch' + {} * interval '1 microsecond')"
MERGE_ENTITY = (
    """
INSERT INTO {table} ({key}, state, terminal, last_event_at, updated_at)
SELECT id, state, terminal, """
    + EPOCH_US.format("last_us")
    + """, now() FROM stage_{kind}
ON CONFLICT ({key}) DO UPDATE
SET state = EXCLUDED.state, terminal = EXCLUDED.terminal, last_event_at = EXCLUDED.last_event_at, updated_at = now()
"""
)
#: Dossiers also record their partition (of how many): kept when a writer does not know it (a replay).
MERGE_DOSSIER = (
    """
INSERT INTO dossier_state (dossier_id, state, terminal, last_event_at, updated_at, partition, partitions)
SELECT id, state, terminal, """
    + EPOCH_US.format("last_us")
    + """, now(), part, parts FROM stage_dossier
ON CONFLICT (dossier_id) DO UPDATE
SET state = EXCLUDED.state, terminal = EXCLUDED.terminal, last_event_at = EXCLUDED.last_event_at, updated_at = now(),
    partition = COALESCE(EXCLUDED.partition, dossier_state.partition),
    partitions = COALESCE(EXCLUDED.partitions, dossier_state.partitions)
"""
)
MERGE_READING = (
    """
INSERT INTO sensor_reading (observed_at, station_id, kind, event_id, "values")
SELECT """
    + EPOCH_US.format("observed_us")
    + """, station_id, kind, event_id, vals FROM stage_reading
ON CONFLICT (station_id, observed_at) DO UPDATE
SET event_id = EXCLUDED.event_id, "values" = EXCLUDED."values", kind = EXCLUDED.kind
WHERE EXCLUDED.event_id < sensor_reading.event_id
"""
)
NULL = "\\N"  # COPY's text format
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: str) -> str:
    """A value for COPY's text format (backslash, tab, newline and carriage return escaped)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value  # the common case, and far cheaper than translate's per-character lookups


def _json(value: bytes) -> str:
    """JSON (as msgspec writes it) for COPY's text format: control characters inside strings are
    already escaped by JSON, so only backslashes need doubling."""
    text = value.decode()
    return text.replace("\\", "\\\\") if "\\" in text else text


def _entity_rows(states: dict[str, Any]) -> bytes:
    encode = _encode
    return "".join(
        f"{_text(k)}\t{_json(encode(s))}\t{'t' if s.terminal else 'f'}\t{s.last_event}\n" for k, s in states.items()
    ).encode()


def _dossier_rows(states: dict[str, Any], partitions: dict[str, int], count: int) -> bytes:
    """`_entity_rows` with each dossier's partition and the partition count (both NULL when the
    partition is not known: such a row is read by every shard rebuild and dealt by its key)."""
    encode, get = _encode, partitions.get
    unknown, of_count = f"{NULL}\t{NULL}", f"\t{count}"
    return "".join(
        f"{_text(k)}\t{_json(encode(s))}\t{'t' if s.terminal else 'f'}\t{s.last_event}\t"
        f"{unknown if (p := get(k)) is None or not count else str(p) + of_count}\n"
        for k, s in states.items()
    ).encode()


def _reading_rows(readings: dict[tuple[str, int], tuple[str, Reading]]) -> bytes:
    encode = _encode
    return "".join(
        f"{_text(sid)}\t{t}\t{kind}\t{_text(r.event_id)}\t{_json(encode(r.values))}\n"
        for (sid, t), (kind, r) in readings.items()
    ).encode()


def write_changes(conn: psycopg.Connection[Any], changes: Changes) -> int:
    """Write the changes in one transaction (COPY into staging, then one upsert per table); safe to
    call again with the same changes after a failure.

    Synchronous, for a writer thread: libpq sends and waits without the GIL, so the write goes on
    while the event loop folds the next batch (an async connection only makes progress when the
    loop is free, which a loop busy folding rarely is)."""
    if not len(changes):
        return 0
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(STAGING)
        if changes.dossiers:
            with cur.copy("COPY stage_dossier (id, state, terminal, last_us, part, parts) FROM STDIN") as copy:
                copy.write(_dossier_rows(changes.dossiers, changes.partitions, changes.partition_count))
            cur.execute(MERGE_DOSSIER.encode())
        if changes.incidents:
            with cur.copy("COPY stage_incident (id, state, terminal, last_us) FROM STDIN") as copy:
                copy.write(_entity_rows(changes.incidents))
            cur.execute(MERGE_ENTITY.format(table="incident_state", key="incident_id", kind="incident").encode())
        if changes.readings:
            with cur.copy("COPY stage_reading FROM STDIN") as copy:
                copy.write(_reading_rows(changes.readings))
            cur.execute(MERGE_READING.encode())
    return len(changes)


def _snapshot_rows(snapshots: Sequence[Snapshot], hist: bool) -> str:
    def num(v: float | None) -> str:
        return NULL if v is None else repr(float(v))

    def txt(v: str | None) -> str:
        return NULL if v is None else _text(v)

    encode, flag = _encode, "t" if hist else "f"
    return "".join(
        f"{_text(s.kpi)}\t{_text(s.scope)}\t{_text(s.window)}\t{num(s.value)}\t{_text(s.unit)}\t{num(s.numerator)}\t"
        f"{num(s.denominator)}\t{num(s.target)}\t{txt(s.status)}\t{s.as_of.isoformat()}\t{s.seq}\t"
        f"{NULL if s.extra is None else _json(encode(s.extra))}\t{flag}\t{txt(s.quality)}\n"
        for s in snapshots
    )


async def write_snapshots(
    conn: psycopg.AsyncConnection[Any], snapshots: Sequence[Snapshot], history: Sequence[Snapshot]
) -> None:
    """`kpi_latest` (``snapshots``) and `kpi_history` (``history``) in one transaction: COPY into
    staging, then one upsert each. A snapshot may be in both (staged twice: the latest merge keeps one
    row per series, the history merge reads only the ``hist`` rows), and a history snapshot may be
    older than the series' latest (left pending by an earlier emission): `kpi_latest` keeps the newest."""
    rows = _snapshot_rows(snapshots, False) + _snapshot_rows(history, True)
    if not rows:
        return
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(STAGING)
        async with cur.copy("COPY stage_kpi FROM STDIN") as copy:
            await copy.write(rows.encode())
        await cur.execute(MERGE_LATEST.encode())
        await cur.execute(MERGE_HISTORY.encode())


async def load_entities(
    conn: psycopg.AsyncConnection[Any], engine: Engine, topic: str, keys: set[str], *, agg: Any = None
) -> int:
    """Load the named dossiers or incidents (by logical topic) from the database into the engine
    (or into ``agg``, a worker's shard of the topic)."""
    table, column, decoder = (
        ("dossier_state", "dossier_id", _dossier_decoder)
        if topic == TOPIC_DOSSIER
        else ("incident_state", "incident_id", _incident_decoder)
    )
    if agg is None:
        agg = engine.entities[topic]
    found = 0
    async with conn.cursor(binary=False) as cur:
        await cur.execute(f"SELECT {column}, state::text FROM {table} WHERE {column} = ANY(%s)", (list(keys),))
        async for key, state in cur:
            if key not in agg.states:
                agg.load(key, decoder.decode(state))
                found += 1
    return found


#: What a restart reloads of a state table: every open entity, however old, and the finished ones whose
#: last event is within the horizon. Spelled so that each arm matches one of the two partial indexes
#: on ``last_event_at`` (``terminal`` is never null), which every row is in exactly one of.
RESTART_QUERY = "SELECT {key}, state::text FROM {table} WHERE NOT terminal OR (terminal AND last_event_at >= %s)"


#: What a shard rebuild reads: the restart rows of its partitions, by the partition stored with each
#: row when it was written for the same partition count; rows without one (written by `ioc replay`
#: or an earlier build) or of another count are read too and dealt by their key's hash. No index on
#: the partition: the restart indexes find the rows, the filter keeps the other partitions' rows from
#: being sent and decoded (the cost of a rebuild), and every write stays as cheap as before.
SHARD_QUERY = (
    "SELECT dossier_id, state::text, partition, partitions FROM dossier_state"
    " WHERE (NOT terminal OR (terminal AND last_event_at >= %(horizon)s))"
    " AND (partitions IS DISTINCT FROM %(count)s OR partition = ANY(%(mine)s))"
)


async def load_dossier_shards(
    conn: psycopg.AsyncConnection[Any], shards: dict[int, Any], partitions: int, now_us: int
) -> int:
    """Rebuild the dossier partitions ``shards`` (partition → aggregator) from the database: each
    row goes to the partition stored with it, else to the one its key is produced to (Kafka's
    default partitioner)."""
    from streams.shards import partition_of

    horizon = _ts(now_us - ENTITY_HORIZON_US)
    n = seen = 0
    async with conn.cursor(binary=False) as cur:
        await cur.execute(SHARD_QUERY, {"horizon": horizon, "count": partitions, "mine": sorted(shards)})
        async for key, state, part, count in cur:
            seen += 1
            if seen % YIELD_EVERY == 0:
                # A turn for the event loop: the consumer's heartbeats go on while a worker rebuilds
                # (a loop blocked past the session timeout gets the member thrown out of the group).
                await asyncio.sleep(0)
            agg = shards.get(part if count == partitions else partition_of(key, partitions))
            if agg is not None:
                agg.load(key, _dossier_decoder.decode(state))
                n += 1
    log.debug("dossier partitions %s: %d of %d rows read kept", sorted(shards), n, seen)
    return n


async def load_state(conn: psycopg.AsyncConnection[Any], engine: Engine, *, dossiers: bool = True) -> dict[str, int]:
    """Rebuild the engine from the database: open and recent entities, recent readings, published seqs
    (without the dossiers when the worker's shards hold them: `load_dossier_shards`)."""
    horizon = _ts(engine.now_us - ENTITY_HORIZON_US)
    counts = {"dossiers": 0, "incidents": 0, "readings": 0, "series": 0}
    async with conn.cursor(binary=False) as cur:
        if dossiers:
            await cur.execute(RESTART_QUERY.format(table="dossier_state", key="dossier_id"), (horizon,))
            async for key, state in cur:
                engine.dossiers.load(key, _dossier_decoder.decode(state))
                counts["dossiers"] += 1
                if counts["dossiers"] % YIELD_EVERY == 0:
                    await asyncio.sleep(0)  # heartbeats (see load_dossier_shards)
        await cur.execute(RESTART_QUERY.format(table="incident_state", key="incident_id"), (horizon,))
        async for key, state in cur:
            engine.incidents.load(key, _incident_decoder.decode(state))
            counts["incidents"] += 1
            if counts["incidents"] % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        # Recent readings, and every station's latest one however old (its level has no horizon).
        await cur.execute(
            'SELECT station_id, kind, observed_at, event_id, "values" FROM sensor_reading WHERE observed_at >= %s'
            " UNION"
            ' SELECT * FROM (SELECT DISTINCT ON (station_id) station_id, kind, observed_at, event_id, "values"'
            "   FROM sensor_reading ORDER BY station_id, observed_at DESC) AS latest",
            (_ts(engine.now_us - KEEP_US),),
        )
        async for sid, kind, observed_at, event_id, values in cur:
            if sid not in engine.sensors.stations:
                continue
            event = SensorEvent("ioc.sensor.v1", event_id, sid, kind, observed_at, values)
            delta = observed_at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
            t = (delta.days * 86400 + delta.seconds) * US + delta.microseconds
            engine.sensors.apply(sid, Parsed(event, t), record=False)
            counts["readings"] += 1
        await cur.execute("SELECT kpi || '|' || scope || '|' || win, seq FROM kpi_latest")
        seqs = {key: seq async for key, seq in cur}
        engine.restore_published(seqs)
        counts["series"] = len(seqs)
    return counts


async def load_published_values(conn: psycopg.AsyncConnection[Any]) -> dict[str, tuple[Any, ...]]:
    """Each series' stored value as the engine fingerprints it (value, numerator, denominator, status,
    extra, quality), by ``kpi|scope|window``: what a new merger compares its first emission with."""
    async with conn.cursor(binary=False) as cur:
        await cur.execute(
            "SELECT kpi || '|' || scope || '|' || win, value, numerator, denominator, status, extra, quality"
            " FROM kpi_latest"
        )
        return {key: (v, num, den, status, extra, quality) async for key, v, num, den, status, extra, quality in cur}


__all__ = [
    "Changes",
    "Reading",
    "load_dossier_shards",
    "load_entities",
    "load_published_values",
    "load_state",
    "take_changes",
    "write_changes",
    "write_snapshots",
]
