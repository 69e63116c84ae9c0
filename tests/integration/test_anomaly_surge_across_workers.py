"""With two workers, the merger's surge detector sees every dossier partition's receipts (through the partials):
a surge in a commune whose receipts all sit in a partition the merger does not own is found.

Needs a broker with working consumer groups (as tests/integration/test_workers_scale.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_ALERTS, TOPIC_DOSSIER, TOPIC_PARTIALS, Settings
from streams import shards
from streams.shards import partition_of
from tests.integration import checks
from tests.integration.conftest import env_for, free_port
from tests.integration.test_workers_scale import _stop, _worker

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
PARTITIONS = 4
#: One week of history is enough here (the default warm-up is two), and no sensors move the watermark.
ANOMALY_CONFIG = "max_lag_s: 0\nsurge: {weeks: 1, min_weeks: 1}\n"
STEADY, SURGING = "16681", "17935"  # a Vinh ward, Nam Đàn


class _Record:
    def __init__(self, key: str, value: dict[str, Any]) -> None:
        self.topic = TOPIC_DOSSIER
        self.key = key.encode()
        self.value = orjson.dumps(value)


def _owned(port: int, dossier_topic: str) -> tuple[bool, set[int]]:
    """(merger?, dossier partitions owned) from a worker's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    merger = any(line.startswith("ioc_worker_merger ") and line.endswith(" 1.0") for line in text.splitlines())
    owned = set()
    for m in re.finditer(r"^ioc_worker_partition_owned\{([^}]*)\} 1\.0$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("topic") == dossier_topic:
            owned.add(int(labels["partition"]))
    return merger, owned


def _receipts(commune: str, partition: int, surge_at: dt.datetime) -> Iterator[_Record]:
    """Eight days of 5 receipts an hour in ``commune`` (30 at ``surge_at`` in Nam Đàn), and one more
    ordinary hour after it; its dossiers keyed into ``partition``."""
    ids = (f"SURGE-TEST-{commune}-{i}" for i in range(10**9))
    hour = surge_at - dt.timedelta(days=8)
    while hour <= surge_at + dt.timedelta(hours=1):
        n = 30 if commune == SURGING and hour == surge_at else 5
        for k in range(n):
            dossier = next(i for i in ids if partition_of(i, PARTITIONS) == partition)
            t = hour + dt.timedelta(seconds=k)
            yield _Record(dossier, {
                "schema": "ioc.dossier.v1", "event_id": f"e-{dossier}", "dossier_id": dossier,
                "type": "received", "occurred_at": t.isoformat(), "commune_code": commune,
                "agency_code": f"UBND-{commune}", "procedure_code": "P1", "channel": "in_person",
                "full_online": False, "due_at": (t + dt.timedelta(days=5)).isoformat(),
            })  # fmt: skip
        hour += dt.timedelta(hours=1)


def _published_until(settings: Settings, partition: int) -> int | None:
    """The newest minute with a Nam Đàn receipt in the latest partial of ``partition`` on the topic."""
    latest: shards.Partial | None = None
    for r in asyncio.run(checks.read_topic(settings, TOPIC_PARTIALS, idle_polls=2)):
        p = shards.decode_partial(r.value)
        if (
            p.group == settings.consumer_group
            and p.partition == partition
            and (latest is None or p.stamp > latest.stamp)
        ):
            latest = p
    raw = latest.series.get(("recv", f"commune:{SURGING}")) if latest is not None else None
    return max(raw[2]) if raw and raw[2] else None


def test_the_merger_finds_a_surge_in_a_partition_it_does_not_own(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    config = tmp_path / "anomaly.yaml"
    config.write_text(ANOMALY_CONFIG, encoding="utf-8")
    settings = make_settings(topic_partitions=PARTITIONS)
    ensure_topics(settings)
    env = {**env_for(settings), "IOC_ANOMALY_CONFIG": str(config)}
    ports = [free_port(), free_port()]
    workers = [_worker({**env, "IOC_WORKER_METRICS_PORT": str(p)}, tmp_path / f"w{i}.log") for i, p in enumerate(ports)]
    dossier_topic = TOPIC_DOSSIER  # the metric names the logical topic
    try:
        deadline = time.monotonic() + 120
        while True:
            assert all(w.poll() is None for w in workers), "a worker exited"
            try:
                roles = [_owned(p, dossier_topic) for p in ports]
            except httpx.HTTPError:
                roles = []
            if (
                len(roles) == 2
                and [m for m, _ in roles].count(True) == 1
                and sorted(p for _, owned in roles for p in owned) == list(range(PARTITIONS))
                and all(owned for _, owned in roles)
            ):
                break
            assert time.monotonic() < deadline, f"no stable assignment in 120 s: {roles}"
            time.sleep(1)
        merger_owns = next(owned for m, owned in roles if m)
        other_owns = next(owned for m, owned in roles if not m)
        # Within `history_after_h` (3 h) of the clock: an older finding would be history, not an alert.
        surge_at = dt.datetime.now(VN).replace(second=0, microsecond=0) - dt.timedelta(hours=2)
        # Nam Đàn's receipts first, in the other worker's partition, until its partial holds them all;
        # then the ward's, in the merger's own, which move the merger's watermark (live, partials are
        # a fraction of a second behind; here eight days arrive at once).
        remote = min(other_owns)
        asyncio.run(checks.produce(settings, list(_receipts(SURGING, remote, surge_at))))
        last_minute = int((surge_at + dt.timedelta(hours=1, seconds=4)).timestamp()) // 60
        deadline = time.monotonic() + 120
        while (_published_until(settings, remote) or 0) < last_minute:
            assert time.monotonic() < deadline, "the other worker published no partial of its receipts in 120 s"
            time.sleep(1)
        asyncio.run(checks.produce(settings, list(_receipts(STEADY, min(merger_owns), surge_at))))

        deadline = time.monotonic() + 180
        while True:
            assert all(w.poll() is None for w in workers), "a worker exited"
            events = [orjson.loads(r.value) for r in asyncio.run(checks.read_topic(settings, TOPIC_ALERTS))]
            fired = [e for e in events if e["rule"] == "anomaly.dossier_surge" and e["state"] == "firing"]
            if fired:
                break
            assert time.monotonic() < deadline, "no surge alert in 180 s"
            time.sleep(2)
        assert {e["scope"] for e in fired} == {f"commune:{SURGING}"}
        explanation = fired[0]["extra"]["explanation"]
        assert explanation["observed"] >= 30
        assert explanation["expected_high"] < 30
        window_from = dt.datetime.fromisoformat(explanation["window_from"])
        assert window_from <= surge_at < dt.datetime.fromisoformat(explanation["window_to"])
    finally:
        _stop(workers)
