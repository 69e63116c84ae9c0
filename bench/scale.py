"""`ioc bench --only workers,failover`: 1, 2 and 4 worker processes on one backlog, and the failover time.

``workers``: for each count, a fresh database and consumer group read the same backlog from the
start; the figure is records / seconds from the workers' start to the group's last commit, with the
CPU seconds of each worker process, of PostgreSQL and of the broker over the run.

``failover``: the API, two workers and the simulator at a steady rate; each round SIGKILLs one
worker (the merger and the other in turn), sends at once a new dossier to a partition the killed
worker owned, and times how long until the API serves it (its agency is new: the KPI appears).
The killed worker is then started again, as a supervisor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import live
from bench.stats import process_cpu
from bench.workload import progress
from ioc.settings import INPUT_TOPICS, TOPIC_DOSSIER, Settings
from streams.shards import partition_of

WORKER_COUNTS = (1, 2, 4)
CATCH_UP_TIMEOUT_S = 1800.0


def _worker(env: dict[str, str], metrics_port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    """`ioc worker`; with ``log``, at INFO level into that file (rebalances, rebuilds, the merger)."""
    extra = {"IOC_WORKER_METRICS_PORT": str(metrics_port)}
    out: Any = None
    if log is not None:
        extra["IOC_LOG_LEVEL"] = "INFO"
        out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", "worker"],
        env={**env, **extra},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        start_new_session=True,
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _metrics(port: int) -> dict[str, Any]:
    """What a worker's /metrics says of its role: merger or not, and the partitions it owns."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {"up": False}
    merger = False
    owned: list[tuple[str, int]] = []
    for line in text.splitlines():
        if line.startswith("ioc_worker_merger "):
            merger = float(line.split()[-1]) == 1.0
        elif line.startswith("ioc_worker_partition_owned{"):
            labels = dict(kv.split("=", 1) for kv in line[line.index("{") + 1 : line.index("}")].split(","))
            owned.append((labels["topic"].strip('"'), int(labels["partition"].strip('"'))))
    return {"up": True, "merger": merger, "owned": owned}


# --- the CPU of the services -------------------------------------------------------------------


def _postgres_pids(database_url: str) -> set[int]:
    """The postmaster serving ``database_url`` and its children (backends, writers)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    try:
        postmaster = int(Path(str(row[0] if row else ""), "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return set()
    pids = {postmaster}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int(Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()[1]) == postmaster:
                    pids.add(int(entry.name))
    return pids


def _broker_pids(bootstrap: str) -> set[int]:
    """The Kafka JVM listening on ``bootstrap``'s port (its server.properties names the port)."""
    port = bootstrap.split(",")[0].rsplit(":", 1)[-1]
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            if b"kafka.Kafka" in argv:
                config = Path(argv[argv.index(b"kafka.Kafka") + 1].decode())
                if f":{port}" in config.read_text():
                    found.add(int(entry.name))
    return found


