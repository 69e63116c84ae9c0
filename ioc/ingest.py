"""Producing what the doors accept (HTTP ingest, MQTT bridge): acks=all, a bound on records in flight, recent event_ids.

A record is reported accepted only once the broker has acknowledged it with ``acks=all`` (every
in-sync replica has it). The producer is not idempotent, like the worker's: aiokafka's idempotent
producer can stay stuck after a broker outage (aiokafka #1017), and a record sent twice is counted
once downstream anyway.

`RecentIds` is a bounded, per-process memory of the event_ids a door has had acknowledged: a
retried request answers them ``duplicate`` without producing again. It is not shared between
processes and is lost on restart; what slips past it reaches the topic twice and the worker's
merge, idempotent by event_id, counts it once (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter

from ioc.errors import IocError
from ioc.produce import stop_within
from ioc.settings import Settings

log = logging.getLogger(__name__)

#: How long the broker may take to acknowledge a record before the door answers 503 for it.
ACK_TIMEOUT_S = 15.0

Headers = list[tuple[str, bytes]]


class Overloaded(IocError):
    """Too many records are waiting for the broker's acknowledgement: the caller should retry later."""

    def __init__(self, in_flight: int, limit: int) -> None:
        self.in_flight = in_flight
        self.limit = limit
        super().__init__(f"{in_flight} records are waiting for the broker (limit {limit}); retry shortly")


class RecentIds:
    """The last ``size`` (topic, event_id) pairs acknowledged by the broker, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item: tuple[str, str]) -> None:
        if self.size <= 0:
            return
        self._ids[item] = None
        self._ids.move_to_end(item)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


#: Seconds between attempts to reach the broker while a door's producer is not connected.
RECONNECT_EVERY_S = 3.0


async def start_producer(settings: Settings, client_id: str) -> AIOKafkaProducer:
    """A started producer with ``acks=all`` (not idempotent: see the module's docstring)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=2,
        client_id=client_id,
        request_timeout_ms=int(ACK_TIMEOUT_S * 1000),
    )
    try:
        await producer.start()
    except BaseException:
        await stop_within(producer, f"{client_id}'s producer")
        raise
    return producer


class DoorProducer:
    """One door's producer: bounded records in flight, acknowledged sends, recent event_ids."""

    def __init__(self, settings: Settings, client_id: str, *, max_in_flight: int | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.max_in_flight = max_in_flight or settings.ingest_max_in_flight
        self.recent = RecentIds(settings.ingest_recent_ids)
        #: (topic, event_id) being sent now: a second request with the same id waits for the first.
        self.pending: dict[tuple[str, str], asyncio.Future[Any]] = {}
        self.in_flight = 0
        self.producer: AIOKafkaProducer | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def start(self, *, in_background: bool = False) -> None:
        """Connect the producer. ``in_background``: if the broker cannot be reached now, go on
        trying every few seconds and return at once (sends fail, answered 503, until then), so an
        API process starts and serves its other routes during a broker outage."""
        if not in_background:
            self.producer = await start_producer(self.settings, self.client_id)
            return
        try:
            self.producer = await start_producer(self.settings, self.client_id)
        except KafkaError as exc:
            log.warning("%s: the broker cannot be reached (%s); ingest answers 503 until it can", self.client_id, exc)
            self._connecting = asyncio.create_task(self._connect_until_up())

    async def _connect_until_up(self) -> None:
        while True:
            await asyncio.sleep(RECONNECT_EVERY_S)
            try:
                self.producer = await start_producer(self.settings, self.client_id)
            except KafkaError:
                continue
            log.info("%s: connected to the broker", self.client_id)
            return

    async def stop(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
            self._connecting = None
        if self.producer is not None:
            await stop_within(self.producer, f"{self.client_id}'s producer")
            self.producer = None

    def reserve(self, n: int) -> None:
        """Count ``n`` records in flight, or raise `Overloaded` (the caller answers 429)."""
        if self.in_flight + n > self.max_in_flight and self.in_flight > 0:
            raise Overloaded(self.in_flight, self.max_in_flight)
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n

    async def send(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None) -> Any:
        """Hand a record of logical ``topic`` to the producer; returns the future of the broker's acknowledgement."""
        if self.producer is None:
            raise KafkaError("the producer is not started")
        return await self.producer.send(self.settings.topic(topic), value=value, key=key, headers=headers)


def dead_letter_headers(stage: str, reason: str, source_topic: str) -> Headers:
    """The contract's dead-letter headers for a record refused before it had a partition or offset
    (an MQTT message: ``ioc.source.topic`` is its MQTT topic; partition and offset are -1)."""
    return [
        ("ioc.error.stage", stage.encode()),
        ("ioc.error.reason", reason[:1000].encode("utf-8", "replace")),
        ("ioc.source.topic", source_topic.encode("utf-8", "replace")),
        ("ioc.source.partition", b"-1"),
        ("ioc.source.offset", b"-1"),
    ]


def ingest_counter(registry: CollectorRegistry) -> Counter:
    """Records through a door, by door (http, mqtt), source and result (accepted, duplicate, rejected, failed)."""
    return Counter(
        "ioc_ingest_records_total",
        "Records offered at an ingest door, by door, source and result",
        ["door", "source", "result"],
        registry=registry,
    )
