"""`ioc soak`: a steady mixed stream through real `ioc worker` and `ioc api` processes, memory over time.

Run on demand, never in CI (issue #6): ``ioc soak --duration 30m``. Starts (or joins) the broker
and PostgreSQL as `ioc bench` does, runs the worker and the API as child processes, produces the
simulators' realistic mix at a steady rate, keeps WebSocket subscribers connected, and every
``--sample-every`` records RSS of both processes, what the worker counted, its consumer lag, the
messages the subscribers received and the database's size. At the end: a table of memory over
time and a growth verdict (least-squares slope of RSS over the second half of the run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import math
import os
import platform
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from api.broadcaster import frame_type
from bench import live
from bench.harness import fresh_database, services
from ioc.settings import Settings

#: Tables whose row counts are sampled (the worker's state, the KPI store, the audit trail).
TABLES = (
    "dossier_state",
    "incident_state",
    "sensor_reading",
    "kpi_latest",
    "kpi_history",
    "kpi_hourly",
    "alert_event",
)
#: Faults mixed into the stream, as `ioc simulate` offers them (per well-formed event).
DUP_RATE = 0.01
OOO_RATE = 0.02
BAD_RATE = 0.001
#: A process whose RSS rises faster than this over the second half is reported as growing.
GROWTH_MIB_PER_H = 2.0
#: Longest wait, after the last event is produced, for the worker to count everything.
DRAIN_TIMEOUT_S = 120.0
#: Rows of the printed table at most (the JSON has every sample).
TABLE_ROWS = 31
MIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """What a soak run offers: rate, length, sampling and subscribers."""

    rate: float = 500.0
    duration_s: float = 1800.0
    sample_every_s: float = 30.0
    clients: int = 50
    seed: int = 348


@dataclass(frozen=True)
class Sample:
    """One observation of the running system."""

    elapsed_s: float
    produced: int
    #: Input records the worker consumed (``ioc_records_in_total``, every topic).
    counted: int
    #: Records between the committed offsets and the partition ends (``ioc_consumer_lag_records``).
    consumer_lag: int
    #: Dossiers and incidents the worker holds in memory (``ioc_entities_in_memory``).
    entities: int
    worker_rss_mib: float
    api_rss_mib: float
    ws_received: int
    ws_connected: int
    #: Frames the API handed to WebSocket clients (``ioc_ws_messages_total``): ``ws_received`` plus those in flight.
    api_ws_sent: int
    db_mib: float
    rows: dict[str, int]


@dataclass
class WsTally:
    """What the soak's WebSocket subscribers have received so far (updated in place)."""

    received: int = 0
    connected: int = 0
    disconnects: int = 0
    by_type: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass(frozen=True)
class Processes:
    """The two components under test; a soak stops as soon as either has exited."""

    worker: subprocess.Popen[bytes]
    api: subprocess.Popen[bytes]

    def check(self) -> None:
        for name, proc in (("worker", self.worker), ("api", self.api)):
            if proc.poll() is not None:
                raise RuntimeError(f"ioc {name} exited with status {proc.returncode} during the soak")


def progress(message: str) -> None:
    """One progress line on stderr (the table goes to stdout)."""
    print(f"soak: {message}", file=sys.stderr, flush=True)


# --- what a sample reads ------------------------------------------------------------------------


