"""The broker is unreachable for 30 s: the simulator (producer), the worker and the API reconnect by
themselves, WebSocket clients keep their connection and get the feed again, and after catch-up
nothing is counted twice: the KPIs equal `ioc replay` of everything the topics hold.

Every client reaches the broker through a TCP proxy (the broker advertises the proxy's address),
which the test cuts: open connections are reset, new ones refused. The embedded broker keeps its
data in memory, so this is a network partition, not a broker restart; what only a real cluster
shows (a leader failing over, `min.insync.replicas`) is in docs/guarantees.md.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from api.auth import create_token
from entrypoints.embedded import free_port as free_local_port
from entrypoints.embedded.broker import EmbeddedBroker, ensure_topics
from ioc.settings import INPUT_TOPICS, Settings
from tests.faults import TcpProxy
from tests.integration import checks
from tests.integration.conftest import env_for, free_port, start_components, stop_components

pytestmark = pytest.mark.integration
OUTAGE_S = 30.0


async def _input_log(settings: Settings, path: Path) -> int:
    """Write every input record the topics hold as `ioc replay` input (exact bytes); return the count."""
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for logical in INPUT_TOPICS:
            for rec in await checks.read_topic(settings, logical):
                raw = rec.value.decode("utf-8", errors="surrogateescape")
                fh.write(json.dumps({"topic": logical, "raw": raw}, ensure_ascii=True) + "\n")
                count += 1
    return count


def _input_size(settings: Settings, loop: asyncio.AbstractEventLoop) -> int:
    return loop.run_until_complete(checks.input_size(settings))


def test_broker_unreachable_30s_everything_reconnects_and_nothing_counts_twice(
    make_settings: Callable[..., Settings], database_url: str, tmp_path: Path
) -> None:
    broker_port = free_local_port("127.0.0.1")
    with (
        TcpProxy(("127.0.0.1", broker_port)) as proxy,
        EmbeddedBroker(port=broker_port, advertised=f"127.0.0.1:{proxy.port}"),
    ):
        settings = make_settings(api_port=free_port(), kafka_bootstrap=proxy.address, database_url=database_url)
        ensure_topics(settings)
        env = env_for(settings)
        loop = asyncio.new_event_loop()
        procs = start_components(env, ("worker", "api"), settings.api_port)
        worker, api = procs
        sim_log = (tmp_path / "simulate.log").open("wb")
        simulator = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "simulate", "--rate", "150", "--dup-rate", "0.02",
             "--ooo-rate", "0.02", "--bad-rate", "0.005", "--no-progress", "--seed", "4"],
            env=env, stdin=subprocess.DEVNULL, stdout=sim_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{settings.api_port}"
        operator = create_token(settings, "operator", subject="broker-outage-test")
        watcher = checks.FeedWatcher(settings.api_port, operator, ["kpi:province"])
        try:
            deadline = time.monotonic() + 60
            while _input_size(settings, loop) < 1500:
                assert simulator.poll() is None, "the simulator exited"
                assert time.monotonic() < deadline, "the simulator produced too little"
                time.sleep(1)
            watcher.start()

            # --- the broker is unreachable for 30 s --------------------------------------------
            proxy.cut()
            cut_at = time.monotonic()
            readiness: list[int] = []
            while time.monotonic() - cut_at < OUTAGE_S:
                time.sleep(2)
                readiness.append(httpx.get(f"{base}/readyz", timeout=10).status_code)
            assert set(readiness) == {503}, readiness
            assert all(p.poll() is None for p in (worker, api, simulator)), "a component died in the outage"
            assert watcher.closed is None, watcher.closed
            updates_before = len(watcher.updates)
            proxy.restore()
            size_at_restore = _input_size(settings, loop)

            # --- everything reconnects by itself ------------------------------------------------
            deadline = time.monotonic() + 60
            while _input_size(settings, loop) < size_at_restore + 3000:
                assert simulator.poll() is None, "the simulator exited"
                assert time.monotonic() < deadline, "the simulator did not resume producing"
                time.sleep(1)
            # SIGTERM, not Ctrl-C: a suite started as a background job inherits SIGINT ignored
            simulator.send_signal(signal.SIGTERM)
            simulator.wait(30)
            deadline = time.monotonic() + 120
            while loop.run_until_complete(checks.lag(settings)) > 0:
                assert worker.poll() is None, "the worker died"
                assert time.monotonic() < deadline, "the worker did not catch up in 120 s"
                time.sleep(1)
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200

            # --- nothing lost, nothing twice ----------------------------------------------------
            path = tmp_path / "input.jsonl"
            produced = loop.run_until_complete(_input_log(settings, path))
            expected, in_database, on_topic = checks.agreed(loop, settings, database_url, path)
            assert in_database == {}
            assert on_topic == {}
            province = {k: v for k, v in expected.items() if k[1] == "province"}
            deadline = time.monotonic() + 15
            while checks.differences(watcher.items(), province) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert checks.differences(watcher.items(), province) == {}
            assert len(watcher.updates) > updates_before, "the WebSocket feed did not resume"
            assert watcher.closed is None, watcher.closed
            assert worker.poll() is None and api.poll() is None, "a component was restarted"
            dead = loop.run_until_complete(checks.deadletters(settings))
        finally:
            watcher.stop()
            if simulator.poll() is None:
                simulator.kill()
            sim_log.close()
            stop_components(procs)
            loop.close()
        sim_output = (tmp_path / "simulate.log").read_text(errors="replace")
        assert "failed to send" not in sim_output, sim_output[-2000:]
        print(json.dumps({"input_records": produced, "outage_s": OUTAGE_S, "connections_reset": proxy.reset,
                          "deadlettered": len(dead), "ws_updates": len(watcher.updates)}))  # fmt: skip
