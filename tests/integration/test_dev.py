"""`ioc dev` as a user runs it: ready lines, a crashed component restarted, two side by side, clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from entrypoints.embedded.kafka import unavailable_reason as kafka_unavailable

pytestmark = pytest.mark.integration

READY_LINES = ("kafka", "database", "api", "wall", "token", "metrics")


class Dev:
    """One `ioc dev` process with its stdout lines and stderr log collected as they come."""

    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IOC_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "dev", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: dict[str, str] = {}
        self.log: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            name, _, value = line.strip().partition(": ")
            if name in READY_LINES:
                self.lines[name] = value

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < len(READY_LINES):
            assert self.proc.poll() is None, "ioc dev exited:\n" + "".join(self.log[-30:])
            assert time.monotonic() < deadline, "ioc dev not ready:\n" + "".join(self.log[-30:])
            time.sleep(0.2)

    def wait_log(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.log):
                m = re.search(pattern, line)
                if m:
                    return m
            assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n" + "".join(self.log[-30:])
            time.sleep(0.2)

    def stop(self, signum: int, timeout: float = 60) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout)


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            alive.append(pid)
    return alive


def test_two_dev_instances_side_by_side_restart_a_crashed_worker_and_stop_cleanly() -> None:
    a, b = Dev("--rate", "40", "--backfill", "1"), Dev("--no-simulators")
    try:
        a.wait_ready()
        b.wait_ready()
        assert a.lines["api"] != b.lines["api"] and a.lines["kafka"] != b.lines["kafka"]
        assert a.lines["database"] != b.lines["database"]
        assert a.lines["wall"] == a.lines["api"] + "/wall"
        for dev in (a, b):
            r = httpx.get(dev.lines["api"] + "/api/units", headers={"Authorization": f"Bearer {dev.lines['token']}"})
            assert r.status_code == 200 and r.json()["count"] == 130
        # KPIs flow in the instance with simulators.
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(
                a.lines["api"] + "/api/kpis",
                params={"kpi": "dossier.received", "scope": "province"},
                headers={"Authorization": f"Bearer {a.lines['token']}"},
            )
            if any(i["value"] for i in r.json()["items"]):
                break
            assert time.monotonic() < deadline, "no KPI within 60 s of ready"
            time.sleep(0.5)
        # The back-fill went first (one day here; 30 by default), then the live simulators.
        assert int(a.wait_log(r"backfill: 1 days, (\d+) events").group(1)) > 1000
        a.wait_log(r"simulating at 40.0 records/s")
        # Both components' Prometheus metrics are where `ioc dev` says, and move under the simulators.
        api_metrics, worker_metrics = a.lines["metrics"].split()
        assert "ioc_http_requests_total" in httpx.get(api_metrics).text

        def records_in() -> float:
            text = httpx.get(worker_metrics).text
            return sum(
                float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ioc_records_in_total{")
            )

        before = records_in()
        deadline = time.monotonic() + 30
        while records_in() <= before:
            assert time.monotonic() < deadline, "worker metrics do not move"
            time.sleep(0.5)
        # A crashed worker is restarted, and the restart is logged.
        worker_pid = int(a.wait_log(r"worker started \(pid (\d+)\)").group(1))
        os.kill(worker_pid, signal.SIGKILL)
        a.wait_log(r"worker exited with code -9")
        a.wait_log(r"restarting worker \(restart #1\)")
        children = [int(m) for m in re.findall(r"started \(pid (\d+)\)", "".join(a.log + b.log))]
    finally:
        # Ctrl-C for one, SIGTERM (a service manager, `timeout`) for the other.
        codes = [a.stop(signal.SIGINT), b.stop(signal.SIGTERM)]
    assert codes == [0, 0]
    assert _pids_alive(children) == []
    for dev in (a, b):
        assert any("embedded PostgreSQL stopped" in line for line in dev.log)
        assert any("embedded broker stopped" in line for line in dev.log)
        if kafka_unavailable() is None:  # Apache Kafka, whose temp data dir goes with it
            ready = next(m for line in dev.log if (m := re.search(r"embedded Kafka \S+ ready .*\(data (\S+);", line)))
            assert not Path(ready.group(1)).exists()


def test_dev_with_two_workers_shares_the_partitions_and_restarts_a_killed_one() -> None:
    dev = Dev("--workers", "2", "--rate", "40")
    try:
        dev.wait_ready()
        _, *worker_metrics = dev.lines["metrics"].split()
        assert len(worker_metrics) == 2

        def group() -> list[dict[str, object]]:
            body = httpx.get(dev.lines["api"] + "/readyz", timeout=10).json()
            return list((body.get("workers") or {}).get("workers", []))

        deadline = time.monotonic() + 90
        while len(members := group()) != 2 or not all(m["partitions"] for m in members):
            assert time.monotonic() < deadline, f"two workers do not share the partitions: {members}"
            time.sleep(1)
        assert [m["merger"] for m in members].count(True) == 1
        # Either worker SIGKILLed: the supervisor restarts it and the group has two members again.
        pid = int(dev.wait_log(r"worker-2 started \(pid (\d+)\)").group(1))
        os.kill(pid, signal.SIGKILL)
        dev.wait_log(r"restarting worker-2 \(restart #1\)")
        deadline = time.monotonic() + 120
        while len(members := group()) != 2 or not all(m["partitions"] for m in members):
            assert time.monotonic() < deadline, f"the restarted worker did not rejoin: {members}"
            time.sleep(1)
        # The back-fill and the catch-up after the kill take a while: wait for the province's count.
        def received() -> list[object]:
            r = httpx.get(dev.lines["api"] + "/api/kpis", params={"kpi": "dossier.received", "scope": "province"},
                          headers={"Authorization": f"Bearer {dev.lines['token']}"}, timeout=10)  # fmt: skip
            return [i["value"] for i in r.json()["items"]]

        deadline = time.monotonic() + 120
        while not any(values := received()):
            assert time.monotonic() < deadline, f"no dossier counted after the restart: {values}"
            time.sleep(1)
    finally:
        code = dev.stop(signal.SIGINT)
    assert code == 0
