"""What the reliability tests compare: offsets the worker committed, KPIs in the database and on
`ioc.kpi.updates`, and `ioc replay` of the same input (the oracle)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from ioc.registry import load_registry
from ioc.settings import INPUT_TOPICS, TOPIC_DEADLETTER, TOPIC_KPI, Settings
from streams.replay import replay

FIELDS = ("value", "numerator", "denominator", "target", "status", "unit", "extra", "quality")
Key = tuple[str, str, str]


async def input_size(settings: Settings) -> int:
    """How many records the input topics hold (the sum of their end offsets)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(input_partitions(settings))).values())
    finally:
        await consumer.stop()


async def produce(settings: Settings, records: Iterable[Any], *, pause_every: int = 0, pause_s: float = 0.0) -> int:
    """Send simulator records (``.topic``, ``.key``, ``.value``) and wait for every acknowledgement."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10)
    await producer.start()
    sent = 0
    try:
        for r in records:
            await producer.send(settings.topic(r.topic), r.value, key=r.key)
            sent += 1
            if pause_every and sent % pause_every == 0:
                await producer.flush()
                await asyncio.sleep(pause_s)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def input_partitions(settings: Settings) -> list[TopicPartition]:
    return [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.topic_partitions)]


async def committed(settings: Settings) -> dict[TopicPartition, int]:
    """The worker group's committed input offsets (0 where none), read with the admin API as an
    operator's tools read them (`kafka-consumer-groups --describe`), without joining the group."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.consumer_group)
    finally:
        await admin.close()
    return {tp: offsets[tp].offset if tp in offsets else 0 for tp in input_partitions(settings)}


async def lag(settings: Settings) -> int:
    """Input records not yet committed by the worker's group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(input_partitions(settings))
    finally:
        await consumer.stop()
    done = await committed(settings)
    return sum(end - done[tp] for tp, end in ends.items())


async def read_topic(settings: Settings, name: str, *, idle_polls: int = 4) -> list[Any]:
    """Every record of a topic, from the beginning, until it has been quiet for a while."""
    consumer = AIOKafkaConsumer(settings.topic(name), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", fetch_max_bytes=64 << 20)  # fmt: skip
    await consumer.start()
    out: list[Any] = []
    try:
        idle = 0
        while idle < idle_polls:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def topic_latest(settings: Settings) -> dict[Key, dict[str, Any]]:
    """The last snapshot (highest seq) of every KPI on `ioc.kpi.updates`."""
    latest: dict[Key, dict[str, Any]] = {}
    for r in await read_topic(settings, TOPIC_KPI, idle_polls=6):
        doc = json.loads(r.value)
        key = (doc["kpi"], doc["scope"], doc["window"])
        if key not in latest or doc["seq"] > latest[key]["seq"]:
            latest[key] = doc
    return {k: {f: v.get(f) for f in FIELDS} for k, v in latest.items()}


async def deadletters(settings: Settings) -> list[Any]:
    return await read_topic(settings, TOPIC_DEADLETTER)


def database_latest(url: str) -> tuple[dt.datetime, dict[Key, dict[str, Any]]]:
    """``kpi_latest`` as {(kpi, scope, window): fields}, with the newest ``as_of``."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT kpi, scope, win, value, numerator, denominator, target, status, unit, extra, quality, as_of"
            " FROM kpi_latest"
        ).fetchall()
    as_of = max(r[11] for r in rows)
    return as_of, {(r[0], r[1], r[2]): dict(zip(FIELDS, r[3:11], strict=True)) for r in rows}


def replayed(path: Path, as_of: dt.datetime) -> dict[Key, dict[str, Any]]:
    """`ioc replay` of an input file at ``as_of``: what every KPI must be."""
    snapshots, _, _ = replay(path, load_registry(), as_of, with_alerts=False)
    return {(s.kpi, s.scope, s.window): {f: getattr(s, f) for f in FIELDS} for s in snapshots}


def differences(actual: dict[Key, dict[str, Any]], expected: dict[Key, dict[str, Any]]) -> dict[Key, Any]:
    """Keys whose fields differ (JSON-normalised), or that only one side has."""

    def norm(v: dict[str, Any] | None) -> Any:
        return None if v is None else json.loads(json.dumps(v, default=str))

    def differ(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
        return a != b and norm(a) != norm(b)

    keys = actual.keys() | expected.keys()
    return {k: (actual.get(k), expected.get(k)) for k in keys if differ(actual.get(k), expected.get(k))}


class FeedWatcher:
    """A WebSocket client of ``ioc api`` in a thread: subscribes to channels and keeps the newest
    item of every KPI it is sent, the time of each update, and whether the connection was lost."""

    def __init__(self, port: int, token: str, channels: list[str]) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.token = token
        self.channels = channels
        self.latest: dict[Key, dict[str, Any]] = {}
        self.updates: list[float] = []
        self.closed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feed-watcher", daemon=True)
        self._subscribed = threading.Event()

    def start(self, timeout: float = 20.0) -> FeedWatcher:
        self._thread.start()
        if not self._subscribed.wait(timeout):
            raise AssertionError(f"no snapshot from {self.url} in {timeout:.0f} s (closed: {self.closed})")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def items(self) -> dict[Key, dict[str, Any]]:
        return {k: {f: v.get(f) for f in FIELDS} for k, v in list(self.latest.items())}

    def _keep(self, item: dict[str, Any]) -> None:
        key = (item["kpi"], item["scope"], item["window"])
        if key not in self.latest or item["seq"] >= self.latest[key]["seq"]:
            self.latest[key] = item

    def _run(self) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        try:
            with connect(self.url, subprotocols=["bearer", self.token], open_timeout=10) as ws:  # type: ignore[list-item]
                ws.send(json.dumps({"type": "subscribe", "channels": self.channels}))
                while not self._stop.is_set():
                    try:
                        message = json.loads(ws.recv(timeout=0.5))
                    except TimeoutError:
                        continue
                    if message["type"] == "snapshot":
                        for item in message["items"]:
                            self._keep(item)
                        self._subscribed.set()
                    elif message["type"] == "update":
                        self._keep(message["item"])
                        self.updates.append(time.monotonic())
        except ConnectionClosed as exc:
            self.closed = f"closed: {exc}"
        except OSError as exc:
            self.closed = f"{type(exc).__name__}: {exc}"


def agreed(
    loop: asyncio.AbstractEventLoop, settings: Settings, database_url: str, path: Path, within_s: float = 20.0
) -> tuple[dict[Key, dict[str, Any]], dict[Key, Any], dict[Key, Any]]:
    """A replay as of the database's clock, and how the database and the topic differ from it, taken
    at a moment both agree with it (or at the last try). An emission publishes before it writes the
    database, and clock-driven KPIs keep moving, so a single look can catch the two an emission
    apart; a lost or stale update never agrees."""
    deadline = time.monotonic() + within_s
    while True:
        as_of, database = database_latest(database_url)
        expected = replayed(path, as_of)
        topic = loop.run_until_complete(topic_latest(settings))
        in_database, on_topic = differences(database, expected), differences(topic, expected)
        if (not in_database and not on_topic) or time.monotonic() > deadline:
            return expected, in_database, on_topic
        time.sleep(1)
