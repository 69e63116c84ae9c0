"""The stream worker: a Faust app for the lifecycle, an aiokafka batch pipeline for the records.

Faust provides the app's lifecycle only: starting and stopping the `Ingest` service's tasks,
signal handling and logging set-up. It consumes and produces nothing itself: `Ingest` builds its
own aiokafka consumer and producer. Why not one Faust agent per topic: Faust hands every record
from its consumer thread through the conductor and a stream queue to the agent, and
`Consumer._drain_messages` awaits ``wait_first(callback(message), suspend_flow.wait())`` for each
record, two tasks and a queue hand-off per event; measured here, that path tops out near 6,000
events/s with the process mostly idle. `Ingest` takes records from aiokafka in batches
(``getmany``), validates and folds each batch into the pure `Engine`, writes what changed in one
transaction, and only then commits the batch's offsets (at-least-once; every effect idempotent).

Over 600 lines: `Ingest` still holds the pipeline's jobs (fetch, validate, fold, flush and commit,
emit, maintenance, the shard hand-over); splitting it by job is the next step after the scale-out.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import faust
import mode
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import ConsumerStoppedError, InvalidSessionTimeoutError, KafkaError, TopicAlreadyExistsError
from prometheus_client import start_http_server

from ioc import settings as cfg
from ioc.compat.aiokafka import heartbeat_while_assigning
from ioc.consume import RAW, LeanRecord, full_record
from ioc.consume import install as lean_records
from ioc.contract import US
from ioc.db.migrate import Storage, drop_expired, ensure_partitions, refresh_rollups, storage_of
from ioc.errors import InvalidEvent
from ioc.loop import install as install_loop
from ioc.loop import settle_heap
from ioc.metrics import WorkerMetrics
from ioc.produce import BatchSender, CachingPartitioner, stop_within
from ioc.registry import Registry, load_registry
from ioc.settings import Settings
from ioc.snapshot import HistorySampler, encode
from streams import shards, sink
from streams.alerting import Alerting
from streams.anomaly_config import load_config
from streams.catch_up import CatchUp, judged_until
from streams.cyber import IncidentState
from streams.engine import DOSSIER, KINDS, Engine, EntityAggregator
from streams.windows import TZ

log = logging.getLogger(__name__)
DEADLETTER_HEADERS = (
    "ioc.error.stage",
    "ioc.error.reason",
    "ioc.source.topic",
    "ioc.source.partition",
    "ioc.source.offset",
)
MAINTENANCE_INTERVAL_S = 600.0
#: Records folded between two turns of the event loop (about 10 ms of work).
LOOP_TURN_EVERY = 1024
CONSUMER_SESSION_TIMEOUT_MS = 6000
#: Heartbeats at most this far apart (a fifth of the session timeout when that is shorter: the
#: survivors hear of a dead member's rebalance on their next heartbeat, on average half of it later).
CONSUMER_HEARTBEAT_MS = 1500
#: How long a rebalance waits for a live member to rejoin (its revocation flushes its last batch
#: first). aiokafka's default is the session timeout, which a short session would make too short for
#: a flush; a dead member's session still ends it sooner (docs/scaling.md).
CONSUMER_REBALANCE_TIMEOUT_MS = 10_000


def heartbeat_interval_ms(session_timeout_ms: int) -> int:
    """The heartbeat interval for a session timeout: a fifth of it, at most `CONSUMER_HEARTBEAT_MS`."""
    return max(100, min(CONSUMER_HEARTBEAT_MS, session_timeout_ms // 5))


#: A changed shard's partial counters are published at most this often (also the merger's view lag).
PARTIAL_INTERVAL_S = 0.1
#: The largest partial (one partition's counters) the worker publishes and the partials topic takes:
#: a busy partition's counters pass Kafka's default 1 MB limit (1.4 MB after a 30-day back-fill).
PARTIAL_MAX_BYTES = 64 << 20


#: A dead-lettered record, its reason, and the broker's acknowledgement to wait for.
DeadLetter = tuple[ConsumerRecord[Any, Any], InvalidEvent, "asyncio.Future[Any]"]


def now_us() -> int:
    return time.time_ns() // 1000


def _where(rec: ConsumerRecord[Any, Any]) -> dict[str, Any]:
    """Log context of a record (fields of the JSON log lines)."""
    return {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}


def _write_in_thread(conn: psycopg.Connection[Any], changes: sink.Changes) -> asyncio.Future[int]:
    """`sink.write_changes` on a writer thread, started at once (not when first awaited)."""
    return asyncio.get_running_loop().run_in_executor(None, sink.write_changes, conn, changes)


def _as_datetime(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / US, TZ)


class Ingest:
    """Batches from the input topics → engine → database → offsets; snapshots → database → `ioc.kpi.updates`."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        #: The merger's engine (cyber incidents, sensors, and the dossier partials merged); empty
        #: on a worker that is not the merger.
        self.engine = self._merger_engine()
        self.logical = {settings.topic(t): t for t in cfg.INPUT_TOPICS}
        self.sharded_topic = settings.topic(DOSSIER.topic)
        #: Dossier states and counters of each dossier partition this worker owns.
        self.shards: dict[int, EntityAggregator] = {}
        #: Each shard's current stamp (epoch of its assignment, sequence of its last partial).
        self.stamps: dict[int, shards.Stamp] = {}
        #: The dossier topic's partition count (stored with each dossier row beside its partition).
        self._dossier_partitions = 0
        #: Shards to publish (changed, or newly assigned) with the next partial.
        self.unpublished_shards: set[int] = set()
        self._last_partials = 0.0
        self._partial_interval = PARTIAL_INTERVAL_S
        #: Whether this worker is the merger: it owns every partition of the other input topics,
        #: merges the dossier partials, publishes every KPI snapshot and evaluates every alert.
        self.merger = False
        self.assignor = shards.assignor_for(self.sharded_topic)
        self.partials_tp = TopicPartition(settings.topic(cfg.TOPIC_PARTIALS), 0)
        self.partials_consumer: AIOKafkaConsumer | None = None
        #: Off the merger: the latest partial of every dossier partition (stamp, encoded), read as they
        #: come (headers only), so that becoming the merger decodes these and no longer rereads the topic.
        self._standby_partials: dict[int, tuple[shards.Stamp, bytes]] = {}
        #: Held while a batch is folded and by the rebalance callbacks: a rebalance waits for it.
        self._batch_lock = asyncio.Lock()
        #: Bumped by every revocation: a batch fetched before it is not folded after it.
        self._assignment_round = 0
        self.rebalances = 0
        self.alerting = Alerting(settings, registry, load_config(settings.anomaly_config).history_after_h)
        #: Folding a backlog (a back-fill, input held up by an outage): rules wait (`streams.catch_up`).
        self.catch_up = CatchUp()
        #: Per input partition: the newest event time read and the next offset (`_input_low_us`).
        self.input_read: dict[TopicPartition, tuple[int, int]] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        #: One connection per role: reads and maintenance (state), the emit timer (snapshots), and the
        #: state writers ("write0"...), synchronous connections used from threads (`sink.write_changes`).
        self.conns: dict[str, Any] = {}
        self.emit_lock = asyncio.Lock()
        self.history = HistorySampler(settings.kpi_history_interval_s)
        self.stats: Counter[str] = Counter()
        self.metrics = WorkerMetrics()
        self.metrics_port: int | None = None
        self.committed: dict[TopicPartition, int] = {}
        #: The previous batch's flush (write, dead letters, commit), overlapping the next batch's processing.
        self._flushing: asyncio.Task[None] | None = None
        #: Snapshots written to the database that the broker did not take: published with the next emission.
        self._unpublished: dict[str, Any] = {}
        self._unpublished_alerts: list[Any] = []
        self.ready = asyncio.Event()
        self._last_maintenance = 0.0
        #: The task consuming in `run`, stopped first by `stop`.
        self._running: asyncio.Task[None] | None = None
        #: When the last takeover of the merger's role began (logged with its first emission).
        self._took_over: float | None = None
        #: After a takeover, until its first emission: every series' stored value (`_urgent_first`).
        self._stored: dict[str, tuple[Any, ...]] | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def _merger_engine(self) -> Engine:
        engine = Engine(self.registry, now_us(), load_config(self.settings.anomaly_config))
        merged = shards.MergedAggregator(DOSSIER, engine.now_us)
        engine.dossiers = merged  # type: ignore[assignment]
        del engine.entities[DOSSIER.topic]
        return engine

    async def start(self) -> None:
        self._serve_metrics()
        for role in ("state", "snapshots", *self._writers()):
            self.conns[role] = await self._connect(role)
        await self._ensure_partials_topic()
        partitioner = CachingPartitioner()  # the same keys (kpi|scope|window) are published again and again
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            acks="all",
            linger_ms=5,
            max_batch_size=1 << 20,
            max_request_size=PARTIAL_MAX_BYTES,
            enable_idempotence=False,
            partitioner=partitioner,
        )
        await self.producer.start()
        self.sender = BatchSender(self.producer, partitioner)
        await self.alerting.start_listening()
        await self.alerting.start_webhooks(self.producer)
        lean_records()
        self.partials_consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # from the start: every partition's latest partial
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=64 << 20,
            # A new merger reads on to the end: not held up by a fetch waiting for the next partial.
            fetch_max_wait_ms=cfg.FETCH_MAX_WAIT_MS,
        )
        await self.partials_consumer.start()
        self.partials_consumer.assign([self.partials_tp])
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=self.settings.consumer_group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.worker_batch_max,
            fetch_max_bytes=64 << 20,
            max_partition_fetch_bytes=8 << 20,
            fetch_max_wait_ms=cfg.FETCH_MAX_WAIT_MS,
            # Kafka's minimum session timeout by default: a crashed worker's partitions move (or its
            # restart rejoins) within it; a clean stop leaves the group at once anyway.
            # Also how long a SIGKILLed worker's partitions wait before they move (no static
            # membership: a dead member leaves the group at its session timeout).
            session_timeout_ms=self.settings.worker_session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms(self.settings.worker_session_timeout_ms),
            rebalance_timeout_ms=max(CONSUMER_REBALANCE_TIMEOUT_MS, self.settings.worker_session_timeout_ms),
            value_deserializer=RAW,  # aiokafka's C records as they are (ioc.consume)
            partition_assignment_strategy=(self.assignor,),
            # Names the member in the group's description (/readyz): which host and process it is.
            client_id=f"ioc-worker-{socket.gethostname()}-{os.getpid()}",
        )
        await self.consumer.start()
        self.consumer.subscribe(topics=list(self.logical), listener=_Rebalance(self))
        self.ready.set()

    async def _ensure_partials_topic(self) -> None:
        """The compacted, single-partition topic of the shards' partial counters."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        await admin.start()
        try:
            topic = NewTopic(
                self.partials_tp.topic,
                num_partitions=1,
                replication_factor=self.settings.topic_replication,
                # Compacted soon (small segments, a low dirty ratio): a new merger reads little.
                topic_configs={
                    "cleanup.policy": "compact",
                    "segment.ms": "60000",
                    "min.cleanable.dirty.ratio": "0.1",
                    "delete.retention.ms": "60000",
                    "max.message.bytes": str(PARTIAL_MAX_BYTES),
                },
            )
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([topic])
        finally:
            await admin.close()

    # --- ownership ---------------------------------------------------------------------------

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Before the partitions move: the batch being folded finishes, and everything processed is
        made durable and committed (the next owner starts exactly there). States are kept until the
        new assignment says which partitions stay."""
        async with self._batch_lock:
            self._assignment_round += 1
            try:
                await self.drain()
            except Exception:  # the next owner processes the uncommitted records again
                log.exception("flushing before a rebalance failed")

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """Keep the shards still ours, rebuild new ones from the database, drop the others; take
        or give up the merger's role."""
        assert self.consumer is not None
        # Rebuilding can outlast a short session: heartbeats go on meanwhile (the loop gets turns).
        heartbeat_while_assigning(self.consumer)
        self.rebalances += 1
        generation = int(getattr(self.consumer._coordinator, "generation", 0) or 0)
        epoch_ns = time.time_ns()
        mine = {tp.partition for tp in assigned if tp.topic == self.sharded_topic}
        merger = any(tp.topic != self.sharded_topic for tp in assigned)
        async with self._batch_lock, self.emit_lock:
            for p in set(self.shards) - mine:
                del self.shards[p]
                self.stamps.pop(p, None)
                self.unpublished_shards.discard(p)
            new = {p: EntityAggregator(DOSSIER, now_us()) for p in mine - set(self.shards)}
            partitions = len(self.consumer.partitions_for_topic(self.sharded_topic) or ()) or max(mine, default=0) + 1
            self._dossier_partitions = partitions
            if new:
                rebuild_started = time.monotonic()
                loaded = await self._durably(
                    "state",
                    "rebuilding dossier partitions",
                    lambda conn: sink.load_dossier_shards(conn, new, partitions, now_us()),
                )
                log.info(
                    "dossier partitions %s rebuilt from the database: %d dossiers in %.3f s",
                    sorted(new),
                    loaded,
                    time.monotonic() - rebuild_started,
                )
                self.shards.update(new)
            for p in mine:
                self.stamps[p] = shards.Stamp(generation, epoch_ns, 0)
                self.unpublished_shards.add(p)
            if merger and not self.merger:
                await self._become_merger()
            elif not merger and self.merger:
                log.info("no longer the merger")
                self.merger = False
                self.engine = self._merger_engine()
                self._stored = None
                await self._restart_standby_partials()
                # Alerts are the merger's: forgotten here, so operator steps read from ioc.alerts
                # are not notified twice (the new merger notifies them).
                self.alerting.reset()
            if self.merger:
                merged = self.engine.dossiers
                assert isinstance(merged, shards.MergedAggregator)
                for p in mine:
                    merged.bind_local(p, shards.Stamp(generation, epoch_ns, shards.LOCAL_SEQ), self.shards[p])
            self.assignor.merger = self.merger
            self.assignor.owned = tuple(sorted(mine))
            self._publish_ownership(assigned)
        log.info("assigned (generation %d): dossier partitions %s; merger: %s", generation, sorted(mine), self.merger)

    async def _become_merger(self) -> None:
        """Rebuild what only the merger holds: incidents, sensor readings, published seqs, open
        alerts, and the latest partial of every dossier partition."""
        t0 = time.monotonic()
        engine = self._merger_engine()
        counts: dict[str, Any] = await self._durably(
            "state", "rebuilding the merger", lambda c: sink.load_state(c, engine, dossiers=False)
        )
        t1 = time.monotonic()
        self.alerting.reset()
        counts["open_alerts"] = await self.alerting.restore(self.conns["state"], _as_datetime(engine.now_us))
        t2 = time.monotonic()
        self.engine = engine
        self._unpublished = {}
        self.history = HistorySampler(self.settings.kpi_history_interval_s)
        self._stored = await self._durably("state", "reading stored KPI values", sink.load_published_values)
        counts["partials"] = await self._take_standby_partials(engine)
        counts["partials"] += await self._catch_up_partials()
        t3 = time.monotonic()
        self.merger = True
        self._took_over = t0
        counts["seconds"] = {"state": round(t1 - t0, 3), "alerts": round(t2 - t1, 3), "partials": round(t3 - t2, 3)}
        log.info("the merger now; state rebuilt from the database: %s", counts)

    async def _take_standby_partials(self, engine: Engine) -> int:
        """Adopt the partials read while not the merger (decoded now, the newest of each partition only)."""
        merged = engine.dossiers
        assert isinstance(merged, shards.MergedAggregator)
        held, self._standby_partials = self._standby_partials, {}
        n = 0
        for _, raw in held.values():
            n += merged.apply_partial(shards.decode_partial(raw))
            await asyncio.sleep(0)  # a turn for the heartbeats between two decodings
        return n

    async def _restart_standby_partials(self) -> None:
        """Off the merger again: the merged view is gone, so the partials are read again from the start."""
        self._standby_partials = {}
        if self.partials_consumer is not None:
            await self.partials_consumer.seek_to_beginning(self.partials_tp)

    async def _catch_up_partials(self) -> int:
        """Read the partials topic on to its end (latest per partition wins): from where the standby
        reading left it (from the beginning when it never read)."""
        consumer = self.partials_consumer
        assert consumer is not None
        tp = self.partials_tp
        end = (await consumer.end_offsets([tp]))[tp]
        n = 0
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=200)
            for records in batch.values():
                n += self._apply_partials(records, merging=True)
            await asyncio.sleep(0)  # heartbeats go on while partials are decoded
        return n

    def _apply_partials(self, records: list[Any], *, merging: bool | None = None) -> int:
        """Adopt the newest of these partials for each partition, if newer than what is held. Only
        the headers of the others are decoded (the merger reads its own back: they are skipped)."""
        merged = self.engine.dossiers
        assert isinstance(merged, shards.MergedAggregator)
        standby = self._standby_partials
        merging = self.merger if merging is None else merging
        newest: dict[int, tuple[shards.Stamp, bytes]] = {}
        for rec in records:
            if rec.value is None:
                continue
            try:
                group, topic, partition, stamp = shards.peek(rec.value)
            except Exception:  # a foreign record must not stop the merger
                log.warning("ignored an undecodable partial at offset %d", rec.offset)
                continue
            # The topic may hold other groups' partials (e.g. a benchmark's runs side by side).
            if group != self.settings.consumer_group or topic != DOSSIER.topic:
                continue
            if merging:
                held = merged.held(partition)
            else:
                kept = standby.get(partition)
                held = kept[0] if kept is not None else None
            if (held is None or stamp > held) and (partition not in newest or stamp > newest[partition][0]):
                newest[partition] = (stamp, rec.value)
        if not merging:
            standby.update(newest)  # decoded only if this worker becomes the merger
            return 0
        applied = 0
        for _, raw in newest.values():
            if merged.apply_partial(shards.decode_partial(raw)):
                applied += 1
        return applied

    def _publish_ownership(self, assigned: set[TopicPartition]) -> None:
        m = self.metrics
        m.merger.set(1 if self.merger else 0)
        m.partitions_owned.clear()
        m.consumer_lag.clear()
        for tp in assigned:
            m.partitions_owned.labels(self.logical.get(tp.topic, tp.topic), str(tp.partition)).set(1)

    def _writers(self) -> list[str]:
        """Connection roles that write state changes, concurrently, each from its own thread."""
        return [f"write{i}" for i in range(self.settings.worker_db_writers)]

    def _serve_metrics(self) -> None:
        """Prometheus `/metrics` on IOC_WORKER_METRICS_PORT; a port in use is logged, not fatal."""
        try:
            server, _ = start_http_server(self.settings.worker_metrics_port, registry=self.metrics.registry)
        except OSError as exc:
            log.warning("worker metrics not served on port %d: %s", self.settings.worker_metrics_port, exc)
            return
        self._metrics_server = server
        self.metrics_port = int(server.server_port)
        log.info("worker metrics on http://0.0.0.0:%d/metrics", self.metrics_port)

    async def drain(self) -> None:
        """Wait until every processed batch is durable and committed.

        Shielded: a caller cancelled meanwhile (`stop` cancelling `run` in the middle of a batch)
        leaves the flush going, and the next `drain` waits for it."""
        flushing = self._flushing
        if flushing is None:
            return
        try:
            await asyncio.shield(flushing)
        finally:
            if flushing.done() and self._flushing is flushing:
                self._flushing = None

    async def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None and running is not asyncio.current_task() and not running.done():
            # First stop consuming: a batch being folded (the fold gives the loop turns) is dropped
            # uncommitted, and is delivered again on restart.
            running.cancel()
            await asyncio.wait([running])
        try:
            await self.drain()
        except Exception:  # stopping anyway: the uncommitted records are delivered again on restart
            log.exception("the last batch could not be flushed")
        server = getattr(self, "_metrics_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
        await self.alerting.stop()
        for what, closer in (
            ("the worker's consumer", self.consumer),
            ("the partials' consumer", self.partials_consumer),
            ("the worker's producer", self.producer),
        ):
            if closer is not None:
                try:
                    await stop_within(closer, what)
                except Exception:  # shutting down anyway
                    log.exception("error while stopping %s", what)
        for conn in self.conns.values():
            if isinstance(conn, psycopg.AsyncConnection):
                await conn.close()
            else:
                conn.close()

    async def _connect(self, role: str) -> Any:
        """A connection for ``role``: synchronous for the writers (used from threads), else async."""
        delay = 0.5
        url = self.settings.database_url
        while True:
            try:
                if role.startswith("write"):
                    return await asyncio.to_thread(psycopg.connect, url, autocommit=True)
                return await psycopg.AsyncConnection.connect(url, autocommit=True)
            except psycopg.OperationalError as exc:
                log.warning("database unreachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _durably(self, role: str, what: str, action: Any, first: Awaitable[Any] | None = None) -> Any:
        """Run a database action until it succeeds: a transient error delays, never skips or dead-letters.
        ``first``: an attempt already under way (started without waiting for the loop), awaited first."""
        delay = 0.5
        while True:
            conn = self.conns[role]
            try:
                if first is not None:
                    attempt, first = first, None
                    return await attempt
                return await action(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self.stats["db_retries"] += 1
                self.metrics.db_retries.inc()
                log.warning("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                if conn.closed or conn.broken:
                    self.conns[role] = await self._connect(role)

    # --- the hot path -----------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled (or `stop`)."""
        assert self.consumer is not None
        self._running = asyncio.current_task()
        timeout_ms = int(self.settings.worker_flush_interval_s * 1000)
        while True:
            try:
                batch = await self.gather(timeout_ms)
            except ConsumerStoppedError:
                return  # stopping
            except InvalidSessionTimeoutError:
                log.error(
                    "the broker refuses a %d ms session (IOC_WORKER_SESSION_TIMEOUT_MS): its "
                    "group.min.session.timeout.ms is higher (Kafka's default: 6000); lower that, or raise this "
                    '(docs/scaling.md, "Session timeout")',
                    self.settings.worker_session_timeout_ms,
                )
                raise
            if batch:
                await self.process(batch)
            if time.monotonic() - self._last_maintenance > MAINTENANCE_INTERVAL_S:
                await self.maintenance()

    async def gather(self, timeout_ms: int) -> dict[TopicPartition, list[LeanRecord]]:
        """One batch: wait for records, then take whatever else is already fetched, up to the batch size."""
        assert self.consumer is not None
        limit = self.settings.worker_batch_max
        batch: dict[TopicPartition, list[LeanRecord]] = await self.consumer.getmany(
            timeout_ms=timeout_ms, max_records=limit
        )
        count = sum(len(r) for r in batch.values())
        while batch and count < limit:
            more = await self.consumer.getmany(timeout_ms=0, max_records=limit - count)
            if not more:
                break
            for tp, records in more.items():
                batch.setdefault(tp, []).extend(records)
                count += len(records)
        return batch

    async def process(self, batch: dict[TopicPartition, list[LeanRecord]]) -> None:
        round_ = self._assignment_round
        async with self._batch_lock:
            if round_ != self._assignment_round:
                return  # fetched before a rebalance: delivered again to the partitions' owners
            await self._process(batch)

    async def _process(self, batch: dict[TopicPartition, list[LeanRecord]]) -> None:
        started = time.monotonic()
        engine = self.engine
        m = self.metrics
        registry = engine.registry
        dead: list[tuple[ConsumerRecord[Any, Any], InvalidEvent]] = []
        offsets: dict[TopicPartition, int] = {}
        newest: dict[str, int] = {}
        late_before = engine.now_us - 86400 * US
        #: Events of entities memory does not hold, older than the horizon: maybe dropped before a
        #: restart, so looked up in the database before they (and later events of theirs) are applied.
        deferred: list[tuple[ConsumerRecord[Any, Any], str, str, Any, Any, Any]] = []
        deferred_keys: set[str] = set()
        n = 0
        # One pass: validate and fold each record (a merge is order-independent and idempotent).
        for tp, records in batch.items():
            logical = self.logical[tp.topic]
            parse = KINDS[logical].parse
            entities: EntityAggregator | None
            if tp.topic == self.sharded_topic:
                entities = self.shards.get(tp.partition)
                if entities is None:
                    continue  # not ours (any more): its owner reads it from the committed offset
                # The merger's detectors count its own partitions' receipts here and read the others'
                # from their partials (docs/anomaly.md).
                apply = engine.with_detectors(logical, entities.apply)
                self.unpublished_shards.add(tp.partition)
            else:
                if not self.merger:
                    continue
                entities = engine.entities.get(logical)
                apply = engine.applier(logical)
            newest_t = newest.get(logical, 0)
            tp_newest = 0
            late = duplicates = 0
            for i, rec in enumerate(records):
                if i % LOOP_TURN_EVERY == 0:
                    # The event loop's turn: the fetcher asks for the next records while this batch
                    # is folded, finished writes are committed, and emissions keep their interval.
                    await asyncio.sleep(0)
                value = rec.value
                try:
                    if value is None:
                        raise InvalidEvent("empty record (no value)", stage="decode")
                    ts = rec.timestamp
                    key, parsed = parse(value, registry, ts * 1000 if ts and ts > 0 else None)
                except InvalidEvent as exc:
                    dead.append((full_record(tp, rec), exc))
                    continue
                except Exception as exc:  # a bug must not lose the record: dead-letter it with the reason
                    full = full_record(tp, rec)
                    log.exception(
                        "validation failed at %s[%d]@%d", tp.topic, tp.partition, rec.offset, extra=_where(full)
                    )
                    dead.append((full, InvalidEvent(f"{type(exc).__name__}: {exc}", stage="validate")))
                    continue
                t = parsed.t
                if t > newest_t:
                    newest_t = t
                if t > tp_newest:
                    tp_newest = t
                if t < late_before:
                    late += 1
                    if entities is not None and (
                        key in deferred_keys or entities.unknown_and_old(key, t, engine.now_us)
                    ):
                        deferred.append((full_record(tp, rec), logical, key, parsed, entities, apply))
                        deferred_keys.add(key)
                        continue
                elif deferred_keys and key in deferred_keys:
                    deferred.append((full_record(tp, rec), logical, key, parsed, entities, apply))
                    continue
                try:
                    if not apply(key, parsed):
                        duplicates += 1
                except Exception as exc:  # a bug must not lose the record: dead-letter it with the reason
                    self._failed(full_record(tp, rec), parsed, exc, dead)
            n += len(records)
            offsets[tp] = records[-1].offset + 1
            self.input_read[tp] = (max(self.input_read.get(tp, (0, 0))[0], tp_newest), records[-1].offset + 1)
            if newest_t:
                newest[logical] = newest_t
            m.records_in.labels(logical).inc(len(records))
            if late:
                m.late_events.labels(logical).inc(late)
            if duplicates:
                m.duplicates.labels(logical).inc(duplicates)
        if deferred:
            await self._recall(deferred)
            for rec, logical, key, parsed, _, fold in deferred:
                try:
                    if not fold(key, parsed):
                        m.duplicates.labels(logical).inc()
                except Exception as exc:  # a bug must not lose the record: dead-letter it with the reason
                    self._failed(rec, parsed, exc, dead)
        self.stats["records"] += n
        self.stats["deadlettered"] += len(dead)
        for rec, error in dead:
            m.deadlettered.labels(self.logical.get(rec.topic, rec.topic), error.stage).inc()
        wall = now_us()
        for logical, t in newest.items():
            m.event_lag.labels(logical).set(max(0, wall - t) / US)
        self.catch_up.on_batch(max(newest.values(), default=0), wall, time.monotonic())
        # Pipelining: this batch's effects are taken now; the previous flush must finish (it commits
        # earlier offsets) before this one starts, and it overlaps the next batch's processing.
        futures = [(rec, error, await self._dead_letter(rec, error)) for rec, error in dead]
        if engine.incidents.changed:
            incidents = [s for s in engine.incidents.changed.values() if isinstance(s, IncidentState)]
            self.alerting.on_incidents(
                incidents, _as_datetime(engine.now_us), catching_up=self.catch_up.active(time.monotonic())
            )
        self.alerting.on_batch(len(dead), n, time.monotonic())
        changes = sink.take_changes(engine)
        changes.partition_count = self._dossier_partitions
        for p, shard in self.shards.items():
            if shard.changed:
                changes.dossiers.update(shard.changed)
                changes.partitions.update(dict.fromkeys(shard.changed, p))  # stored with the rows
                shard.changed = {}
        await self.drain()
        write_started, writes = time.monotonic(), self._start_writes(changes)
        self._flushing = asyncio.create_task(self._flush(writes, write_started, futures, offsets, started))

    def _start_writes(self, changes: sink.Changes) -> list[tuple[str, sink.Changes, asyncio.Future[int]]]:
        """Hand the batch's state changes to the writer threads now: the next batch is folded while
        they write. (Started from a task instead, they would wait for the loop's next turn, which a
        batch already fetched does not give before it is folded: no overlap at all.)"""
        return [
            (role, share, _write_in_thread(self.conns[role], share))
            for role, share in zip(self._writers(), changes.split(self.settings.worker_db_writers), strict=False)
        ]

    async def _flush(
        self,
        writes: list[tuple[str, sink.Changes, asyncio.Future[int]]],
        write_started: float,
        dead: list[DeadLetter],
        offsets: dict[TopicPartition, int],
        started: float,
    ) -> None:
        """Make one batch durable, then commit its offsets (never the other way round)."""
        m = self.metrics
        await asyncio.gather(
            *(
                self._durably(
                    role,
                    "writing state",
                    lambda conn, c=share: _write_in_thread(conn, c),
                    first=first,
                )
                for role, share, first in writes
            )
        )
        m.db_write_seconds.labels("state").observe(time.monotonic() - write_started)
        if dead:
            await self._deliver_dead_letters(dead)
        assert self.consumer is not None
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:
            # The group moved on (a rebalance while the batch was in flight) or the coordinator is
            # gone: these records will be delivered again, and counting them again changes nothing.
            self.stats["commit_failures"] += 1
            log.warning("committing offsets failed (%s); the records will be processed again", exc)
            return
        self.committed.update(offsets)
        m.batch_seconds.observe(time.monotonic() - started)

    async def _deliver_dead_letters(self, dead: list[DeadLetter]) -> None:
        """Wait until the broker has every dead letter; send again what it failed to take."""
        delay = 0.5
        while dead:
            results = await asyncio.gather(*(future for _, _, future in dead), return_exceptions=True)
            failed = [(rec, error) for (rec, error, _), result in zip(dead, results, strict=True)
                      if isinstance(result, BaseException)]  # fmt: skip
            if not failed:
                return
            log.warning("%d dead letters not delivered; sending them again in %.1f s", len(failed), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            dead = [(rec, error, await self._dead_letter(rec, error)) for rec, error in failed]

    async def _recall(self, deferred: list[tuple[ConsumerRecord[Any, Any], str, str, Any, Any, Any]]) -> None:
        """Load from the database the entities of old events that memory no longer holds (dropped
        before a restart), so a re-sent event of a long-finished dossier changes nothing."""
        wanted: dict[int, tuple[str, Any, set[str]]] = {}
        for _, logical, key, _, agg, _ in deferred:
            wanted.setdefault(id(agg), (logical, agg, set()))[2].add(key)
        for logical, agg, keys in wanted.values():
            found = await self._durably(
                "state",
                "recalling entities",
                lambda conn, lg=logical, ks=keys, a=agg: sink.load_entities(conn, self.engine, lg, ks, agg=a),
            )
            self.stats["recalled"] += found

    def _failed(
        self,
        rec: ConsumerRecord[Any, Any],
        parsed: Any,
        exc: Exception,
        dead: list[tuple[ConsumerRecord[Any, Any], InvalidEvent]],
    ) -> None:
        log.exception(
            "processing failed at %s[%d]@%d",
            rec.topic,
            rec.partition,
            rec.offset,
            extra={**_where(rec), "event_id": parsed.event.event_id},
        )
        dead.append((rec, InvalidEvent(f"{type(exc).__name__}: {exc}", stage="process")))

    async def _dead_letter(self, rec: ConsumerRecord[Any, Any], exc: InvalidEvent) -> asyncio.Future[Any]:
        assert self.producer is not None
        reason = str(exc)[:1000]
        headers = [
            ("ioc.error.stage", exc.stage.encode()),
            ("ioc.error.reason", reason.encode("utf-8", "replace")),
            ("ioc.source.topic", rec.topic.encode()),
            ("ioc.source.partition", str(rec.partition).encode()),
            ("ioc.source.offset", str(rec.offset).encode()),
        ]
        log.info(
            "dead-lettered %s[%d]@%d (%s): %s",
            rec.topic,
            rec.partition,
            rec.offset,
            exc.stage,
            reason,
            extra=_where(rec),
        )
        future: asyncio.Future[Any] = await self.producer.send(
            self.settings.topic(cfg.TOPIC_DEADLETTER), value=rec.value, key=rec.key, headers=headers
        )
        return future

    async def emit(self) -> int:
        """Publish every KPI whose value changed (or whose window moved) since the last call."""
        if not self.ready.is_set():
            return 0
        async with self.emit_lock:
            started = time.monotonic()
            try:
                await self._publish_partials()
            except KafkaError as exc:  # retried with the next emission; the snapshots still go out
                log.warning("publishing partials failed (%s); will retry", exc)
            self._observe_lag()
            await self._poll_partials()  # off the merger too: the standby's copy of the partials
            if not self.merger:
                return 0
            merged = self.engine.dossiers
            assert isinstance(merged, shards.MergedAggregator)
            for shard in self.shards.values():
                merged.take_local(shard)
            self.engine.input_low_us = self._input_low_us()
            self.engine.advance(now_us())
            now = _as_datetime(self.engine.now_us)
            snapshots = self.engine.snapshots()
            if self._unpublished:
                # What the broker did not take last time goes out again (newer values replace it).
                pending, self._unpublished = self._unpublished, {}
                pending.update({s.key: s for s in snapshots})
                snapshots = list(pending.values())
            if self._stored is not None:
                snapshots = self._urgent_first(snapshots)
            history = self.history.take(snapshots, now)
            assert self.producer is not None
            if snapshots:
                # Subscribers first (the database write is then not on the way to the screens), then
                # the database, before the next emission publishes anything: subscribers are at most
                # one seq ahead of the database, which a restart allows for (Engine.restore_published).
                # A series' first snapshot (seq 1) is written first: a restart could not tell it was
                # published (after startup and for new scopes only: rare). Only those: the others
                # (after a takeover, every series) are not held back by their write.
                fresh = [s for s in snapshots if s.seq == 1]
                first = len(fresh) == len(snapshots)
                if first:
                    await self._write_snapshots(snapshots, history)
                elif fresh:
                    await self._write_snapshots(fresh, [])
                topic = self.settings.topic(cfg.TOPIC_KPI)
                refused: KafkaError | None = None
                try:
                    await self.sender.send_and_wait((topic, s.key.encode(), encode(s)) for s in snapshots)
                except KafkaError as exc:
                    self._unpublished.update({s.key: s for s in snapshots})
                    refused = exc
                if not first:
                    await self._write_snapshots(snapshots, history)
                if refused is not None:
                    raise refused
                self.stats["snapshots"] += len(snapshots)
                self.metrics.snapshots.inc(len(snapshots))
                self.metrics.emit_seconds.observe(time.monotonic() - started)
            elif history:  # values left pending by earlier emissions, due now
                await self._write_snapshots([], history)
            await self._alert(snapshots, now)
            if self._took_over is not None:
                log.info(
                    "first emission as the merger: %d snapshots, %.3f s (%.3f s after the takeover began)",
                    len(snapshots),
                    time.monotonic() - started,
                    time.monotonic() - self._took_over,
                )
                self._took_over = None
            return len(snapshots)

    def _urgent_first(self, snapshots: list[Any]) -> list[Any]:
        """A new merger's first emission republishes every series (`Engine.restore_published`):
        thousands. Those whose value differs from the stored one (a change the last merger had not
        published, or an event since) go out now; the others with the next emission, a moment later,
        so that the changes are not held back by the republishing of what subscribers already have."""
        stored, self._stored = self._stored, None
        assert stored is not None
        urgent, later = [], []
        for s in snapshots:
            key = s.key
            held = stored.get(key)
            if held is not None and held == (s.value, s.numerator, s.denominator, s.status, s.extra, s.quality):
                later.append(s)
            else:
                urgent.append(s)
        self._unpublished.update({s.key: s for s in later})
        log.info("first emission as the merger: %d changed series now, %d unchanged next", len(urgent), len(later))
        return urgent

    async def _publish_partials(self) -> None:
        """Every changed shard's absolute counters to the partials topic (and, on the merger, straight
        into the merged view). Per emission interval, never per event: the hot path does not see it."""
        if not self.unpublished_shards or time.monotonic() - self._last_partials < self._partial_interval:
            return
        started = self._last_partials = time.monotonic()
        assert self.producer is not None
        now = now_us()
        pending, self.unpublished_shards = self.unpublished_shards, set()
        messages = []
        for p in sorted(pending):
            shard = self.shards.get(p)
            if shard is None:
                continue
            shard.counters.advance(now)
            stamp = self.stamps[p]
            stamp = self.stamps[p] = shards.Stamp(stamp.generation, stamp.epoch_ns, stamp.seq + 1)
            raw = shards.encode_partial(DOSSIER.topic, p, stamp, shard, self.settings.consumer_group)
            messages.append(
                (self.partials_tp.topic, f"{self.settings.consumer_group}|{DOSSIER.topic}|{p}".encode(), raw)
            )
        # A whole partition's counters cost milliseconds to encode (tens on a busy day): the interval
        # grows with that cost, so partials never take more than about a tenth of the worker's time.
        self._partial_interval = max(PARTIAL_INTERVAL_S, 10 * (time.monotonic() - started))
        try:
            await self.sender.send_and_wait(messages)
        except KafkaError:
            self.unpublished_shards |= pending  # published again with the next emission
            raise
        self.metrics.partials.inc(len(messages))

    async def _poll_partials(self) -> None:
        """The partials fetched since the last emission (the merger's own were applied when published;
        read back, they change nothing)."""
        consumer = self.partials_consumer
        if consumer is None:
            return
        while True:  # a zero timeout hands over only what is already fetched: no waiting here
            batch = await consumer.getmany(self.partials_tp, timeout_ms=0, max_records=1000)
            if not batch:
                return
            for records in batch.values():
                self._apply_partials(records)

    async def _write_snapshots(self, snapshots: list[Any], history: list[Any]) -> None:
        started = time.monotonic()
        await self._durably("snapshots", "writing snapshots", lambda c: sink.write_snapshots(c, snapshots, history))
        self.metrics.db_write_seconds.labels("snapshots").observe(time.monotonic() - started)

    async def _alert(self, snapshots: list[Any], now: dt.datetime) -> None:
        """Alert rules over the new snapshots and the clock; the audit trail first, then `ioc.alerts`."""
        alerting = self.alerting
        detectors = self.engine.anomaly
        alerting.on_findings(detectors.take(), now, judged_until(detectors))
        alerting.on_snapshots(snapshots, now, catching_up=self.catch_up.active(time.monotonic()))
        await self._durably("snapshots", "reading silences", lambda c: alerting.sync_silences(c, now))
        alerting.tick(now)
        events = alerting.take()
        if events:
            await self._durably("snapshots", "writing alerts", lambda c: alerting.persist(c, events))
        # Events recorded earlier that the broker did not take go out first, in order.
        events, self._unpublished_alerts = [*self._unpublished_alerts, *events], []
        if events:
            assert self.producer is not None
            try:
                await alerting.publish(self.producer, events)
            except KafkaError:
                self._unpublished_alerts = events
                raise
            self.stats["alert_events"] += len(events)

    def _input_low_us(self) -> int | None:
        """The event time every assigned input partition still behind its log's end has reached;
        None when none is. Only partitions read from count (their next offset is known without asking
        the client, which could wait on a rebalance): one read to its end holds nothing back, so an
        idle partition does not stall the detectors (`Engine.input_low_us`)."""
        consumer = self.consumer
        if consumer is None:
            return None
        behind = []
        for tp in consumer.assignment():
            read = self.input_read.get(tp)
            high = consumer.highwater(tp)
            if read is not None and high is not None and read[1] < high:
                behind.append(read[0])
        return min(behind) if behind else None

    def _observe_lag(self) -> None:
        m, consumer = self.metrics, self.consumer
        m.entities.labels("dossier").set(sum(len(shard.states) for shard in self.shards.values()))
        m.entities.labels("incident").set(len(self.engine.incidents.states))
        if consumer is None:
            return
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                done = self.committed.get(tp, 0)
                m.consumer_lag.labels(self.logical.get(tp.topic, tp.topic), str(tp.partition)).set(max(0, high - done))

    async def maintenance(self) -> None:
        self._last_maintenance = time.monotonic()
        self.engine.prune()
        for shard in self.shards.values():
            shard.prune(now_us())

        async def partitions(conn: psycopg.AsyncConnection[Any]) -> None:
            def sync(url: str) -> None:
                with psycopg.connect(url, autocommit=True) as c:
                    if storage_of(c) is Storage.POSTGRESQL:
                        today = dt.date.today()
                        ensure_partitions(c, today, today + dt.timedelta(days=7))
                        drop_expired(c, self.settings.kpi_history_days, today)
                        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2 * MAINTENANCE_INTERVAL_S)
                        refresh_rollups(c, since=since, rollup_days=self.settings.kpi_rollup_days)

            await asyncio.to_thread(sync, self.settings.database_url)

        await self._durably("state", "partition maintenance", partitions)


def create_app(settings: Settings, registry: Registry | None = None) -> tuple[faust.App, Ingest]:
    """Build the worker's Faust app and its ingest pipeline (nothing is built at import time)."""
    registry = registry or load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    app = faust.App(
        f"{settings.topic_prefix}{settings.consumer_group}-faust",
        broker=[f"kafka://{h}" for h in settings.kafka_bootstrap.split(",")],
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        topic_allow_declare=True,
        consumer_auto_offset_reset="latest",
        producer_acks=-1,
        # Kafka's minimum session, as for the ingest consumer: a crashed worker's membership ends
        # within 6 s, so its restart rejoins at once instead of after Faust's default 60 s.
        broker_session_timeout=CONSUMER_SESSION_TIMEOUT_MS / 1000,
        broker_heartbeat_interval=CONSUMER_SESSION_TIMEOUT_MS / 3000,
    )
    ingest = Ingest(settings, registry)

    @app.service
    class IngestService(mode.Service):
        """Runs the batch pipeline inside the Faust worker."""

        async def on_start(self) -> None:
            await ingest.start()
            # Everything built so far lives as long as the worker: out of the collector's full passes.
            log.info("startup heap settled: %d objects no longer walked by the garbage collector", settle_heap())

        @mode.Service.task
        async def _consume(self) -> None:
            await ingest.run()

        @mode.Service.task
        async def _listen_alerts(self) -> None:
            await ingest.ready.wait()
            try:
                await ingest.alerting.listen()
            except ConsumerStoppedError:
                return

        @mode.Service.task
        async def _emit(self) -> None:
            """An emission every IOC_EMIT_INTERVAL_S, or right after the last one when it took longer
            (a timer would warn of every overlap: at 0.1 s, a large first emission overlaps)."""
            interval = settings.emit_interval_s
            while not self.should_stop:
                started = time.monotonic()
                try:
                    await ingest.emit()
                except KafkaError as exc:
                    log.warning("publishing KPI snapshots failed (%s); will retry", exc)
                await self.sleep(max(0.0, interval - (time.monotonic() - started)))

        async def on_stop(self) -> None:
            await ingest.stop()

    return app, ingest


def run(settings: Settings) -> None:
    """`ioc worker`: run until SIGINT/SIGTERM."""
    log.info("event loop: %s", install_loop())
    app, _ = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, override_logging=False)
    if not sys.stdout.isatty():
        # Faust's progress spinner writes terminal codes ("show cursor") to stdout at exit even
        # when stdout is a pipe: they landed in the output of `ioc bench` and `ioc soak`.
        worker.spinner = None
    worker.execute_from_commandline()


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the worker."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.ingest.on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.ingest.on_assigned(assigned)
