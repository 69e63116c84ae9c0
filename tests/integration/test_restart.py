"""A worker that dies after writing state but before committing offsets: its successor rebuilds from the
database, receives the uncommitted records again, and counts nothing twice."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import TOPIC_DOSSIER, TOPIC_KPI, Settings
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
            "SELECT kpi, scope, win, value, numerator, denominator, target, status, unit, extra, quality, as_of"
            " FROM kpi_latest"
        ).fetchall()
    as_of = max(r[11] for r in rows)
    worker = {(r[0], r[1], r[2]): dict(zip(FIELDS, r[3:11], strict=True)) for r in rows}
    snapshots, _, _ = replay(path, load_registry(), as_of)
    expected = {(s.kpi, s.scope, s.window): {f: getattr(s, f) for f in FIELDS} for s in snapshots}
    assert expected.keys() == worker.keys()
    assert {k: (worker[k], expected[k]) for k in worker if worker[k] != expected[k]} == {}


def test_a_crash_between_publishing_and_writing_snapshots_never_reuses_a_seq(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker publishes an emission before writing it: killed in between, subscribers hold a seq
    the database lacks. Its successor must publish every series again with a newer seq."""
    from bench.workload import DossierIntake
    from streams import sink

    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    records = list(generate(6, now - dt.timedelta(minutes=10), 30.0, until=now - dt.timedelta(seconds=1)))
    intake = DossierIntake("restart")  # one commune and agency: after the first batch, no new series

    def intake_batch(n: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(topic=TOPIC_DOSSIER, key=k, value=v) for k, v in (intake.next() for _ in range(n))]

    real_write = sink.write_snapshots

    async def crash(*_: Any) -> None:
        raise RuntimeError("killed between publishing and writing")

    async def lifetimes() -> tuple[dict[str, int], dict[str, int]]:
        first = Ingest(settings, load_registry())
        await first.start()
        try:
            for batch in (records, intake_batch(50)):  # published and written
                await checks.produce(settings, batch)
                await consume(first, first.stats["records"] + len(batch))
            await checks.produce(settings, intake_batch(50))
            while first.stats["records"] < len(records) + 100:  # folded, not yet published
                batch = await first.gather(500)
                if batch:
                    await first.process(batch)
            await first.drain()
            monkeypatch.setattr(sink, "write_snapshots", crash)
            with pytest.raises(RuntimeError, match="killed"):
                await first.emit()
        finally:
            monkeypatch.setattr(sink, "write_snapshots", real_write)
            await first.stop()
        in_database = await _seqs(settings.database_url)
        published = {k: max(seqs) for k, seqs in (await _topic_seqs(settings)).items()}
        second = Ingest(settings, load_registry())
        await second.start()
        try:
            while not second.merger:  # the group's assignment makes it the merger (docs/scaling.md)
                fetched = await second.gather(500)
                if fetched:
                    await second.process(fetched)
            await second.emit()
        finally:
            await second.stop()
        return in_database, published

    in_database, published = asyncio.run(lifetimes())
    ahead = {k for k, s in published.items() if s > in_database.get(k, 0)}
    assert ahead, "the crash left no published seq beyond the database's: the test proves nothing"
    assert all(published[k] == in_database.get(k, 0) + 1 for k in ahead)  # never more than one ahead

    # After the restart: per series, seqs strictly increase in publication order, and the newest
    # on the topic is what the database holds, for every series.
    order = asyncio.run(_topic_seqs(settings))
    assert {k: seqs for k, seqs in order.items() if seqs != sorted(set(seqs))} == {}
    assert {k: seqs[-1] for k, seqs in order.items()} == asyncio.run(_seqs(settings.database_url))
    _, database = checks.database_latest(settings.database_url)
    assert asyncio.run(checks.topic_latest(settings)) == database


async def _topic_seqs(settings: Settings) -> dict[str, list[int]]:
    """Per series (``kpi|scope|window``), the seqs on `ioc.kpi.updates` in publication order."""
    out: dict[str, list[int]] = {}
    for r in await checks.read_topic(settings, TOPIC_KPI, idle_polls=6):
        doc = json.loads(r.value)
        out.setdefault(f"{doc['kpi']}|{doc['scope']}|{doc['window']}", []).append(doc["seq"])
    return out