def _cpu(pids: set[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = process_cpu(pid)[1]
    return out


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two samples; a process born meanwhile counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


async def _lag(settings: Settings) -> int:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [
            TopicPartition(settings.topic(t), p)
            for t in INPUT_TOPICS
            for p in sorted(consumer.partitions_for_topic(settings.topic(t)) or range(settings.topic_partitions))
        ]
        ends = await consumer.end_offsets(tps)
        done = {tp: (await consumer.committed(tp)) or 0 for tp in tps}
    finally:
        await consumer.stop()
    return sum(end - done[tp] for tp, end in ends.items())


# --- throughput with 1, 2 and 4 workers ----------------------------------------------------------


def workers(
    settings_for: Callable[[int], Settings], events: int, counts: tuple[int, ...] = WORKER_COUNTS
) -> dict[str, Any]:
    """Each count of workers reads the whole backlog (``events`` records) with its own group and database."""
    runs = []
    for n in counts:
        s = settings_for(n)
        env = live.child_env(s)
        ports = [live.free_port() for _ in range(n)]
        services = {"postgresql": _postgres_pids(s.database_url), "broker": _broker_pids(s.kafka_bootstrap)}
        before = {name: _cpu(pids) for name, pids in services.items()}
        progress(f"workers: {n} worker(s) reading {events:,} records")
        started = time.monotonic()
        procs = [_worker(env, port) for port in ports]
        try:
            deadline = started + CATCH_UP_TIMEOUT_S
            while asyncio.run(_lag(s)) > 0:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a worker exited during the run")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{n} workers did not catch up in {CATCH_UP_TIMEOUT_S:.0f} s")
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            roles = [_metrics(port) for port in ports]
            worker_cpu = [live.cpu_seconds(p.pid) for p in procs]
            services = {name: _postgres_pids(s.database_url) if name == "postgresql" else pids
                        for name, pids in services.items()}  # fmt: skip
            after = {name: _cpu(pids) for name, pids in services.items()}
        finally:
            _stop(procs)
        service_cpu = {name: round(_used(before[name], after[name]), 2) for name in services}
        merger_cpu = sum(c for c, r in zip(worker_cpu, roles, strict=True) if r.get("merger"))
        run = {
            "workers": n,
            "seconds": round(elapsed, 2),
            "events_per_s": round(events / elapsed),
            "worker_cpu_s": [round(c, 2) for c in worker_cpu],
            "merger_cpu_s": round(merger_cpu, 2),
            "service_cpu_s": service_cpu,
            "cpu_us_per_event": {
                "workers": round(sum(worker_cpu) / events * 1e6, 1),
                "merger": round(merger_cpu / events * 1e6, 1),
                **{name: round(v / events * 1e6, 1) for name, v in service_cpu.items()},
            },
        }
        progress(f"workers: {n} → {run['events_per_s']:,} records/s in {elapsed:.1f} s")
        runs.append(run)
    return {"events": events, "runs": runs, "cpus": os.cpu_count()}


# --- failover -----------------------------------------------------------------------------------


def _probe(run: str, k: int, partitions: int, target: int) -> tuple[str, bytes, bytes]:
    """A new dossier of a new agency, keyed into partition ``target``: (agency, key, value)."""
    agency = f"PROBE.{run}.{k}"
    for i in range(10_000):
        dossier_id = f"PROBE-{run}-{k}-{i}"
        if partition_of(dossier_id, partitions) == target:
            break
    now = dt.datetime.now(dt.UTC)
    value = {
        "schema": "ioc.dossier.v1",
        "event_id": str(uuid.uuid4()),
        "dossier_id": dossier_id,
        "type": "received",
        "occurred_at": now.isoformat(timespec="milliseconds"),
        "commune_code": "16941",
        "agency_code": agency,
        "procedure_code": "1.000894",
        "channel": "online",
        "full_online": True,
        "due_at": (now + dt.timedelta(days=3)).isoformat(timespec="milliseconds"),
    }
    return agency, dossier_id.encode(), orjson.dumps(value)


async def _producer(bootstrap: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    return producer


def _wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)
    return time.monotonic() - started


def _nearest_rank(values: list[float], q: float) -> float | None:
    """The ``q`` quantile by nearest rank (of ten values, p99 is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def failover(settings: Settings, kills: int = 10, rate: float = 200.0) -> dict[str, Any]:
    """Kill a worker ``kills`` times under ``rate`` events/s; seconds until an event of its partition shows."""
    env = live.child_env(settings)
    token = live.token_for(settings)
    run = uuid.uuid4().hex[:6]
    partitions = settings.topic_partitions
    dossiers = settings.topic(TOPIC_DOSSIER)
    ports = [live.free_port(), live.free_port()]
    rounds: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    producer = loop.run_until_complete(_producer(settings.kafka_bootstrap))
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.api_port}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=5)  # fmt: skip
    logs = Path("artifacts") / f"failover-{run}"
    logs.mkdir(parents=True, exist_ok=True)
    procs = [_worker(env, port, logs / f"worker{i}.log") for i, port in enumerate(ports)]

    def visible(agency: str) -> bool:
        try:
            r = client.get("/api/kpis", params={"scope": f"agency:{agency}"})
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and bool(r.json().get("count"))

    def stable() -> bool:
        roles = [_metrics(port) for port in ports]
        if not all(r.get("up") for r in roles) or sum(bool(r.get("merger")) for r in roles) != 1:
            return False
        owned = [tp for r in roles for tp in r["owned"] if tp[0] == TOPIC_DOSSIER]
        return sorted(p for _, p in owned) == list(range(partitions)) and all(
            any(tp[0] == TOPIC_DOSSIER for tp in r["owned"]) for r in roles
        )

    try:
        simulator = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "simulate", "--rate", str(rate), "--no-progress"],
            env=env, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        procs.append(simulator)
        with live.component("api", env) as api:
            live.wait_api_ready(settings, api)
            for k in range(kills):
                _wait_for(stable, 120, "two workers sharing the partitions", step=0.5)
                time.sleep(3.0)  # let the group settle under load
                roles = [_metrics(port) for port in ports]
                # The merger and the other in turn.
                victim = next(i for i, r in enumerate(roles) if bool(r["merger"]) == (k % 2 == 0))
                theirs = sorted(p for t, p in roles[victim]["owned"] if t == TOPIC_DOSSIER)
                survivor = 1 - victim
                ours = sorted(p for t, p in roles[survivor]["owned"] if t == TOPIC_DOSSIER)
                agency, key, value = _probe(run, k, partitions, theirs[0])
                agency2, key2, value2 = _probe(run, 1000 + k, partitions, ours[0])
                killed_at = time.monotonic()
                os.killpg(procs[victim].pid, signal.SIGKILL)
                procs[victim].wait()
                loop.run_until_complete(producer.send_and_wait(dossiers, value, key=key))
                loop.run_until_complete(producer.send_and_wait(dossiers, value2, key=key2))
                seen: dict[str, float] = {}
                deadline = killed_at + 120
                while len(seen) < 2 and time.monotonic() < deadline:
                    for name, a in (("killed_partition", agency), ("survivor_partition", agency2)):
                        if name not in seen and visible(a):
                            seen[name] = round(time.monotonic() - killed_at, 2)
                    time.sleep(0.05)
                rounds.append({"killed": "merger" if k % 2 == 0 else "worker", **seen})
                progress(f"failover {k + 1}/{kills}: {rounds[-1]}")
                # As a supervisor restarts it.
                procs[victim] = _worker(env, ports[victim], logs / f"worker{victim}.log")
    finally:
        _stop(procs)
        client.close()
        loop.run_until_complete(producer.stop())
        loop.close()
    times = sorted(r["killed_partition"] for r in rounds if "killed_partition" in r)
    # The later of the round's two events (a survivor's partition waits too when the merger dies);
    # an event never seen counts as the round's whole wait.
    worst = [max(r.get("killed_partition", 120.0), r.get("survivor_partition", 120.0)) for r in rounds]
    return {
        "kills": kills,
        "rate": rate,
        "session_timeout_ms": settings.worker_session_timeout_ms,
        "rounds": rounds,
        "worker_logs": str(logs),
        "killed_partition_s": {
            "p50": round(statistics.median(times), 2) if times else None,
            "max": max(times) if times else None,
            "seen": len(times),
        },
        "any_event_s": {
            "p50": _nearest_rank(worst, 0.5),
            "p99": _nearest_rank(worst, 0.99),
            "max": max(worst) if worst else None,
            "rounds": len(worst),
        },
    }
