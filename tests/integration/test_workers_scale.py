"""Several workers in one consumer group: SIGKILLs of different workers under load, workers added and
removed under load, a rebalance while a batch is being flushed. Each ends with the database and
`ioc.kpi.updates` equal to `ioc replay` of the same input exactly.

Needs a broker with working consumer groups (Apache Kafka: IOC_KAFKA_BOOTSTRAP, or the embedded one
once it is Kafka)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoints.embedded.broker import ensure_topics
from entrypoints.embedded.kafka import WORKER_SESSION_TIMEOUT_MS
from ioc.registry import load_registry
from ioc.settings import TOPIC_DOSSIER, TOPIC_SENSOR, Settings
from simulators.stream import _write_lines, generate
from streams import sink
from streams.worker import Ingest
from tests.integration import checks
from tests.integration.conftest import env_for, free_port, start_components, stop_components

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
PARTITIONS = 6
#: The workers' session as `ioc dev` runs them on the embedded broker (short: a killed worker's
#: partitions move within it; a busy worker must not be evicted by mistake); an external broker's
#: floor may be Kafka's default 6 s.
SESSION: dict[str, Any] = (
    {} if os.environ.get("IOC_KAFKA_BOOTSTRAP") else {"worker_session_timeout_ms": WORKER_SESSION_TIMEOUT_MS}
)


def _worker(env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out)  # fmt: skip


def _input(tmp_path: Path, seed: int, minutes: float, rate: float) -> tuple[list[Any], Path]:
    now = dt.datetime.now(VN)
    records = list(generate(seed, now - dt.timedelta(minutes=minutes), rate, None, 0.02, 0.02, 0.01, until=now))
    path = tmp_path / "input.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        _write_lines(fh, iter(records))
    return records, path


def _caught_up(loop: asyncio.AbstractEventLoop, settings: Settings, workers: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 300
    while loop.run_until_complete(checks.lag(settings)) > 0:
        assert all(w.poll() is None for w in workers), "a worker died on its own"
        assert time.monotonic() < deadline, "no catch-up in 300 s"
        time.sleep(1)


def _assert_equal_to_replay(loop: asyncio.AbstractEventLoop, settings: Settings, path: Path) -> dict[Any, Any]:
    expected, in_database, on_topic = checks.agreed(loop, settings, settings.database_url, path, within_s=60)
    assert expected
    assert in_database == {}
    assert on_topic == {}
    return expected


def _stop(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.terminate()
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()


def test_three_workers_sigkilled_in_turn_under_load_end_equal_to_replay(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(topic_partitions=PARTITIONS, **SESSION)
    ensure_topics(settings)
    records, path = _input(tmp_path, 23, 10, 100.0)
    assert len(records) >= 50_000
    env = env_for(settings)
    rng = random.Random(7)
    loop = asyncio.new_event_loop()
    producing = loop.create_task(checks.produce(settings, records, pause_every=4000, pause_s=0.5))
    workers = [_worker(env, tmp_path / f"worker{i}.log") for i in range(3)]
    killed: list[int] = []
    try:
        for _ in range(6):
            loop.run_until_complete(asyncio.sleep(rng.uniform(4.0, 8.0)))
            i = rng.choice([j for j in range(3) if j != (killed[-1] if killed else -1)])  # a different one each time
            os.kill(workers[i].pid, signal.SIGKILL)
            workers[i].wait()
            killed.append(i)
            workers[i] = _worker(env, tmp_path / f"worker{i}.log")
        loop.run_until_complete(producing)
        _caught_up(loop, settings, workers)
        _assert_equal_to_replay(loop, settings, path)
    finally:
        _stop(workers)
        loop.close()
    assert len(set(killed)) == 3, killed
    print(json.dumps({"records": len(records), "killed": killed}))


def test_workers_added_and_removed_under_load_end_equal_to_replay(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(topic_partitions=PARTITIONS, **SESSION)
    ensure_topics(settings)
    records, path = _input(tmp_path, 29, 8, 100.0)
    env = env_for(settings)
    loop = asyncio.new_event_loop()
    producing = loop.create_task(checks.produce(settings, records, pause_every=4000, pause_s=0.5))
    workers = [_worker(env, tmp_path / "w0.log")]
    try:
        # 1 → 2 → 3 → 2 (the first, maybe the merger, leaves) → 3 → 1, under load.
        steps = ["add", "add", "remove-first", "add", "remove", "remove"]
        for n, step in enumerate(steps):
            loop.run_until_complete(asyncio.sleep(5.0))
            if step == "add":
                workers.append(_worker(env, tmp_path / f"w{n + 1}.log"))
            else:
                leaving = workers.pop(0 if step == "remove-first" else -1)
                leaving.terminate()
                assert leaving.wait(60) in (0, -signal.SIGTERM, 143)
        loop.run_until_complete(producing)
        assert len(workers) == 1
        _caught_up(loop, settings, workers)
        _assert_equal_to_replay(loop, settings, path)
    finally:
        _stop(workers)
        loop.close()


async def _slow_flush_then_rebalance(
    settings: Settings, env: dict[str, str], tmp_path: Path, total: int
) -> dict[str, int]:
    """An in-process worker whose state writes take 3 s; a second worker joins while a write is in
    flight, so the revocation lands mid-flush. Returns what happened."""
    real_write = sink.write_changes
    writing = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_write(conn: Any, changes: sink.Changes) -> int:
        loop.call_soon_threadsafe(writing.set)
        time.sleep(3.0)
        return real_write(conn, changes)

    sink.write_changes = slow_write
    ingest = Ingest(settings, load_registry())
    other: subprocess.Popen[bytes] | None = None
    try:
        await ingest.start()
        running = asyncio.create_task(ingest.run())
        emitting = asyncio.create_task(_emit_forever(ingest))
        await asyncio.wait_for(writing.wait(), 60)
        rebalances = ingest.rebalances
        other = _worker(env, tmp_path / "other.log")
        deadline = time.monotonic() + 90
        while ingest.rebalances == rebalances:
            assert time.monotonic() < deadline, "no rebalance in 90 s"
            await asyncio.sleep(0.2)
        sink.write_changes = real_write
        deadline = time.monotonic() + 300
        while await checks.lag(settings) > 0:
            assert time.monotonic() < deadline, "no catch-up in 300 s"
            await asyncio.sleep(1)
        await asyncio.sleep(2)
        running.cancel()
        emitting.cancel()
        return {"rebalances": ingest.rebalances, "records": ingest.stats["records"], "total": total,
                "commit_failures": ingest.stats["commit_failures"]}  # fmt: skip
    finally:
        sink.write_changes = real_write
        await ingest.stop()
        if other is not None:
            _stop([other])


async def _emit_forever(ingest: Ingest) -> None:
    while True:
        await ingest.emit()
        await asyncio.sleep(0.2)


def test_a_rebalance_during_a_flush_loses_nothing_and_counts_nothing_twice(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(topic_partitions=PARTITIONS, worker_batch_max=2000, **SESSION)
    ensure_topics(settings)
    records, path = _input(tmp_path, 31, 5, 60.0)
    asyncio.run(checks.produce(settings, records))
    env = env_for(settings)
    happened = asyncio.run(_slow_flush_then_rebalance(settings, env, tmp_path, len(records)))
    # Then one worker finishes (the in-process one has stopped: the other takes every partition).
    workers = [_worker(env, tmp_path / "last.log")]
    loop = asyncio.new_event_loop()
    try:
        _caught_up(loop, settings, workers)
        _assert_equal_to_replay(loop, settings, path)
    finally:
        _stop(workers)
        loop.close()
    assert happened["rebalances"] >= 2
    print(json.dumps(happened))


def test_readyz_and_metrics_show_each_workers_partitions_lag_and_the_merger(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(topic_partitions=PARTITIONS, api_port=free_port())
    ensure_topics(settings)
    records, _ = _input(tmp_path, 37, 2, 50.0)
    asyncio.run(checks.produce(settings, records))
    ports = [free_port(), free_port()]
    env = env_for(settings)
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "worker"],
            env={**env, "IOC_WORKER_METRICS_PORT": str(p)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for p in ports
    ]
    procs = start_components(env, ("api",), settings.api_port)
    try:
        deadline = time.monotonic() + 120
        while True:
            body = httpx.get(f"http://127.0.0.1:{settings.api_port}/readyz", timeout=10).json()
            group = body.get("workers") or {}
            members = group.get("workers", [])
            dossier = sorted(p for m in members for p in m["partitions"].get(TOPIC_DOSSIER, []))
            if len(members) == 2 and dossier == list(range(PARTITIONS)) and all(m["lag"] == 0 for m in members):
                break
            assert time.monotonic() < deadline, body
            time.sleep(1)
        assert [m["merger"] for m in members].count(True) == 1
        (merger,) = [m for m in members if m["merger"]]
        assert merger["partitions"][TOPIC_SENSOR] == list(range(PARTITIONS))
        roles = []
        for port in ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            owned = [line for line in text.splitlines() if line.startswith("ioc_worker_partition_owned{")]
            merging = [line for line in text.splitlines() if line.startswith("ioc_worker_merger ")]
            roles.append((len(owned), merging[0].endswith(" 1.0")))
        assert sorted(r[1] for r in roles) == [False, True]
        assert sum(n for n, _ in roles) == 3 * PARTITIONS  # every input partition owned once
    finally:
        stop_components(procs)
        _stop(workers)