def metric_total(text: str, name: str) -> float:
    """The sum of every sample of family ``name`` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
        return text


def _database(url: str) -> tuple[float, dict[str, int]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        rows: dict[str, int] = {}
        for table in TABLES:
            got = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
            rows[table] = int(got[0]) if got else 0
    return (int(size[0]) if size else 0) / MIB, rows


def _observe(settings: Settings, procs: Processes, elapsed_s: float, produced: int, tally: WsTally) -> Sample:
    """Blocking reads (HTTP, /proc, SQL): run in a thread so the producer keeps its pace."""
    text = _metrics(settings.worker_metrics_port)
    api_text = _metrics(settings.api_port)
    db_mib, rows = _database(settings.database_url)
    return Sample(
        elapsed_s=round(elapsed_s, 1),
        produced=produced,
        counted=int(metric_total(text, "ioc_records_in_total")),
        consumer_lag=int(metric_total(text, "ioc_consumer_lag_records")),
        entities=int(metric_total(text, "ioc_entities_in_memory")),
        worker_rss_mib=round(live.rss_bytes(procs.worker.pid) / MIB, 1),
        api_rss_mib=round(live.rss_bytes(procs.api.pid) / MIB, 1),
        ws_received=tally.received,
        ws_connected=tally.connected,
        api_ws_sent=int(metric_total(api_text, "ioc_ws_messages_total")),
        db_mib=round(db_mib, 1),
        rows=rows,
    )


def _line(s: Sample) -> str:
    return (
        f"{_clock(s.elapsed_s)} produced {s.produced:,} counted {s.counted:,} lag {s.consumer_lag:,} "
        f"entities {s.entities:,} | RSS worker {s.worker_rss_mib:,.1f} MiB api {s.api_rss_mib:,.1f} MiB | "
        f"ws {s.ws_received:,} msgs ({s.ws_connected} connected) | db {s.db_mib:,.1f} MiB"
    )


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# --- WebSocket subscribers ----------------------------------------------------------------------


async def _subscriber(url: str, token: str, channels: list[str], tally: WsTally) -> None:
    """One wall-like client: subscribes, counts every frame, reconnects if it is cut off."""
    subscribe = orjson.dumps({"type": "subscribe", "channels": channels}).decode()
    while True:
        try:
            async with connect(
                url,
                subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
                ping_interval=None,
                open_timeout=30,
                max_size=None,
            ) as ws:
                await ws.send(subscribe)
                tally.connected += 1
                try:
                    async for frame in ws:
                        tally.received += 1
                        tally.by_type[frame_type(frame if isinstance(frame, str) else frame.decode())] += 1
                finally:
                    tally.connected -= 1
        except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake):
            pass
        tally.disconnects += 1
        await asyncio.sleep(1.0)


def _channels(i: int, communes: Sequence[str]) -> list[str]:
    """A wall's view: the province, the alerts, and one commune (a different one per client)."""
    return ["kpi:province", "alerts", f"kpi:commune:{communes[i % len(communes)]}"]


# --- the run ------------------------------------------------------------------------------------


async def _drive(settings: Settings, plan: Plan, procs: Processes) -> dict[str, Any]:
    from api.auth import create_token
    from ioc.registry import load_registry
    from simulators.producer import Stats
    from simulators.producer import run as simulate

    ttl = dt.timedelta(seconds=plan.duration_s + 2 * 3600)  # no subscriber is cut off by its token expiring
    token = create_token(settings, "operator", ttl=ttl, subject="soak")
    communes = sorted(load_registry().units)
    url = f"ws://127.0.0.1:{settings.api_port}/ws"
    tally = WsTally()
    clients = [asyncio.create_task(_subscriber(url, token, _channels(i, communes), tally)) for i in range(plan.clients)]
    stats = Stats()
    samples: list[Sample] = []

    async def sample(elapsed: float) -> Sample:
        procs.check()
        s = await asyncio.to_thread(_observe, settings, procs, elapsed, stats.sent - stats.failed, tally)
        samples.append(s)
        progress(_line(s))
        return s

    try:
        deadline = time.monotonic() + 30
        while tally.connected < plan.clients and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        progress(f"{tally.connected} of {plan.clients} WebSocket subscribers connected")
        started = time.monotonic()
        await sample(0.0)
        producing = asyncio.create_task(
            simulate(
                settings,
                rate=plan.rate,
                duration=plan.duration_s,
                seed=plan.seed,
                dup_rate=DUP_RATE,
                ooo_rate=OOO_RATE,
                bad_rate=BAD_RATE,
                progress=False,
                stats=stats,
            )
        )
        try:
            due = started + plan.sample_every_s
            while True:
                await asyncio.wait({producing}, timeout=max(0.0, due - time.monotonic()))
                if producing.done():
                    break
                await sample(time.monotonic() - started)
                due += plan.sample_every_s
                while due <= time.monotonic():  # a slow sample: skip the ticks it overran
                    due += plan.sample_every_s
        finally:
            if not producing.done():
                producing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producing
        produced_s = time.monotonic() - started
        produced = stats.sent - stats.failed
        progress(f"produced {produced:,} events in {produced_s:.0f} s; waiting for the worker to count them")
        drain_until = time.monotonic() + DRAIN_TIMEOUT_S
        counted = 0
        while time.monotonic() < drain_until:
            procs.check()
            text = await asyncio.to_thread(_metrics, settings.worker_metrics_port)
            counted = int(metric_total(text, "ioc_records_in_total"))
            if counted >= produced:
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(2 * float(settings.emit_interval_s))  # the last counts reach the subscribers
        final = await sample(time.monotonic() - started)
        connected_at_end = tally.connected
    finally:
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return {
        "samples": [asdict(s) for s in samples],
        "production_seconds": round(produced_s, 1),
        "produced": {
            "events": produced,
            "by_topic": dict(stats.by_topic),
            "duplicates": stats.duplicates,
            "delayed": stats.delayed,
            "malformed": stats.malformed,
            "failed": stats.failed,
            "rate_per_s": round(produced / produced_s, 1) if produced_s > 0 else 0.0,
            "sender_lag_s": round(stats.lag_s, 2),
        },
        "counted": final.counted,
        "all_counted": final.counted == produced,
        "websocket": {
            "clients": plan.clients,
            "connected_at_end": connected_at_end,
            "received": tally.received,
            "by_type": dict(tally.by_type),
            "disconnects": tally.disconnects,
        },
    }


