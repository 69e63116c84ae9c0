"""The events a benchmark offers: a simulated backlog (from `simulators.stream`) and paced dossier intake."""

from __future__ import annotations

import datetime as dt
import itertools
import multiprocessing
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from ioc.produce import BatchSender
from ioc.settings import TOPIC_DOSSIER, Settings

#: Records per chunk passed from the generating process to the producer.
CHUNK = 5000
#: Simulated arrival rate of the backlog: 1,000,000 events span about 200 s of event time.
BACKLOG_RATE_PER_S = 5000.0

Record = tuple[str, bytes, bytes]


def _generate_chunks(n: int, start_us: int, seed: int, out: Any) -> None:
    """In a child process: ``n`` simulated records (topic, key, value), sent to ``out`` in chunks."""
    from simulators.stream import generate

    start = dt.datetime.fromtimestamp(start_us / 1e6, dt.UTC)
    records = itertools.islice(generate(seed, start, BACKLOG_RATE_PER_S, dup_rate=0.01, ooo_rate=0.02), n)
    chunk: list[Record] = []
    for r in records:
        chunk.append((r.topic, r.key, r.value))
        if len(chunk) >= CHUNK:
            out.put(chunk)
            chunk = []
    if chunk:
        out.put(chunk)
    out.put(None)


def backlog_chunks(n: int, seed: int = 348) -> Iterator[list[Record]]:
    """``n`` records of the simulator's realistic mix, generated in a second process, event times ending now."""
    span_s = n / BACKLOG_RATE_PER_S
    start_us = int((time.time() - span_s - 60.0) * 1e6)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue(maxsize=64)
    proc = ctx.Process(target=_generate_chunks, args=(n, start_us, seed, queue), daemon=True)
    proc.start()
    try:
        while True:
            chunk = queue.get()
            if chunk is None:
                return
            yield chunk
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()


class FastProducer:
    """Writes records with per-partition batches (`ioc.produce.BatchSender`), keyed like Kafka's default partitioner."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, max_batch_size=1 << 20)
        self.sender = BatchSender(self.producer)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def send_all(self, records: list[Record]) -> None:
        """Send ``records`` (topic already prefixed) and wait until the broker has them."""
        await self.sender.send_and_wait(records)


async def produce_backlog(settings: Settings, n: int, *, label: str = "backlog") -> dict[str, Any]:
    """Put ``n`` simulated records on the input topics; progress on stderr. Returns counts and timing."""
    producer = FastProducer(settings.kafka_bootstrap)
    await producer.start()
    sent = 0
    by_topic: dict[str, int] = {}
    started = time.monotonic()
    next_report = started + 2.0
    try:
        for chunk in backlog_chunks(n):
            records = [(settings.topic(t), k, v) for t, k, v in chunk]
            for t, _, _ in chunk:
                by_topic[t] = by_topic.get(t, 0) + 1
            await producer.send_all(records)
            sent += len(records)
            now = time.monotonic()
            if now >= next_report:
                progress(f"{label}: {sent:,}/{n:,} produced ({sent / (now - started):,.0f}/s)")
                next_report = now + 2.0
    finally:
        await producer.stop()
    elapsed = time.monotonic() - started
    progress(f"{label}: {sent:,} produced in {elapsed:.1f} s")
    return {"events": sent, "by_topic": by_topic, "seconds": round(elapsed, 3)}


def progress(message: str) -> None:
    """One progress line on stderr (the figures go to stdout)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


class DossierIntake:
    """Valid dossier ``received`` events with unique ids, occurred now: what the latency runs pace."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.count = 0

    def next(self) -> tuple[bytes, bytes]:
        self.count += 1
        now = dt.datetime.now(dt.UTC)
        dossier_id = f"BENCH-{self.run}-{self.count:08d}"
        value = {
            "schema": "ioc.dossier.v1",
            "event_id": str(uuid.uuid4()),
            "dossier_id": dossier_id,
            "type": "received",
            "occurred_at": now.isoformat(timespec="milliseconds"),
            "commune_code": "16941",
            "agency_code": "000.37.70.H40",
            "procedure_code": "1.000894",
            "channel": "online",
            "full_online": True,
            "due_at": (now + dt.timedelta(days=3)).isoformat(timespec="milliseconds"),
        }
        return dossier_id.encode(), orjson.dumps(value)


def dossier_topic(settings: Settings) -> str:
    return settings.topic(TOPIC_DOSSIER)
