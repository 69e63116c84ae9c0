"""Measurements through real processes: event-to-screen latency (`ioc worker` + `ioc api`) and WebSocket fan-out."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from bench import CHECKOUT
from bench.clients import PROBE_KPI
from bench.stats import percentiles, process_cpu
from bench.workload import DossierIntake, dossier_topic, progress
from ioc.settings import TOPIC_KPI, Settings
from ioc.snapshot import Snapshot, encode

LATENCY_KPI = ("dossier.received", "province", "1h")
#: Partitions per topic in the latency section: one, as in every earlier run, so that figures compare
#: across runs and brokers. It was chosen for tansu, which slows down as record batches pile up in a
#: topic's partitions: a paced producer (linger 1 ms) at 5,000/s into 6 partitions saw produce-to-
#: consume p99 grow from 22 ms to 197 ms within 20 s. Kafka does not; partitions do not change what a
#: single worker does per event.
LATENCY_PARTITIONS = 1
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "IOC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "IOC_DATABASE_URL": settings.database_url,
        "IOC_TOPIC_PREFIX": settings.topic_prefix,
        "IOC_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "IOC_CONSUMER_GROUP": settings.consumer_group,
        "IOC_SIGNING_KEY": settings.signing_key.get_secret_value(),
        "IOC_API_PORT": str(settings.api_port),
        "IOC_WORKER_METRICS_PORT": "0",
        "IOC_WORKER_SESSION_TIMEOUT_MS": str(settings.worker_session_timeout_ms),
        "IOC_LOG_LEVEL": "WARNING",
        # the harness's own children (`python -m bench.clients`) import it from the checkout
        "PYTHONPATH": os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }


@contextlib.contextmanager
def component(name: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`ioc NAME` as a child process, stopped (SIGTERM, then SIGKILL) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.cli", name], env=env, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_api_ready(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
    url = f"http://127.0.0.1:{settings.api_port}/readyz"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ioc api exited with status {proc.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.3)
    raise RuntimeError(f"the API was not ready within {READY_TIMEOUT_S:.0f} s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    return process_cpu(pid)[1]


def token_for(settings: Settings) -> str:
    from api.auth import create_token

    return create_token(settings, "operator", subject="bench")


# --- event-to-screen latency -------------------------------------------------------------------


@dataclass
class _Tally:
    """The watched KPI's latest value, its value when pacing began, and how many sent events it counts."""

    value: float = 0.0
    base: float | None = None
    counted: int = 0


async def _latency_run(settings: Settings, token: str, rate: float, duration_s: float, run: str) -> dict[str, Any]:
    """Pace dossier ``received`` events at ``rate``/s; for event k, the time from its send to the
    first ``dossier.received|province|1h`` update on the WebSocket whose value counts it."""
    kpi, scope, window = LATENCY_KPI
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks=1, linger_ms=1)
    await producer.start()
    topic = dossier_topic(settings)
    intake = DossierIntake(run)
    sent_at: list[float] = []
    latencies: list[float] = []
    state = _Tally()
    url = f"ws://127.0.0.1:{settings.api_port}/ws"
    try:
        async with connect(
            url, subprotocols=[Subprotocol("bearer"), Subprotocol(token)], ping_interval=None, max_size=None
        ) as ws:
            await ws.send('{"type":"subscribe","channels":["kpi:province"]}')

            def value_of(item: dict[str, Any]) -> float | None:
                if (item.get("kpi"), item.get("scope"), item.get("window")) == (kpi, scope, window):
                    v = item.get("value")
                    return float(v) if v is not None else 0.0
                return None

            async def reader() -> None:
                async for frame in ws:
                    now = time.time()
                    msg = orjson.loads(frame)
                    items = msg.get("items") if msg.get("type") == "snapshot" else [msg.get("item") or {}]
                    for item in items or ():
                        v = value_of(item)
                        if v is None:
                            continue
                        state.value = v
                        if state.base is None:
                            continue
                        upto = min(int(v - state.base), len(sent_at))
                        while state.counted < upto:
                            latencies.append(now - sent_at[state.counted])
                            state.counted += 1

            reading = asyncio.create_task(reader())
            try:
                # Warm up: until the worker counts what is sent, the pipeline is not running yet.
                deadline = time.monotonic() + READY_TIMEOUT_S
                while True:
                    before = state.value
                    for _ in range(5):
                        k, v = intake.next()
                        await producer.send(topic, v, key=k)
                    await producer.flush()
                    waited = time.monotonic()
                    while state.value < before + 5 and time.monotonic() - waited < 5:
                        await asyncio.sleep(0.05)
                    if state.value >= before + 5:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the worker did not publish within the warm-up time")
                await asyncio.sleep(2 * float(settings.emit_interval_s) + 0.5)
                state.base = state.value
                started = time.monotonic()
                tick = 0.005
                while (elapsed := time.monotonic() - started) < duration_s:
                    due = int(elapsed * rate)
                    while len(sent_at) < due:
                        k, v = intake.next()
                        sent_at.append(time.time())
                        await producer.send(topic, v, key=k)
                    await asyncio.sleep(tick)
                offered = len(sent_at) / duration_s
                settle = time.monotonic()
                while state.counted < len(sent_at) and time.monotonic() - settle < 15:
                    await asyncio.sleep(0.05)
            finally:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reading
    finally:
        await producer.stop()
    ms = [x * 1000 for x in latencies]
    return {
        "offered_per_s": round(rate, 1),
        "achieved_per_s": round(offered, 1),
        "sent": len(sent_at),
        "seen": len(latencies),
        **{f"{k}_ms": v for k, v in percentiles(ms).items()},
    }


