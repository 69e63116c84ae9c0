"""A shard rebuild reads its own partitions' dossier rows (the partition stored with each row), and still
finds the rows whose partition is not stored or was stored for another partition count (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import psycopg
import pytest

from ioc.registry import load_registry
from ioc.settings import TOPIC_DOSSIER
from simulators.stream import generate
from streams import sink
from streams.engine import DOSSIER, KINDS, EntityAggregator
from streams.shards import partition_of
from streams.worker import now_us

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
PARTITIONS = 4
MINE = [1, 3]


def _states() -> dict[str, Any]:
    registry = load_registry()
    agg = EntityAggregator(DOSSIER, now_us())
    start = dt.datetime.now(VN) - dt.timedelta(minutes=20)
    parse = KINDS[TOPIC_DOSSIER].parse
    for rec in generate(11, start, 10.0, registry=registry, until=start + dt.timedelta(minutes=10)):
        if rec.topic == TOPIC_DOSSIER:
            key, parsed = parse(rec.value, registry, None)
            agg.apply(key, parsed)
    return dict(agg.states)


def test_a_shard_rebuild_reads_its_partitions_rows_and_those_without_a_known_partition(database_url: str) -> None:
    states = _states()
    keys = sorted(states)
    assert len(keys) >= 300
    # A third as the worker writes them now, a third without a partition (`ioc replay`, earlier
    # builds), a third stored when the topic had 3 partitions.
    now_known, unknown, stale = keys[0::3], keys[1::3], keys[2::3]
    with psycopg.connect(database_url, autocommit=True) as conn:
        sink.write_changes(
            conn,
            sink.Changes(
                {k: states[k] for k in now_known},
                {},
                {},
                {k: partition_of(k, PARTITIONS) for k in now_known},
                PARTITIONS,
            ),
        )
        sink.write_changes(conn, sink.Changes({k: states[k] for k in unknown}, {}, {}))
        sink.write_changes(
            conn, sink.Changes({k: states[k] for k in stale}, {}, {}, {k: partition_of(k, 3) for k in stale}, 3)
        )
        # Written again without a partition (a replay): the stored one stays.
        sink.write_changes(conn, sink.Changes({k: states[k] for k in now_known}, {}, {}))
        stored = {
            key: (part, count)
            for key, part, count in conn.execute("SELECT dossier_id, partition, partitions FROM dossier_state")
        }
    assert {k: stored[k] for k in now_known} == {k: (partition_of(k, PARTITIONS), PARTITIONS) for k in now_known}
    assert {stored[k] for k in unknown} == {(None, None)}

    async def rebuild() -> tuple[dict[int, set[str]], list[tuple[str, int | None, int | None]]]:
        shards = {p: EntityAggregator(DOSSIER, now_us()) for p in MINE}
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await sink.load_dossier_shards(conn, shards, PARTITIONS, now_us())
            horizon = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
            cur = await conn.execute(sink.SHARD_QUERY, {"horizon": horizon, "count": PARTITIONS, "mine": MINE})
            sent = [(key, part, count) for key, _, part, count in await cur.fetchall()]
        return {p: set(agg.states) for p, agg in shards.items()}, sent

    loaded, sent = asyncio.run(rebuild())
    assert loaded == {p: {k for k in keys if partition_of(k, PARTITIONS) == p} for p in MINE}
    # The other partitions' rows stored with the current count are not even sent.
    assert all(count != PARTITIONS or part in MINE for _, part, count in sent)
    assert {key for key, _, _ in sent} >= set(unknown) | set(stale)
    assert len(sent) < len(keys)
