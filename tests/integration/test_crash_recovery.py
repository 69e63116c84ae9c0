"""Crash recovery: ≥100,000 events produced while the worker is SIGKILLed at random moments and
restarted; after catch-up the KPIs in the database, on `ioc.kpi.updates` and over the API equal
`ioc replay` of the same input exactly."""

from __future__ import annotations

import asyncio
import datetime as dt
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

from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import Settings
from simulators.stream import _write_lines, generate
from tests.integration import checks
from tests.integration.conftest import env_for, free_port

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
KILLS = 5


def _worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def _produce(settings: Settings, records: list[Any]) -> None:
    await checks.produce(settings, records, pause_every=5000, pause_s=0.5)  # spread production over the kills


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
    producing = loop.create_task(_produce(settings, records))
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
        while loop.run_until_complete(checks.lag(settings)) > 0:
            assert worker.poll() is None, "the worker died on its own"
            assert time.monotonic() < deadline, "no catch-up in 240 s"
            time.sleep(1)
        checks.agreed(loop, settings, settings.database_url, path)  # until the emit after the last batch is out
        api = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "api"], env=env, stdin=subprocess.DEVNULL)
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
    topic = loop.run_until_complete(checks.topic_latest(settings))
    loop.close()

    as_of, database = checks.database_latest(settings.database_url)
    expected = checks.replayed(path, as_of)
    assert kills == KILLS
    assert checks.differences(database, expected) == {}
    assert checks.differences(topic, expected) == {}
    assert api_items, "the API served nothing"
    for key, item in api_items.items():
        assert {f: item.get(f) for f in ("value", "numerator", "denominator", "status")} == {
            f: expected[key][f] for f in ("value", "numerator", "denominator", "status")
        }, key