def latency(
    settings_for: Callable[[float], Settings], rates: list[float], intervals: list[float], duration_s: float
) -> dict[str, Any]:
    """Per emit interval, a fresh database and topics (``settings_for``), one `ioc worker` and one
    `ioc api`, and a paced run per rate: each interval starts from the same empty state."""
    results: dict[str, Any] = {}
    for interval in intervals:
        settings = settings_for(interval)
        token = token_for(settings)
        env = child_env(settings, IOC_EMIT_INTERVAL_S=str(interval))
        with component("api", env) as api, component("worker", env) as worker:
            wait_api_ready(settings, api)
            runs: dict[str, Any] = {}
            for rate in rates:
                if worker.poll() is not None:
                    raise RuntimeError(f"ioc worker exited with status {worker.returncode}")
                progress(f"latency: {rate:,.0f} events/s for {duration_s:g} s, emit interval {interval:g} s")
                run = f"l{int(time.time())}-{interval:g}-{rate:.0f}"
                r = runs[f"{rate:.0f}"] = asyncio.run(_latency_run(settings, token, rate, duration_s, run))
                progress(f"latency: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms ({r['seen']:,}/{r['sent']:,} seen)")
            results[f"{interval:g}"] = runs
    return {
        "emit_interval_s": results,
        "duration_s": duration_s,
        "kpi": "|".join(LATENCY_KPI),
        "partitions": LATENCY_PARTITIONS,
    }


# --- fan-out -------------------------------------------------------------------------------------


async def _publish_probes(settings: Settings, count: int, every_s: float) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks=1, linger_ms=0)
    await producer.start()
    try:
        for _ in range(count):
            now = time.time()
            snap = Snapshot(
                kpi=PROBE_KPI, scope="province", window="now", value=now, unit="s", numerator=None,
                denominator=None, target=None, status=None,
                as_of=dt.datetime.now(dt.UTC), seq=time.time_ns() // 1000,
            )  # fmt: skip
            await producer.send_and_wait(settings.topic(TOPIC_KPI), encode(snap), key=snap.key.encode())
            await asyncio.sleep(every_s)
    finally:
        await producer.stop()


def _spawn_clients(url: str, token: str, n: int, processes: int) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    """``n`` subscribed clients (:mod:`bench.clients`) in ``processes`` child processes; (children, ready, failed)."""
    procs_n = processes if n >= 1000 else 1
    shares = [n // procs_n + (1 if i < n % procs_n else 0) for i in range(procs_n)]
    kids = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.clients", url, token, str(share)],
            cwd=CHECKOUT,  # not installed: imported from the checkout
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for share in shares
    ]
    ready = failed = 0
    try:
        for kid in kids:
            assert kid.stdout is not None
            line = orjson.loads(kid.stdout.readline() or b"{}")
            ready += int(line.get("ready", 0))
            failed += int(line.get("failed", 0))
    except BaseException:
        _stop_clients(kids)
        raise
    return kids, ready, failed


def _client_delays(kids: list[subprocess.Popen[bytes]]) -> tuple[list[float], list[float], float]:
    """Tell the clients to finish; every probe delay they timed (ms), the p99 of each update (ms, in
    the order sent), and the CPU time the clients used since they were all connected (s)."""
    delays: list[float] = []
    by_update: dict[float, list[float]] = {}
    cpu = 0.0
    for kid in kids:
        out, _ = kid.communicate(b"", timeout=120)
        last = orjson.loads(out.strip().splitlines()[-1] if out.strip() else b"{}")
        got = last.get("delays_ms", [])
        delays.extend(got)
        for sent, delay in zip(last.get("sent", []), got, strict=False):
            by_update.setdefault(sent, []).append(delay)
        cpu += float(last.get("cpu_s", 0.0))
    per_update = [percentiles(by_update[sent])["p99"] for sent in sorted(by_update)]
    return delays, per_update, cpu


