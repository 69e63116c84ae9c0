"""The database goes away for 60 s, then answers slowly: the worker waits and retries (it neither
skips nor dead-letters anything, and never commits input offsets past what the database holds),
`/readyz` says 503 while WebSocket clients keep their connection and feed, and after catch-up the
KPIs equal `ioc replay` of the input.

Both PostgreSQL clients (`ioc worker`, `ioc api`) reach the database through a TCP proxy that
the test cuts (every connection reset, new ones refused) and slows down (latency on every chunk).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER, Settings
from simulators.stream import SimRecord, _write_lines, generate
from tests.faults import TcpProxy
from tests.integration import checks
from tests.integration.conftest import env_for, free_port, start_components, stop_components

pytestmark = pytest.mark.integration
VN = dt.timezone(dt.timedelta(hours=7))
OUTAGE_S = 60.0
SLOW_S = 20.0
LATENCY_S = 0.05


def _scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _durable_ids(url: str) -> set[str]:
    """The ids of every dossier and incident whose state the database holds (read directly)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT dossier_id FROM dossier_state UNION ALL SELECT incident_id FROM incident_state")
        return {r[0] for r in rows}


def _committed_but_not_durable(
    settings: Settings, offsets: dict[Any, int], log: list[Any], malformed: set[bytes], url: str
) -> list[str]:
    """Dossiers and incidents of committed input records that the database does not hold."""
    durable = _durable_ids(url)
    entity_topics = {settings.topic(TOPIC_DOSSIER), settings.topic(TOPIC_CYBER)}
    missing = []
    for rec in log:
        if rec.topic not in entity_topics or rec.value in malformed:
            continue
        if rec.offset < offsets.get((rec.topic, rec.partition), 0) and rec.key.decode() not in durable:
            missing.append(f"{rec.topic}[{rec.partition}]@{rec.offset} {rec.key.decode()}")
    return missing


async def _input_log(settings: Settings) -> list[Any]:
    return [r for t in (TOPIC_DOSSIER, TOPIC_CYBER) for r in await checks.read_topic(settings, t)]


