"""In-process measurements: the plain-consumer baseline, the worker's `Ingest` pipeline, and the database sink."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from typing import Any

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.stats import process_cpu
from bench.workload import DossierIntake, progress
from ioc.loop import GcTimes, settle_heap
from ioc.registry import Registry, load_registry
from ioc.settings import INPUT_TOPICS, TOPIC_DOSSIER, Settings

PROGRESS_EVERY_S = 2.0


def _registry(settings: Settings) -> Registry:
    return load_registry(settings.units_file, settings.stations_file, settings.targets_file)


async def baseline(settings: Settings, expected: int) -> dict[str, Any]:
    """A plain aiokafka consumer reading every input partition from the start, decoding each value
    (msgspec JSON) and counting it by topic: the ceiling of Python + aiokafka on this broker."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.worker_batch_max,
        fetch_max_bytes=64 << 20,
        max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    decode = msgspec.json.decode
    counts: Counter[str] = Counter()
    count = undecodable = 0
    try:
        partitions = [
            TopicPartition(settings.topic(t), p)
            for t in INPUT_TOPICS
            for p in sorted(
                consumer.partitions_for_topic(settings.topic(t)) or await _partitions(consumer, settings.topic(t))
            )
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        started = first = time.monotonic()
        next_report = started + PROGRESS_EVERY_S
        got_first = False
        while count < expected:
            batch = await consumer.getmany(timeout_ms=1000, max_records=settings.worker_batch_max)
            if not batch:
                if time.monotonic() - started > 120:
                    break
                continue
            if not got_first:
                first, got_first = time.monotonic(), True
            for tp, records in batch.items():
                for rec in records:
                    try:
                        decode(rec.value)
                    except (msgspec.DecodeError, TypeError):
                        undecodable += 1
                counts[tp.topic] += len(records)
                count += len(records)
            now = time.monotonic()
            if now >= next_report:
                progress(f"baseline: {count:,}/{expected:,} consumed ({count / (now - first):,.0f}/s)")
                next_report = now + PROGRESS_EVERY_S
        elapsed = time.monotonic() - first
    finally:
        await consumer.stop()
    rate = count / elapsed if elapsed > 0 else 0.0
    progress(f"baseline: {count:,} in {elapsed:.2f} s = {rate:,.0f} events/s")
    return {"events": count, "seconds": round(elapsed, 3), "events_per_s": round(rate, 1), "undecodable": undecodable}


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        await consumer._client.force_metadata_update()
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


#: Processes on this machine whose CPU the throughput section charges to the pipeline, by the start of
#: their command name.
SERVICE_COMMANDS: tuple[tuple[str, str], ...] = (("postgres", "postgresql"),)
#: The embedded broker this run started (`bench.harness.services`), charged as "broker": by pid,
#: since a JVM's command name (``java``) does not say which JVM it is.
BROKER_PIDS: set[int] = set()


def service_cpu() -> dict[int, tuple[str, float]]:
    """pid → (service, CPU seconds so far) of this machine's PostgreSQL and embedded broker processes."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command, seconds = process_cpu(entry.name)
        except OSError:  # gone meanwhile
            continue
        service = next((name for prefix, name in SERVICE_COMMANDS if command.startswith(prefix)), None)
        if int(entry.name) in BROKER_PIDS:
            service = "broker"
        if service is not None:
            found[int(entry.name)] = (service, seconds)
    return found


def cpu_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per service between two :func:`service_cpu` samples (processes alive at both)."""
    used: dict[str, float] = {}
    for pid, (service, seconds) in after.items():
        if pid in before:
            used[service] = used.get(service, 0.0) + seconds - before[pid][1]
    return used


async def throughput(settings: Settings, expected: int) -> dict[str, Any]:
    """`Ingest` driven as the worker drives it (``gather`` + ``process``, ``emit`` on its timer,
    ``drain`` at the end) over a backlog of ``expected`` records; events/s from the first batch
    to the last batch durable, committed and published."""
    from streams.worker import Ingest

    ingest = Ingest(settings, _registry(settings))
    await ingest.start()
    settle_heap()  # as the worker does once started (streams.worker.IngestService.on_start)
    collector = GcTimes()
    timeout_ms = int(settings.worker_flush_interval_s * 1000)
    emitted = 0

    async def emitter() -> None:
        nonlocal emitted
        while True:
            await asyncio.sleep(settings.emit_interval_s)
            emitted += await ingest.emit()

    timer = asyncio.create_task(emitter())
    count = batches = 0
    first_cpu = done_cpu = first_process_cpu = process_cpu = 0.0
    first_services: dict[int, tuple[str, float]] = {}
    services: dict[str, float] = {}
    try:
        waited = time.monotonic()
        first = waited
        next_report = waited + PROGRESS_EVERY_S
        while count < expected:
            batch = await ingest.gather(timeout_ms)
            if not batch:
                if count == 0 and time.monotonic() - waited > 120:
                    raise RuntimeError("the worker received nothing within 120 s")
                if count and time.monotonic() - next_report > 30:
                    break  # the backlog is shorter than expected
                continue
            if count == 0:
                first, first_cpu = time.monotonic(), time.thread_time()
                first_process_cpu, first_services = time.process_time(), service_cpu()
            await ingest.process(batch)
            batches += 1
            count += sum(len(r) for r in batch.values())
            now = time.monotonic()
            if now >= next_report:
                progress(f"throughput: {count:,}/{expected:,} processed ({count / (now - first):,.0f}/s)")
                next_report = now + PROGRESS_EVERY_S
        processed = time.monotonic()
        await ingest.drain()
        durable = time.monotonic()
        emitted += await ingest.emit()
        done, done_cpu = time.monotonic(), time.thread_time()
        process_cpu, services = time.process_time() - first_process_cpu, cpu_used(first_services, service_cpu())
    finally:
        collector.close()
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
        await ingest.stop()
    elapsed = done - first
    rate = count / elapsed if elapsed > 0 else 0.0
    progress(f"throughput: {count:,} in {elapsed:.2f} s = {rate:,.0f} events/s")
    # The event loop's thread: its CPU per event is steadier between runs than the rate (the writer
    # threads and the broker share the same cores), and what it leaves of the wall time is waiting.
    loop_cpu = done_cpu - first_cpu
    if count and elapsed > 0:
        progress(
            f"throughput: event loop thread {loop_cpu / count * 1e6:.2f} µs CPU per event, busy {loop_cpu / elapsed:.0%}"
        )
    # Everything the pipeline costs on this machine's cores: the worker process (loop, writer threads,
    # the Kafka client's), PostgreSQL's processes and the broker's (none found: they run elsewhere).
    cpu_per_event = {"worker": process_cpu, **services}
    total_cpu = sum(cpu_per_event.values())
    cores = os.cpu_count() or 1
    if count and total_cpu > 0:
        parts = ", ".join(f"{name} {seconds / count * 1e6:.2f}" for name, seconds in cpu_per_event.items())
        progress(
            f"throughput: CPU per event {total_cpu / count * 1e6:.2f} µs ({parts}); "
            f"{cores} cores busy {total_cpu / elapsed / cores:.0%}, so at most ~{count * cores / total_cpu:,.0f} events/s"
        )
    gc_ms = sum(collector.seconds) * 1000
    progress(
        f"throughput: garbage collection {gc_ms:,.0f} ms ({', '.join(f'gen{g} {n}×' for g, n in enumerate(collector.runs))})"
    )
    # What the figure stands for: every state the engine holds is in the database, every record committed.
    held = len(ingest.engine.dossiers.states) + len(ingest.engine.incidents.states)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        cur = await conn.execute("SELECT (SELECT count(*) FROM dossier_state) + (SELECT count(*) FROM incident_state)")
        row = await cur.fetchone()
    stored = int(row[0]) if row else 0
    committed = sum(ingest.committed.values())
    progress(f"throughput: {stored:,} of {held:,} states in the database, {committed:,} records committed")
    return {
        "events": count,
        "batches": batches,
        "seconds": round(elapsed, 3),
        "events_per_s": round(rate, 1),
        "loop_cpu_us_per_event": round(loop_cpu / count * 1e6, 2) if count else None,
        "loop_busy": round(loop_cpu / elapsed, 3) if elapsed > 0 else None,
        "cpu_us_per_event": {name: round(seconds / count * 1e6, 2) for name, seconds in cpu_per_event.items()}
        if count
        else {},
        "cores_busy": round(total_cpu / elapsed / cores, 3) if elapsed > 0 else None,
        "events_per_s_if_cores_full": round(count * cores / total_cpu, 1) if total_cpu > 0 else None,
        "processing_seconds": round(processed - first, 3),
        "final_drain_seconds": round(durable - processed, 3),
        "final_emit_seconds": round(done - durable, 3),
        "snapshots_published": emitted,
        "deadlettered": int(ingest.stats["deadlettered"]),
        "dossiers_held": len(ingest.engine.dossiers.states),
        "states_held": held,
        "states_stored": stored,
        "records_committed": committed,
        "gc": collector.figures(),
    }


async def sink_writes(settings: Settings, rows: int) -> dict[str, Any]:
    """`sink.write_changes` for ``rows`` dossier states: first as inserts, then the same rows again as updates."""
    from streams import sink
    from streams.engine import Engine
    from streams.worker import now_us

    engine = Engine(_registry(settings), now_us())
    intake = DossierIntake(f"sink{int(time.time())}")
    for _ in range(rows):
        _, value = intake.next()
        k, parsed = engine.parse(TOPIC_DOSSIER, value, None)
        engine.apply(TOPIC_DOSSIER, k, parsed)
    changes = sink.take_changes(engine)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        t0 = time.monotonic()
        written = await asyncio.to_thread(sink.write_changes, conn, changes)
        t1 = time.monotonic()
        await asyncio.to_thread(sink.write_changes, conn, changes)
        t2 = time.monotonic()
    insert_rate = written / (t1 - t0)
    update_rate = written / (t2 - t1)
    progress(f"sink: {written:,} rows inserted at {insert_rate:,.0f}/s, updated at {update_rate:,.0f}/s")
    return {
        "rows": written,
        "insert_seconds": round(t1 - t0, 3),
        "update_seconds": round(t2 - t1, 3),
        "insert_rows_per_s": round(insert_rate, 1),
        "update_rows_per_s": round(update_rate, 1),
        "rows_per_s": round(min(insert_rate, update_rate), 1),
        "write_path": "COPY into a temp staging table, then one INSERT ... SELECT ... ON CONFLICT DO UPDATE per table, one transaction",
    }
