"""The worker's Prometheus metrics move with what it does: records in, dead letters by stage, snapshots."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import httpx
import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.registry import load_registry
from ioc.settings import Settings
from simulators.stream import generate
from streams.worker import Ingest
from tests.integration import checks

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and (not labels or want in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _run(settings: Settings, n: int) -> str:
    ingest = Ingest(settings, load_registry())
    await ingest.start()
    try:
        assert ingest.consumer is not None and ingest.metrics_port
        while ingest.stats["records"] < n:
            batch = await ingest.gather(500)
            if batch:
                await ingest.process(batch)
        await ingest.drain()
        await ingest.emit()
        return httpx.get(f"http://127.0.0.1:{ingest.metrics_port}/metrics").text
    finally:
        await ingest.stop()


def test_metrics_count_records_dead_letters_and_snapshots(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(VN)
    records = list(generate(3, now - dt.timedelta(minutes=5), 30.0, None, 0.05, 0.0, 0.05, until=now))
    asyncio.run(checks.produce(settings, records))
    text = asyncio.run(_run(settings, len(records)))
    by_topic = {t: sum(1 for r in records if r.topic == t) for t in {r.topic for r in records}}
    for topic, count in by_topic.items():
        assert _sample(text, "ioc_records_in_total", topic=topic) == count
    assert _sample(text, "ioc_deadlettered_total") == sum(r.malformed for r in records) > 0
    assert _sample(text, "ioc_duplicate_events_total") >= sum(r.duplicate for r in records) > 0
    assert _sample(text, "ioc_kpi_snapshots_total") > 100
    assert _sample(text, "ioc_batch_seconds_count") >= 1
