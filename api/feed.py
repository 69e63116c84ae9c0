"""The API's live feed: every KPI snapshot and alert from Kafka (no consumer group) to the clients.

Each API replica reads every partition itself, starting at the end, so N replicas each see every
update. Before reading, the current values are (re)loaded from ``kpi_latest``: a client's
snapshot is complete before the first update arrives, and after a broker outage nothing missed
stays missed. Per-key ``seq`` makes the order of database rows and topic records irrelevant.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

import msgspec
import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from api.live import LiveState
from ioc.metrics import ApiMetrics
from ioc.settings import FETCH_MAX_WAIT_MS, TOPIC_ALERTS, TOPIC_KPI, Settings
from ioc.snapshot import Snapshot, decode

log = logging.getLogger(__name__)


LATEST_QUERY = """
SELECT kpi, scope, win, value, unit, numerator, denominator, target, status, as_of, seq, extra, quality
FROM kpi_latest
"""


def row_to_snapshot(row: tuple[Any, ...]) -> Snapshot:
    """A ``kpi_latest`` row as a Snapshot (the column ``win`` is the snapshot's ``window``)."""
    kpi, scope, win, value, unit, num, den, target, status, as_of, seq, extra, *rest = row
    quality = rest[0] if rest else None
    if isinstance(as_of, dt.datetime) and as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=dt.UTC)
    return Snapshot(
        kpi=kpi,
        scope=scope,
        window=win,
        value=value,
        unit=unit,
        numerator=num,
        denominator=den,
        target=target,
        status=status,
        as_of=as_of,
        seq=int(seq),
        extra=extra,
        quality=quality,
    )


async def load_latest(database_url: str, live: LiveState, *, timeout_s: float = 10.0) -> int:
    """Put every ``kpi_latest`` row into the live state; returns how many rows changed it."""
    changed = 0
    async with (
        await psycopg.AsyncConnection.connect(
            database_url, autocommit=True, connect_timeout=max(1, int(timeout_s))
        ) as conn,
        conn.cursor() as cur,
    ):
        await cur.execute(LATEST_QUERY)
        async for row in cur:
            if live.apply_snapshot(row_to_snapshot(row)):
                changed += 1
    return changed


class Feed:
    """The background task of one API process: load the database, then follow the topics."""

    def __init__(
        self, settings: Settings, live: LiveState, *, retry_max_s: float = 30.0, metrics: ApiMetrics | None = None
    ) -> None:
        self.settings = settings
        self.live = live
        # labelled by the contract's topic names, so dashboards do not depend on IOC_TOPIC_PREFIX
        metrics = metrics or ApiMetrics()
        self._kpi_updates = metrics.feed_updates.labels(TOPIC_KPI)
        self._alert_updates = metrics.feed_updates.labels(TOPIC_ALERTS)
        self.retry_max_s = retry_max_s
        self.kpi_topic = settings.topic(TOPIC_KPI)
        self.alerts_topic = settings.topic(TOPIC_ALERTS)
        self.loaded = False
        self.consuming = False
        self.records = 0
        self.invalid = 0
        self.last_record_at: dt.datetime | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "consuming": self.consuming,
            "records": self.records,
            "invalid": self.invalid,
            "kpis": len(self.live.table),
            "last_record_at": self.last_record_at.isoformat() if self.last_record_at else None,
        }

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="ioc-api-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def load(self) -> bool:
        try:
            changed = await load_latest(self.settings.database_url, self.live)
        except (psycopg.Error, OSError) as exc:
            log.warning("cannot load kpi_latest (%s); serving what is held", type(exc).__name__)
            return False
        self.loaded = True
        log.info("loaded current KPI values: %d changed, %d held", changed, len(self.live.table))
        return True

    async def run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._consume()
                delay = 1.0
            except asyncio.CancelledError:
                raise
            except (KafkaError, OSError) as exc:
                log.warning("KPI feed lost the broker (%s); retrying in %.0f s", exc, delay)
            except Exception:
                log.exception("KPI feed failed; retrying in %.0f s", delay)
            self.consuming = False
            if not self.loaded:
                await self.load()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        while True:
            existing = await consumer.topics()  # asks the cluster, but into a metadata copy of its own
            if self.kpi_topic in existing and consumer.partitions_for_topic(self.kpi_topic) is None:
                # Kafka's answer to the client's bootstrap lists no topics: load every topic's metadata.
                await consumer._client.force_metadata_update()
            found: list[TopicPartition] = []
            for topic in (self.kpi_topic, self.alerts_topic):
                if topic in existing:
                    parts = consumer.partitions_for_topic(topic) or set()
                    found.extend(TopicPartition(topic, p) for p in sorted(parts))
            if any(tp.topic == self.kpi_topic for tp in found):
                return found
            log.info("waiting for topic %s to exist", self.kpi_topic)
            if not self.loaded:
                await self.load()
            await asyncio.sleep(2.0)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="ioc-api",
            request_timeout_ms=15000,
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        )
        await consumer.start()
        try:
            partitions = await self._partitions(consumer)
            consumer.assign(partitions)
            await consumer.seek_to_end(*partitions)
            # positions first, then the database: whatever happens in between is in one or the other
            for tp in partitions:
                await consumer.position(tp)
            await self.load()
            self.consuming = True
            log.info("KPI feed consuming %d partitions", len(partitions))
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
                for tp, records in batches.items():
                    for record in records:
                        self.handle(tp.topic, record.value)
        finally:
            self.consuming = False
            await consumer.stop()

    def handle(self, topic: str, value: bytes | None) -> None:
        """Apply one record of a feed topic (what the consumer loop calls for each)."""
        self.records += 1
        self.last_record_at = dt.datetime.now(dt.UTC)
        if value is None:
            return
        try:
            if topic == self.kpi_topic:
                self.live.apply_snapshot(decode(value))
                self._kpi_updates.inc()
            else:
                alert = orjson.loads(value)
                if not isinstance(alert, dict):
                    raise ValueError("alert is not a JSON object")
                self.live.apply_alert(alert)
                self._alert_updates.inc()
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self.invalid += 1
            if self.invalid <= 10 or self.invalid % 1000 == 0:
                log.warning("undecodable record on %s (%d so far): %s", topic, self.invalid, exc)
