"""A partition's partial larger than Kafka's default 1 MB limit is published and merged (real broker).

A busy partition's counters pass 1 MB (1.4 MB after a 30-day back-fill): the worker's producer
(`max_request_size`), the partials topic (`max.message.bytes`) and the merger's fetch sizes all
take up to `streams.worker.PARTIAL_MAX_BYTES`. With any of them back at Kafka's default, the
publication fails and the merger never sees the partition's counters: this test fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import Registry, load_registry
from ioc.settings import TOPIC_DOSSIER, Settings
from simulators.stream import generate
from streams import shards
from streams.engine import DOSSIER, KINDS, EntityAggregator
from streams.kpi import US_PER_MIN
from streams.worker import Ingest, now_us

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
#: Bigger than Kafka's default limits (1 MB messages, 1 MiB requests and partition fetches).
LARGE = 3 << 20


def _large_shard(registry: Registry, at_us: int) -> EntityAggregator:
    """A shard of real dossiers, then its series filled with counts over the last 20 hours, minute by
    minute, until its partial is larger than `LARGE` (as a busy partition's is after a back-fill)."""
    agg = EntityAggregator(DOSSIER, at_us)
    start = dt.datetime.fromtimestamp(at_us / 1e6, VN) - dt.timedelta(minutes=30)
    parse = KINDS[TOPIC_DOSSIER].parse
    for rec in generate(5, start, 20.0, registry=registry, until=start + dt.timedelta(minutes=20)):
        if rec.topic == TOPIC_DOSSIER:
            key, parsed = parse(rec.value, registry, None)
            agg.apply(key, parsed)
    agg.counters.flush()
    keys = sorted(agg.counters.series)
    minute = 0
    while len(shards.encode_partial(TOPIC_DOSSIER, 0, shards.Stamp(0, 0, 0), agg)) <= LARGE:
        for k in range(200):  # 200 more minutes of every series, then measure again
            ts = at_us - ((minute + k) % 1200 + 1) * US_PER_MIN
            for name, scope in keys:
                agg.counters.add(name, (scope,), ts, 1)
        minute += 200
        agg.counters.flush()
    return agg


def _buckets(series: dict[tuple[str, str], Any]) -> dict[tuple[str, str], tuple[Any, ...]]:
    return {key: (dict(s.minutes), dict(s.days), dict(s.months)) for key, s in series.items()}


async def _publish_and_merge(settings: Settings) -> tuple[int, int]:
    """An in-process worker (the group's only member: the merger) publishes one of its partitions'
    counters as a partial larger than `LARGE`; its merged view is made to read that partition from the
    partials topic, not from memory. Returns (the partial's size, partitions the merged view holds)."""
    registry = load_registry()
    ingest = Ingest(settings, registry)
    await ingest.start()
    try:
        deadline = time.monotonic() + 60
        while not ingest.merger or not ingest.shards:
            assert time.monotonic() < deadline, "the worker was not assigned its partitions in 60 s"
            await asyncio.sleep(0.1)
        await ingest.emit()
        p = min(ingest.shards)
        large = _large_shard(registry, now_us())
        size = len(shards.encode_partial(TOPIC_DOSSIER, p, ingest.stamps[p], large, settings.consumer_group))
        assert size > LARGE
        merged = ingest.engine.dossiers
        assert isinstance(merged, shards.MergedAggregator)
        async with ingest.emit_lock:
            ingest.shards[p] = large
            ingest.unpublished_shards.add(p)
            # The merger then knows the partition only from the partials it reads back.
            del merged.parts[p]
        # Its buckets are within the last 20 hours: moving the clock on (as publishing does) keeps them.
        expected = _buckets(large.counters.series)
        deadline = time.monotonic() + 60
        # The partition's earlier, small partial (published by the first emission) may be read back
        # first: wait for the large one, which carries every bucket.
        while p not in merged.parts or _buckets(merged.parts[p].counters.series) != expected:
            held = len(merged.parts[p].counters.series) if p in merged.parts else None
            assert time.monotonic() < deadline, (
                f"partition {p}'s partial of {size:,} bytes was not merged in 60 s (merged series: {held})"
            )
            await ingest.emit()
            await asyncio.sleep(0.2)
        return size, len(merged.parts)
    finally:
        await ingest.stop()


def test_a_partial_larger_than_one_megabyte_is_published_and_merged(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(topic_partitions=2)
    ensure_topics(settings)
    size, held = asyncio.run(_publish_and_merge(settings))
    assert held == 2
    print({"partial_bytes": size})
