"""More than 10,000 hostile records through the real worker: it neither crashes nor stalls, and every
record is either counted or dead-lettered with a reason (counted + dead-lettered = produced)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import TOPIC_DEADLETTER, Settings
from simulators.stream import generate
from streams.worker import Ingest

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
PER_KIND = 850


def _hostile(rng: random.Random, valid: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, str, bytes]]:
    """(category, topic, bytes): every one of them invalid by construction."""
    for n in range(PER_KIND):
        topic, doc = valid[n % len(valid)]
        raw = json.dumps(doc).encode()
        time_field = "observed_at" if "observed_at" in doc else "occurred_at"
        yield "truncated", topic, raw[: rng.randrange(1, len(raw) - 1)]
        yield "bad_utf8", topic, raw.replace(b'"schema"', b'"sch\xffema"', 1)
        yield "wrong_type", topic, json.dumps({**doc, "event_id": rng.randrange(10**9)}).encode()
        yield "missing", topic, json.dumps({k: v for k, v in doc.items() if k != "schema"}).encode()
        yield "nan", topic, raw.replace(f'"{time_field}"'.encode(), b'"x": NaN, "' + time_field.encode() + b'"', 1)
        yield "future", topic, json.dumps({**doc, time_field: "2150-01-01T00:00:00+07:00"}).encode()
        yield "ancient", topic, json.dumps({**doc, time_field: "1900-01-01T00:00:00+07:00"}).encode()
        yield "not_object", topic, json.dumps([doc]).encode()
        yield "schema_version", topic, json.dumps({**doc, "schema": doc["schema"][:-1] + "9"}).encode()
        if "station_id" in doc:
            yield "unknown_station", topic, json.dumps({**doc, "station_id": f"NOPE-{n}"}).encode()
            values = {k: -rng.uniform(0.1, 1000) for k in doc["values"]}
            yield "negative", topic, json.dumps({**doc, "values": values}).encode()
            yield "infinity", topic, raw.replace(b'"values": {', b'"values": {"pm25": 1e999, ', 1)
        else:
            yield "unknown_commune", topic, json.dumps({**doc, "commune_code": "99999"}).encode()
            yield "no_offset", topic, json.dumps({**doc, time_field: "2026-11-22T08:00:00"}).encode()
            yield "bad_enum", topic, json.dumps({**doc, "type": "exploded"}).encode()
        if n % 10 == 0:
            yield "oversized", topic, json.dumps({**doc, "title": "x" * 70_000}).encode()
            yield "deep", topic, b'{"a":' + b"[" * 20_000 + b"]" * 20_000 + b"}"


async def _run(settings: Settings) -> dict[str, Any]:
    now = dt.datetime.now(VN)
    records = list(generate(13, now - dt.timedelta(minutes=10), 5.0, None, 0.05, 0.05, 0.0, until=now))
    valid = [(r.topic, json.loads(r.value)) for r in records if not r.duplicate]
    hostile = list(_hostile(random.Random(6), valid))
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10, max_request_size=4 << 20)
    await producer.start()
    try:
        for r in records:
            await producer.send(settings.topic(r.topic), r.value, key=r.key)
        for _, topic, raw in hostile:
            await producer.send(settings.topic(topic), raw, key=b"hostile")
        await producer.flush()
    finally:
        await producer.stop()
    produced = len(records) + len(hostile)
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    try:
        assert ingest.consumer is not None
        idle = 0
        while ingest.stats["records"] < produced:
            batch = await ingest.gather(1000)
            if batch:
                await ingest.process(batch)
                idle = 0
            else:
                idle += 1
                assert idle < 30, f"stalled at {ingest.stats['records']} of {produced}"
        await ingest.drain()
        stats = dict(ingest.stats)
    finally:
        await ingest.stop()
    dead = AIOKafkaConsumer(settings.topic(TOPIC_DEADLETTER), bootstrap_servers=settings.kafka_bootstrap,
                            auto_offset_reset="earliest", fetch_max_bytes=64 << 20)  # fmt: skip
    await dead.start()
    letters: list[dict[str, bytes]] = []
    try:
        idle = 0
        while len(letters) < stats["deadlettered"] and idle < 20:
            batch = await dead.getmany(timeout_ms=500)
            idle = 0 if batch else idle + 1
            letters.extend(dict(r.headers) for recs in batch.values() for r in recs)
    finally:
        await dead.stop()
    return {"produced": produced, "hostile": len(hostile), "kinds": Counter(c for c, _, _ in hostile),
            "stats": stats, "letters": letters}  # fmt: skip


def test_ten_thousand_hostile_records_are_all_dead_lettered_with_a_reason_and_nothing_is_lost(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    result = asyncio.run(_run(settings))
    stats = result["stats"]
    assert result["hostile"] >= 10_000
    assert stats["records"] == result["produced"]  # everything was read; the worker kept going
    assert stats["deadlettered"] == result["hostile"]  # every hostile record, and only those
    letters = result["letters"]
    assert len(letters) == result["hostile"]
    assert all(h["ioc.error.reason"] and h["ioc.error.stage"] in (b"decode", b"schema", b"validate") for h in letters)
    assert all(h["ioc.source.topic"] and h["ioc.source.offset"] for h in letters)
