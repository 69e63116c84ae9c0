"""Lean consumer records (`ioc.consume`): the worker's consumer gets aiokafka's C records, with the
same offsets, values, keys, timestamps and headers a default consumer sees; other consumers in
the process still get `ConsumerRecord`s."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from entrypoints.embedded.broker import create_topics
from ioc import consume

pytestmark = pytest.mark.integration


async def _read_all(bootstrap: str, topic: str, expected: int, **options: Any) -> dict[TopicPartition, list[Any]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        max_poll_records=50,
        fetch_max_wait_ms=20,
        **options,
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        out: dict[TopicPartition, list[Any]] = {}
        got = 0
        while got < expected:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, f"only {got} of {expected} records arrived"
            for tp, records in batch.items():
                out.setdefault(tp, []).extend(records)
                got += len(records)
        return out
    finally:
        await consumer.stop()


def _fields(tp: TopicPartition, rec: Any) -> tuple[Any, ...]:
    full = consume.full_record(tp, rec)
    return (
        full.topic,
        full.partition,
        full.offset,
        full.timestamp,
        full.timestamp_type,
        full.key,
        full.value,
        full.serialized_key_size,
        full.serialized_value_size,
        tuple(full.headers),
    )


async def test_lean_records_carry_what_consumer_records_carry(kafka_bootstrap: str, topic_prefix: str) -> None:
    assert consume.install(), "this aiokafka's internals are not what ioc.consume expects"
    topic = f"{topic_prefix}lean"
    await create_topics(kafka_bootstrap, [topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [
            await producer.send(
                topic,
                value=None if i % 97 == 3 else f'{{"n":{i}}}'.encode(),
                key=None if i % 5 == 1 else f"k{i % 11}".encode(),
                headers=[("h", b"x")] if i % 7 == 0 else None,
                partition=i % 3,
            )
            for i in range(300)
        ]
        await asyncio.gather(*sent)  # enqueued first: records share batches, as in production
    finally:
        await producer.stop()

    plain = await _read_all(kafka_bootstrap, topic, 300)
    lean = await _read_all(kafka_bootstrap, topic, 300, value_deserializer=consume.RAW)

    assert all(isinstance(r, ConsumerRecord) for records in plain.values() for r in records)
    assert not any(isinstance(r, ConsumerRecord) for records in lean.values() for r in records)
    assert {tp: [_fields(tp, r) for r in rs] for tp, rs in lean.items()} == {
        tp: [_fields(tp, r) for r in rs] for tp, rs in plain.items()
    }
    # Offsets run on without gaps or repeats across the small batches (positions kept right).
    for records in lean.values():
        assert [r.offset for r in records] == list(range(len(records)))
    assert sum(1 for rs in lean.values() for r in rs if r.value is None) == 4


def test_a_consumer_record_is_its_own_full_record() -> None:
    rec = ConsumerRecord("t", 1, 5, 1000, 0, b"k", b"v", None, 1, 1, ())
    assert consume.full_record(TopicPartition("t", 1), rec) is rec


async def test_lean_records_start_at_the_position_and_keep_it(kafka_bootstrap: str, topic_prefix: str) -> None:
    """Fetching from the middle of a record batch skips its earlier records; taking part of a fetch
    leaves the position right after the last record taken."""
    assert consume.install()
    topic = f"{topic_prefix}lean-seek"
    await create_topics(kafka_bootstrap, [topic], partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=str(i).encode(), partition=0) for i in range(100)]
        await asyncio.gather(*sent)  # enqueued first: records share batches, as in production
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=None, fetch_max_wait_ms=20, value_deserializer=consume.RAW
    )
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 37)
        first = (await consumer.getmany(tp, timeout_ms=5000, max_records=10))[tp]
        assert [r.offset for r in first] == list(range(37, 47))
        assert [r.value for r in first] == [str(i).encode() for i in range(37, 47)]
        assert await consumer.position(tp) == 47
        rest = (await consumer.getmany(tp, timeout_ms=5000, max_records=100))[tp]
        assert rest[0].offset == 47
    finally:
        await consumer.stop()
