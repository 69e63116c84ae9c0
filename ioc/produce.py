"""Producing many records fast: Kafka's default key partitioning remembered per key, and batches
built per partition.

aiokafka hashes every key with a pure-Python murmur2 (about 30 µs a call here): for the worker,
which publishes the same ~12,000 KPI keys (``kpi|scope|window``) again and again, that was half
the cost of publishing a snapshot. The partition chosen is exactly the default partitioner's, so
consumers and other producers agree on where a key lives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

log = logging.getLogger(__name__)

#: How long stopping a Kafka client may take before the process gives up on it and goes on.
STOP_TIMEOUT_S = 10.0


class Stoppable(Protocol):
    async def stop(self) -> None: ...


async def stop_within(client: Stoppable, what: str, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop an aiokafka client, giving up after ``timeout_s``; False (and a warning) if it did not stop.

    aiokafka's ``stop`` can wait for ever when the broker cannot be reached (aiokafka issue #1101,
    open: a producer's ``stop`` with the broker down). A process that is stopping must still stop;
    what the client had not delivered by then is what a crash would not have delivered either, and
    the log says so.
    """
    try:
        await asyncio.wait_for(client.stop(), timeout_s)
    except TimeoutError:
        log.warning("%s did not stop within %g s: left behind", what, timeout_s)
        return False
    return True


class CachingPartitioner:
    """A drop-in ``partitioner=`` for `AIOKafkaProducer`: the default partitioner, with a bounded memory."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._default = DefaultPartitioner()
        self._known: dict[tuple[bytes, int], int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if len(all_partitions) == 1:  # e.g. ioc.kpi.updates: no hash needed to choose
            return all_partitions[0]
        if key is None:  # no key: any partition (the default's random choice)
            return int(self._default(key, all_partitions, available))
        slot = (key, len(all_partitions))
        partition = self._known.get(slot)
        if partition is None:
            if len(self._known) >= self.max_keys:
                self._known.clear()  # rare distinct keys (dead letters) must not grow it for ever
            partition = self._known[slot] = int(self._default(key, all_partitions, available))
        return partition


class BatchSender:
    """Sends many keyed records with one ``send_batch`` per partition and full batch, instead of one
    ``send`` (a coroutine, a partitioner call and an accumulator lookup) per record."""

    def __init__(self, producer: AIOKafkaProducer, partitioner: CachingPartitioner | None = None) -> None:
        self.producer = producer
        self.partitioner = partitioner or CachingPartitioner()
        self._partitions: dict[str, list[int]] = {}

    async def partitions(self, topic: str) -> list[int]:
        found = self._partitions.get(topic)
        if found is None:
            found = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return found

    async def send(self, records: Iterable[tuple[str, bytes, bytes]]) -> list[asyncio.Future[Any]]:
        """Hand ``(topic, key, value)`` records to the producer; returns the batches' futures, which
        resolve when the broker has them (or fail with the broker's error)."""
        producer, partitioner = self.producer, self.partitioner
        batches: dict[tuple[str, int], Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for topic, key, value in records:
            parts = self._partitions.get(topic) or await self.partitions(topic)
            p = partitioner(key, parts, parts)
            batch = batches.get((topic, p))
            if batch is None:
                batch = batches[(topic, p)] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:  # full
                batch.close()
                futures.append(await producer.send_batch(batch, topic, partition=p))
                batch = batches[(topic, p)] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        for (topic, p), batch in batches.items():
            batch.close()
            futures.append(await producer.send_batch(batch, topic, partition=p))
        return futures

    async def send_and_wait(self, records: Iterable[tuple[str, bytes, bytes]]) -> None:
        futures = await self.send(records)
        if futures:
            await asyncio.gather(*futures)