def test_database_down_60s_then_slow_loses_nothing_and_counts_nothing_twice(
    make_settings: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    real = conninfo_to_dict(database_url)
    with TcpProxy((str(real.get("host") or "127.0.0.1"), int(real.get("port") or 5432))) as proxy:
        proxied = make_conninfo(database_url, host="127.0.0.1", port=str(proxy.port))
        worker_metrics = free_port()
        settings = make_settings(api_port=free_port(), database_url=proxied)
        ensure_topics(settings)
        now = dt.datetime.now(VN)
        records: list[SimRecord] = list(
            generate(23, now - dt.timedelta(minutes=20), 25.0, None, 0.02, 0.02, 0.005, until=now)
        )
        path = tmp_path / "input.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            _write_lines(fh, iter(records))
        malformed = {r.value for r in records if r.malformed}
        bad_records = sum(r.malformed for r in records)
        part_a, part_b, part_c = records[: len(records) * 2 // 5], records[len(records) * 2 // 5 : len(records) * 4 // 5], records[len(records) * 4 // 5 :]  # fmt: skip
        env = {**env_for(settings), "IOC_WORKER_METRICS_PORT": str(worker_metrics)}
        loop = asyncio.new_event_loop()
        procs = start_components(env, ("worker", "api"), settings.api_port)
        worker, api = procs
        base = f"http://127.0.0.1:{settings.api_port}"
        operator = create_token(settings, "operator", subject="outage-test")
        watcher = checks.FeedWatcher(settings.api_port, operator, ["kpi:province"]).start()
        try:

            def caught_up(within: float) -> None:
                deadline = time.monotonic() + within
                while loop.run_until_complete(checks.lag(settings)) > 0:
                    assert worker.poll() is None, "the worker died"
                    assert time.monotonic() < deadline, f"no catch-up in {within:.0f} s"
                    time.sleep(0.5)

            loop.run_until_complete(checks.produce(settings, part_a))
            caught_up(120)

            # --- the database is gone for 60 s; input keeps arriving ---------------------------
            proxy.cut()
            down_at = time.monotonic()
            producing = loop.create_task(checks.produce(settings, part_b, pause_every=2000, pause_s=1.0))
            readiness: list[int] = []
            kpis_status: list[int] = []
            history_status: list[int] = []
            frozen: dict[Any, int] | None = None
            while time.monotonic() - down_at < OUTAGE_S:
                loop.run_until_complete(asyncio.sleep(2.0))
                readiness.append(httpx.get(f"{base}/readyz", timeout=10).status_code)
                auth = {"Authorization": f"Bearer {operator}"}
                kpis_status.append(httpx.get(f"{base}/api/kpis", headers=auth, timeout=10).status_code)
                history_status.append(
                    httpx.get(
                        f"{base}/api/kpis/history",
                        params={"kpi": "dossier.received", "scope": "province", "window": "today"},
                        headers=auth,
                        timeout=15,
                    ).status_code
                )
                offsets = loop.run_until_complete(checks.committed(settings))
                if time.monotonic() - down_at > 5:
                    # A flush already past its write when the link went may commit just after; then nothing moves.
                    frozen = frozen or offsets
                    assert offsets == frozen, "input offsets were committed while the database was down"
            loop.run_until_complete(producing)
            produced_during_outage = len(part_b)
            log = loop.run_until_complete(_input_log(settings))
            committed_at_outage = {(tp.topic, tp.partition): o for tp, o in (frozen or {}).items()}
            assert _committed_but_not_durable(settings, committed_at_outage, log, malformed, database_url) == []
            assert watcher.closed is None, watcher.closed
            assert worker.poll() is None and api.poll() is None
            assert readiness and readiness[-1] == 503 and set(readiness[2:]) == {503}, readiness
            assert set(kpis_status) == {200}, kpis_status  # current values are served from memory
            assert set(history_status) == {503}, history_status  # history needs the database: a clear 503
            retries_during_outage = _scrape(worker_metrics, "ioc_db_retries_total")
            assert retries_during_outage > 0

            # --- back, but slow ----------------------------------------------------------------
            proxy.restore()
            proxy.slow(LATENCY_S)
            slow_at = time.monotonic()
            before_slow = sum(loop.run_until_complete(checks.committed(settings)).values())
            loop.run_until_complete(checks.produce(settings, part_c, pause_every=1000, pause_s=0.5))
            while time.monotonic() - slow_at < SLOW_S:
                time.sleep(1)
            during_slow = sum(loop.run_until_complete(checks.committed(settings)).values())
            assert during_slow > before_slow, "no progress while the database was slow"
            proxy.slow(0.0)
            caught_up(120)
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/readyz", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "/readyz stayed 503 after the database came back"
                time.sleep(0.5)

            # --- nothing lost, nothing twice ---------------------------------------------------
            expected, in_database, on_topic = checks.agreed(loop, settings, database_url, path)
            assert in_database == {}
            assert on_topic == {}
            dead = loop.run_until_complete(checks.deadletters(settings))
            stages = {dict(r.headers).get("ioc.error.stage") for r in dead}
            assert len(dead) == bad_records, "a transient error was dead-lettered (or a bad record was not)"
            assert stages <= {b"decode", b"schema", b"validate"}, stages
            province = {k: v for k, v in expected.items() if k[1] == "province"}
            deadline = time.monotonic() + 10
            while checks.differences(watcher.items(), province) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert checks.differences(watcher.items(), province) == {}
            assert watcher.closed is None, watcher.closed
            assert worker.poll() is None, "the worker was restarted: the outage must only delay it"
        finally:
            watcher.stop()
            stop_components(procs)
            loop.close()
        print(
            json.dumps(
                {
                    "events": len(records),
                    "during_outage": produced_during_outage,
                    "outage_s": OUTAGE_S,
                    "slow_s": SLOW_S,
                    "latency_s": LATENCY_S,
                    "db_retries": retries_during_outage,
                    "connections_reset": proxy.reset,
                    "deadlettered": len(dead),
                    "ws_updates": len(watcher.updates),
                }
            )
        )
