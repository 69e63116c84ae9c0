"""A worker that dies after writing state but before committing offsets: its successor rebuilds from the
database, receives the uncommitted records again, and counts nothing twice."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ioc.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import Settings
from simulators.stream import _write_lines, generate
from streams.replay import replay
from streams.worker import Ingest
from tests.integration import checks
from tests.integration.checks import FIELDS
from tests.integration.conftest import consume

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))


async def _consume(ingest: Ingest, records: int, *, commit_after: int | None) -> None:
    """Process until ``records`` have been seen; stop committing offsets after ``commit_after`` records."""
    assert ingest.consumer is not None
    real_commit = ingest.consumer.commit

    async def commit(offsets: Any = None) -> None:
        if commit_after is None or ingest.stats["records"] <= commit_after:
            await real_commit(offsets)

    ingest.consumer.commit = commit  # type: ignore[method-assign]
    await consume(ingest, records)


async def _lifetimes(settings: Settings, total: int) -> tuple[dict[str, int], dict[str, int], int]:
    first = Ingest(settings, load_registry())
    await first.start()
    try:
        await _consume(first, total, commit_after=total // 3)
    finally:
        await first.stop()  # the "crash": two thirds of the input processed and written, not committed
    seqs_before = await _seqs(settings.database_url)
    second = Ingest(settings, load_registry())
    await second.start()
    try:
        # It must see the uncommitted two thirds again (and only those, at least).
        await _consume(second, total - total // 3 - 1000, commit_after=None)
        await second.emit()
    finally:
        await second.stop()
    return seqs_before, await _seqs(settings.database_url), second.stats["records"]


async def _seqs(url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT kpi || '|' || scope || '|' || win, seq FROM kpi_latest")
        return {k: s for k, s in await cur.fetchall()}


def test_restart_after_uncommitted_batches_counts_nothing_twice(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    records = list(
        generate(5, now - dt.timedelta(minutes=15), 40.0, None, 0.03, 0.03, 0.01, until=now - dt.timedelta(seconds=1))
    )
    path = tmp_path / "input.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        _write_lines(fh, iter(records))
    asyncio.run(checks.produce(settings, records))
    before, after, redelivered = asyncio.run(_lifetimes(settings, len(records)))
    assert redelivered >= len(records) - len(records) // 3 - 1000  # the uncommitted part came again

    # Sequence numbers continue from the database, never going back.
    assert all(after[k] >= s for k, s in before.items())
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT kpi, scope, win, value, numerator, denominator, target, status, unit, extra, as_of FROM kpi_latest"
        ).fetchall()
    as_of = max(r[10] for r in rows)
    worker = {(r[0], r[1], r[2]): dict(zip(FIELDS, r[3:10], strict=True)) for r in rows}
    snapshots, _, _ = replay(path, load_registry(), as_of)
    expected = {(s.kpi, s.scope, s.window): {f: getattr(s, f) for f in FIELDS} for s in snapshots}
    assert expected.keys() == worker.keys()
    assert {k: (worker[k], expected[k]) for k in worker if worker[k] != expected[k]} == {}