def _delivery_figures(
    ready: int, probes: int, delays: list[float], per_update: list[float], cpu_s: dict[str, float]
) -> dict[str, Any]:
    """Deliveries of ``probes`` updates to ``ready`` clients: their share, percentiles (overall and each
    update's p99), and the CPU each process (``{"api": s, "clients": s}``) used per delivery meanwhile."""
    n = len(delays)
    return {
        "updates": probes,
        "deliveries": n,
        "delivered_share": round(n / (ready * probes), 4) if ready and probes else 0.0,
        **{f"delivery_{k}_ms": v for k, v in percentiles(delays).items()},
        "delivery_p99_ms_per_update": per_update,
        # each includes what else the process did meanwhile (the API's feed, pings): an upper bound
        **{f"{who}_cpu_us_per_delivery": round(s * 1e6 / n, 2) if n else math.nan for who, s in cpu_s.items()},
    }


def _stop_clients(kids: list[subprocess.Popen[bytes]]) -> None:
    for kid in kids:
        if kid.poll() is None:
            kid.kill()
            kid.wait()


def fanout(
    settings: Settings, clients: list[int], probes: int = 5, processes: int = 2, floor_threads: tuple[int, ...] = (1, 2)
) -> dict[str, Any]:
    """Per client count: a fresh `ioc api`, the clients in ``processes`` child processes, ``probes``
    KPI updates published to the topic; delivery delay per client and update, and API RSS per client.
    Then, at the largest count, the same clients served by the bare server of :mod:`bench.floor`
    (once per entry of ``floor_threads``): what this machine's kernel and clients alone take."""
    token = token_for(settings)
    results: dict[str, Any] = {}
    for n in clients:
        with component("api", child_env(settings)) as api:
            wait_api_ready(settings, api)
            time.sleep(1.0)
            rss_before = rss_bytes(api.pid)
            url = f"ws://127.0.0.1:{settings.api_port}/ws"
            progress(f"fan-out: connecting {n:,} clients ({processes if n >= 1000 else 1} process(es))")
            started = time.monotonic()
            kids, ready, failed = _spawn_clients(url, token, n, processes)
            try:
                connect_s = time.monotonic() - started
                time.sleep(2.0)
                rss_after = rss_bytes(api.pid)
                progress(
                    f"fan-out: {ready:,} connected in {connect_s:.1f} s ({failed} failed); publishing {probes} updates"
                )
                api_cpu = cpu_seconds(api.pid)
                asyncio.run(_publish_probes(settings, probes, 1.0))
                time.sleep(2.0)
                api_cpu = cpu_seconds(api.pid) - api_cpu
                delays, per_update, clients_cpu = _client_delays(kids)
            finally:
                _stop_clients(kids)
        per_client = (rss_after - rss_before) / ready if ready else 0.0
        r = {
            "clients": n,
            "connected": ready,
            "failed": failed,
            "connect_seconds": round(connect_s, 2),
            **_delivery_figures(ready, probes, delays, per_update, {"api": api_cpu, "clients": clients_cpu}),
            "api_rss_before_mib": round(rss_before / 2**20, 1),
            "api_rss_after_mib": round(rss_after / 2**20, 1),
            "rss_per_client_kib": round(per_client / 1024, 2),
        }
        progress(
            f"fan-out: {n:,} clients: delivery p99 {r['delivery_p99_ms']} ms, {r['rss_per_client_kib']} KiB/client"
        )
        results[str(n)] = r
    out: dict[str, Any] = {"clients": results, "client_processes": processes}
    if clients and floor_threads:
        n = max(clients)
        out["floor"] = {str(t): fanout_floor(n, probes, processes, t) for t in floor_threads}
    return out


def fanout_floor(n: int, probes: int, processes: int, threads: int) -> dict[str, Any]:
    """The same ``n`` clients and probes served by :mod:`bench.floor`'s bare server (no API)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", str(threads)], cwd=CHECKOUT, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        port = orjson.loads(server.stdout.readline() or b"{}")["port"]
        progress(f"fan-out floor: {n:,} clients on a bare server ({threads} sending thread(s))")
        kids, ready, failed = _spawn_clients(f"ws://127.0.0.1:{port}/ws", "-", n, processes)
        try:
            time.sleep(2.0)
            send_ms: list[float] = []
            server_cpu = 0.0
            for _ in range(probes):
                server.stdin.write(b"probe\n")
                server.stdin.flush()
                sent = orjson.loads(server.stdout.readline())
                send_ms.append(float(sent["send_ms"]))
                server_cpu += float(sent["cpu_s"])
                time.sleep(1.0)
            time.sleep(1.0)
            delays, per_update, clients_cpu = _client_delays(kids)
        finally:
            _stop_clients(kids)
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    r = {
        "clients": n,
        "connected": ready,
        "failed": failed,
        "sending_threads": threads,
        "send_ms_max": max(send_ms, default=math.nan),
        **_delivery_figures(ready, probes, delays, per_update, {"server": server_cpu, "clients": clients_cpu}),
    }
    progress(f"fan-out floor: {n:,} clients, {threads} thread(s): delivery p99 {r['delivery_p99_ms']} ms")
    return r
