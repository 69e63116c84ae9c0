"""The live worker and `ioc replay` agree exactly on the same simulated input (duplicates, late, malformed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import Settings
from simulators.stream import _write_lines, generate
from streams.worker import Ingest
from tests.integration import checks
from tests.integration.conftest import consume

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
FIELDS = checks.FIELDS


async def _run_worker_until_caught_up(settings: Settings, expected: int) -> Ingest:
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    try:
        await consume(ingest, expected)
        assert ingest.stats["records"] == expected
        await ingest.drain()
        await ingest.emit()
    finally:
        await ingest.stop()
    return ingest


def test_worker_snapshots_equal_replay_of_the_same_input(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    # 20 simulated minutes ending now, with re-sent, delayed and malformed records.
    records = list(
        generate(31, now - dt.timedelta(minutes=20), 40.0, None, 0.05, 0.05, 0.02, until=now - dt.timedelta(seconds=1))
    )
    assert sum(r.duplicate for r in records) and sum(r.delayed for r in records) and sum(r.malformed for r in records)
    path = tmp_path / "day.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        _write_lines(fh, iter(records))
    asyncio.run(checks.produce(settings, records))
    ingest = asyncio.run(_run_worker_until_caught_up(settings, len(records)))
    assert ingest.stats["deadlettered"] == sum(r.malformed for r in records)

    as_of, worker = checks.database_latest(settings.database_url)
    out = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "replay", str(path), "--until", as_of.isoformat(), "--no-progress"],
        capture_output=True,
        check=True,
        timeout=300,
    )
    replayed = {}
    for line in io.BytesIO(out.stdout):
        doc = json.loads(line)
        assert doc["kind"] in ("kpi", "alert")
        if doc["kind"] == "alert":
            continue
        replayed[(doc["kpi"], doc["scope"], doc["window"])] = {f: doc[f] for f in FIELDS}
    assert len(worker) > 1000
    assert replayed.keys() == worker.keys()
    differences = {k: (worker[k], replayed[k]) for k in worker if worker[k] != replayed[k]}
    assert differences == {}
