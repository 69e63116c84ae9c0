"""Stopping the worker while it folds a batch: the batch is dropped uncommitted, the batch before it
is still made durable and committed, and a successor counts everything exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import Settings
from simulators.stream import _write_lines, generate
from streams import worker
from streams.engine import EntityAggregator
from streams.worker import Ingest
from tests.integration import checks
from tests.integration.conftest import consume

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))


async def _stop_while_folding(settings: Settings) -> tuple[int, int, bool]:
    """Run a worker until it is in the middle of a batch, then stop it; (records folded, records
    committed, whether `run` was still folding when stopped)."""
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    folding = asyncio.Event()
    real_apply = EntityAggregator.apply

    def counted(self: EntityAggregator, *args: Any, **kwargs: Any) -> bool:
        if ingest.stats["records"] > 0:  # a batch was processed: this is a later one
            folding.set()
        return real_apply(self, *args, **kwargs)

    EntityAggregator.apply = counted  # type: ignore[method-assign]
    running = asyncio.create_task(ingest.run())
    try:
        await asyncio.wait_for(folding.wait(), 60)
    finally:
        EntityAggregator.apply = real_apply  # type: ignore[method-assign]
        was_running = not running.done()
        await ingest.stop()
    assert running.done()
    return ingest.stats["records"], sum(ingest.committed.values()), was_running


async def _finish(settings: Settings, total: int) -> None:
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    try:
        await consume(ingest, total)
        await ingest.emit()
    finally:
        await ingest.stop()


def test_stopping_in_the_middle_of_a_batch_loses_nothing_and_counts_nothing_twice(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "LOOP_TURN_EVERY", 16)  # many turns per batch: a stop lands inside one
    settings = make_settings(worker_batch_max=500)
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    records = list(generate(11, now - dt.timedelta(minutes=10), 20.0, None, 0.02, 0.02, until=now))
    path = tmp_path / "input.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        _write_lines(fh, iter(records))
    asyncio.run(checks.produce(settings, records))

    folded, committed, was_running = asyncio.run(_stop_while_folding(settings))
    assert was_running
    assert 0 < committed < len(records)  # the first batches were committed, not the one being folded
    assert committed <= folded
    asyncio.run(_finish(settings, len(records) - committed))

    as_of, got = checks.database_latest(settings.database_url)
    expected = checks.replayed(path, as_of)
    assert got.keys() == expected.keys()
    assert checks.differences(got, expected) == {}