def _wait_metrics(settings: Settings, worker: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + live.READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"ioc worker exited with status {worker.returncode}")
        with contextlib.suppress(OSError):
            _metrics(settings.worker_metrics_port)
            return
        time.sleep(0.3)
    raise RuntimeError(f"the worker's metrics were not served within {live.READY_TIMEOUT_S:.0f} s")


def run(plan: Plan, json_path: Path | None = None) -> tuple[dict[str, Any], Path]:
    """Run the soak; returns the results and where their JSON was written."""
    from entrypoints.embedded.broker import ensure_topics

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["ioc", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("ioc") else "ioc soak",
        "plan": {**asdict(plan), "dup_rate": DUP_RATE, "ooo_rate": OOO_RATE, "bad_rate": BAD_RATE},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    own_db = not os.environ.get("IOC_DATABASE_URL")
    run_id = secrets.token_hex(3)
    with services(Settings()) as (bootstrap, admin_url):
        results["broker"] = bootstrap
        settings = Settings(
            kafka_bootstrap=bootstrap,
            database_url=fresh_database(admin_url, f"soak_{run_id}", own_db),
            topic_prefix=f"soak{run_id}.",
            consumer_group=f"soak-{run_id}",
            worker_metrics_port=live.free_port(),
            api_port=live.free_port(),
            signing_key=secrets.token_urlsafe(40),
        )
        ensure_topics(settings)
        env = live.child_env(settings, IOC_WORKER_METRICS_PORT=str(settings.worker_metrics_port))
        with live.component("api", env) as api, live.component("worker", env) as worker:
            live.wait_api_ready(settings, api)
            _wait_metrics(settings, worker)
            progress(
                f"worker pid {worker.pid}, api pid {api.pid}; {plan.rate:g} events/s for {_clock(plan.duration_s)}"
            )
            results.update(asyncio.run(_drive(settings, plan, Processes(worker=worker, api=api))))
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["memory"] = {
        name: growth(results["samples"], f"{name}_rss_mib", plan.duration_s) for name in ("worker", "api")
    }
    results["memory"]["worker"].update(net_of_entities(results["samples"], plan.duration_s))
    path = json_path or Path("artifacts") / f"soak-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return results, path


# --- the verdict --------------------------------------------------------------------------------


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per hour; None for fewer than two times."""
    line = fit(points)
    return None if line is None else line[1] * 3600


def _second_half(samples: Sequence[dict[str, Any]], duration_s: float) -> list[dict[str, Any]]:
    return [s for s in samples if s["elapsed_s"] >= duration_s / 2]


def growth(samples: Sequence[dict[str, Any]], column: str, duration_s: float) -> dict[str, Any]:
    """First, last and peak of ``column``, its slope over the second half, and ``flat``/``grows``."""
    values = [float(s[column]) for s in samples]
    slope = slope_per_hour([(s["elapsed_s"], float(s[column])) for s in _second_half(samples, duration_s)])
    verdict = "unknown" if slope is None else ("grows" if slope > GROWTH_MIB_PER_H else "flat")
    return {
        "first_mib": values[0] if values else None,
        "last_mib": values[-1] if values else None,
        "peak_mib": max(values) if values else None,
        "slope_mib_per_h": None if slope is None else round(slope, 2),
        "verdict": verdict,
    }


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares line ``y = a + b·x`` through ``(x, y)`` points as ``(a, b)``; None without two distinct x."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def net_of_entities(samples: Sequence[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """The worker holds every open dossier and incident (finished ones for 40 more days), so its RSS
    rises with them by design. Over the second half: RSS fitted to entities held (MiB + KiB each),
    and the slope of what that fit leaves unexplained; that residual is what would be a leak."""
    half = _second_half(samples, duration_s)
    entities = slope_per_hour([(s["elapsed_s"], float(s["entities"])) for s in half])
    line = fit([(float(s["entities"]), float(s["worker_rss_mib"])) for s in half])
    if line is None:
        return {"entities_slope_per_h": entities, "kib_per_entity": None, "net_slope_mib_per_h": None}
    a, b = line
    net = slope_per_hour([(s["elapsed_s"], float(s["worker_rss_mib"]) - a - b * s["entities"]) for s in half])
    return {
        "entities_slope_per_h": None if entities is None else round(entities, 1),
        "kib_per_entity": round(b * 1024, 3),
        "net_slope_mib_per_h": None if net is None else round(net, 2),
        "net_verdict": "unknown" if net is None else ("grows" if net > GROWTH_MIB_PER_H else "flat"),
    }


def table(results: dict[str, Any]) -> str:
    """Memory over time, the growth verdict and the event count check, as plain text."""
    plan = results["plan"]
    samples: list[dict[str, Any]] = results["samples"]
    lines = [
        f"ioc soak — {plan['rate']:g} events/s for {_clock(plan['duration_s'])}, {plan['clients']} WebSocket "
        f"subscribers, {results['machine']['cpus']} CPUs, Python {results['machine']['python']}",
        "",
    ]
    step = max(1, math.ceil(len(samples) / TABLE_ROWS))
    shown = samples[::step]
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    header = ("elapsed", "produced", "counted", "lag", "entities", "worker MiB", "api MiB", "ws msgs", "db MiB")
    rows = [
        (
            _clock(s["elapsed_s"]),
            f"{s['produced']:,}",
            f"{s['counted']:,}",
            f"{s['consumer_lag']:,}",
            f"{s['entities']:,}",
            f"{s['worker_rss_mib']:,.1f}",
            f"{s['api_rss_mib']:,.1f}",
            f"{s['ws_received']:,}",
            f"{s['db_mib']:,.1f}",
        )
        for s in shown
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines += ["", "memory (RSS)   first      last      peak     slope, 2nd half   verdict"]
    for name, m in results["memory"].items():
        slope = "—" if m["slope_mib_per_h"] is None else f"{m['slope_mib_per_h']:+,.1f} MiB/h"
        lines.append(
            f"  {name:<10} {m['first_mib']:>7,.1f}  {m['last_mib']:>8,.1f}  {m['peak_mib']:>8,.1f}  "
            f"{slope:>16}   {m['verdict']}"
        )
    w = results["memory"]["worker"]
    if w.get("net_slope_mib_per_h") is not None:
        lines.append(
            f"  worker net of the dossiers and incidents it holds ({w['entities_slope_per_h']:+,.0f}/h in the 2nd half, "
            f"{w['kib_per_entity']:,.2f} KiB each): {w['net_slope_mib_per_h']:+,.1f} MiB/h   {w['net_verdict']}"
        )
    last = samples[-1]
    produced, counted = results["produced"]["events"], results["counted"]
    verdict = "all counted" if counted == produced else f"{produced - counted:+,} not counted"
    lines += [
        "",
        f"events: produced {produced:,} ({results['produced']['rate_per_s']:,.1f}/s), "
        f"counted by the worker {counted:,}: {verdict}",
        f"websocket: {results['websocket']['received']:,} messages received by {plan['clients']} subscribers "
        f"({last['api_ws_sent']:,} sent by the API), {results['websocket']['disconnects']} disconnects",
        "database: " + f"{last['db_mib']:,.1f} MiB; " + ", ".join(f"{t} {n:,}" for t, n in last["rows"].items()),
    ]
    return "\n".join(lines)


def main(plan: Plan, json_path: Path | None) -> int:
    """The CLI entry: run, print the table and the JSON path; 1 when events went uncounted."""
    if plan.rate <= 0 or plan.duration_s <= 0 or plan.sample_every_s <= 0 or plan.clients < 0:
        print("ioc soak: --rate, --duration and --sample-every must be positive, --clients >= 0", file=sys.stderr)
        return 2
    started = time.monotonic()
    results, path = run(plan, json_path)
    print(table(results))
    print(f"\nfigures: {path} ({time.monotonic() - started:.0f} s)")
    return 0 if results["all_counted"] else 1
