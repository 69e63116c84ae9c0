"""Crash recovery: ≥100,000 events produced while the worker is SIGKILLed at random moments and
restarted; after catch-up the KPIs in the database, on `ioc.kpi.updates` and over the API equal
`ioc replay` of the same input exactly."""

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
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from api.auth import create_token
from ioc.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import INPUT_TOPICS, TOPIC_KPI, Settings
from simulators.stream import _write_lines, generate
from streams.replay import replay
from tests.integration.conftest import env_for, free_port

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
FIELDS = ("value", "numerator", "denominator", "target", "status", "unit", "extra")
KILLS = 5


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "ioc.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def _produce(settings: Settings, records: list[Any], done: asyncio.Event) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=10)
    await producer.start()
    try:
        for i, r in enumerate(records):
            await producer.send(settings.topic(r.topic), r.value, key=r.key)
            if i % 5000 == 4999:
                await producer.flush()
                await asyncio.sleep(0.5)  # spread production over the kills
        await producer.flush()
    finally:
        await producer.stop()
        done.set()


async def _lag(settings: Settings) -> int:
    """Records of the input topics not yet committed by the worker's group (read without joining it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                enable_auto_commit=False)  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.topic_partitions)]
        ends = await consumer.end_offsets(tps)
        lag = 0
        for tp, end in ends.items():
            committed = await consumer.committed(tp)
            lag += end - (committed or 0)
        return lag
    finally:
        await consumer.stop()


async def _topic_latest(settings: Settings) -> dict[tuple[str, str, str], dict[str, Any]]:
    consumer = AIOKafkaConsumer(settings.topic(TOPIC_KPI), bootstrap_servers=settings.kafka_bootstrap,
                                auto_offset_reset="earliest", fetch_max_bytes=64 << 20)  # fmt: skip
    await consumer.start()
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    try:
        idle = 0
        while idle < 6:
            batch = await consumer.getmany(timeout_ms=500, max_records=50_000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for r in records:
                    doc = json.loads(r.value)
                    key = (doc["kpi"], doc["scope"], doc["window"])
                    if key not in latest or doc["seq"] > latest[key]["seq"]:
                        latest[key] = doc
    finally:
        await consumer.stop()
    return latest


def test_worker_killed_five_times_under_load_ends_equal_to_replay(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(api_port=free_port())
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    records = list(generate(17, now - dt.timedelta(minutes=15), 120.0, None, 0.02, 0.02, 0.01, until=now))
    assert len(records) >= 100_000
    path = tmp_path / "input.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        _write_lines(fh, iter(records))
    env = env_for(settings)
    rng = random.Random(99)
    loop = asyncio.new_event_loop()
    done = asyncio.Event()
    producing = loop.create_task(_produce(settings, records, done))
    worker = _worker(env)
    kills = 0
    try:
        while kills < KILLS:
            loop.run_until_complete(asyncio.sleep(rng.uniform(4.0, 9.0)))  # produce while the worker runs
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            kills += 1
            worker = _worker(env)
        loop.run_until_complete(producing)
        deadline = time.monotonic() + 240
        while loop.run_until_complete(_lag(settings)) > 0:
            assert worker.poll() is None, "the worker died on its own"
            assert time.monotonic() < deadline, "no catch-up in 240 s"
            time.sleep(1)
        time.sleep(3)  # one more emit after the last batch
        api = subprocess.Popen([sys.executable, "-m", "ioc.cli", "api"], env=env, stdin=subprocess.DEVNULL)
        try:
            token = create_token(settings, "operator", subject="crash-test")
            for _ in range(60):
                try:
                    r = httpx.get(f"http://127.0.0.1:{settings.api_port}/api/kpis", params={"scope": "province"},
                                  headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
                    if r.status_code == 200 and r.json()["count"]:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            api_items = {(i["kpi"], i["scope"], i["window"]): i for i in r.json()["items"]}
        finally:
            api.terminate()
            api.wait(20)
    finally:
        worker.terminate()
        worker.wait(30)
    topic = loop.run_until_complete(_topic_latest(settings))
    loop.close()

    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT kpi, scope, win, value, numerator, denominator, target, status, unit, extra, as_of FROM kpi_latest"
        ).fetchall()
    as_of = max(r[10] for r in rows)
    database = {(r[0], r[1], r[2]): dict(zip(FIELDS, r[3:10], strict=True)) for r in rows}
    snapshots, _, _ = replay(path, load_registry(), as_of, with_alerts=False)
    expected = {(s.kpi, s.scope, s.window): {f: getattr(s, f) for f in FIELDS} for s in snapshots}
    assert kills == KILLS
    assert expected.keys() == database.keys()
    assert {k: (database[k], expected[k]) for k in database if database[k] != expected[k]} == {}
    on_topic = {k: {f: json.loads(json.dumps(v[f])) for f in FIELDS} for k, v in topic.items()}
    assert {k: (on_topic.get(k), expected[k]) for k in expected if on_topic.get(k) != expected[k]} == {}
    assert api_items, "the API served nothing"
    for key, item in api_items.items():
        assert {f: item.get(f) for f in ("value", "numerator", "denominator", "status")} == {
            f: expected[key][f] for f in ("value", "numerator", "denominator", "status")
        }, key
