"""`ioc bench`: set up the broker and the database, run the sections, print the table, write the JSON."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import sql

from bench import live, pipeline
from bench.clients import raise_fd_limit
from bench.workload import produce_backlog, progress
from ioc.settings import Settings

SECTIONS = ("baseline", "throughput", "latency", "fanout", "sink")
#: Sections run only when named (`--only ingest`, `--only anomaly`): the ingest doors (bench/ingest.py) and
#: detection quality, not speed (bench/anomaly.py).
OPTIONAL_SECTIONS = ("ingest", "anomaly")
#: Run only when named with --only (they start several worker processes: docs/scaling.md).
SCALE_SECTIONS = ("workers", "failover")
DEFAULT_EVENTS = 1_000_000


#: The worker's default `IOC_EMIT_INTERVAL_S`: the latency goal is judged there.
DEFAULT_EMIT_S: float = float(Settings.model_fields["emit_interval_s"].default)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run (``--quick`` shrinks them for a CI smoke test)."""

    events: int
    latency_rates: tuple[float, ...] = (1000.0, 5000.0, 10000.0)
    #: The default, and 1 s for comparison (the interval is the floor of the latency).
    emit_intervals: tuple[float, ...] = (1.0, DEFAULT_EMIT_S)
    latency_seconds: float = 20.0
    fanout_clients: tuple[int, ...] = (1000, 5000, 10000)
    #: Sending threads of the bare server that measures the fan-out floor, at the largest client count.
    fanout_floor_threads: tuple[int, ...] = (1, 2)
    sink_rows: int = 100_000
    #: The ingest doors (bench.ingest): records through HTTP and MQTT, and one-at-a-time probes per door.
    ingest_http_records: int = 50_000
    ingest_mqtt_records: int = 10_000
    ingest_probes: int = 20

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            events=20_000,
            latency_rates=(1000.0,),
            emit_intervals=(DEFAULT_EMIT_S,),
            latency_seconds=3.0,
            fanout_clients=(50,),
            fanout_floor_threads=(2,),
            sink_rows=5_000,
            ingest_http_records=2_000,
            ingest_mqtt_records=500,
            ingest_probes=5,
        )


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: Callable[[dict[str, Any]], float | None]
    met: Callable[[float], bool]
    unit: str


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def _ratio(r: dict[str, Any]) -> float | None:
    got = _get(r, "throughput", "ratio_to_baseline")
    return float(got) if got is not None else None


GOALS = (
    Goal("one worker, sustained", ">= 50,000 events/s", lambda r: _get(r, "throughput", "events_per_s"), lambda v: v >= 50_000, "events/s"),
    Goal("one worker vs baseline", ">= 30 %", lambda r: None if _ratio(r) is None else 100 * (_ratio(r) or 0), lambda v: v >= 30, "%"),
    Goal(f"event-to-screen p99 at 5,000/s (emit {DEFAULT_EMIT_S:g} s, the default)", "<= 250 ms", lambda r: _get(r, "latency", "emit_interval_s", f"{DEFAULT_EMIT_S:g}", "5000", "p99_ms"), lambda v: v <= 250, "ms"),
    Goal("10,000 clients: delivery p99", "<= 100 ms", lambda r: _get(r, "fanout", "clients", "10000", "delivery_p99_ms"), lambda v: v <= 100, "ms"),
    Goal("10,000 clients: memory per client", "<= 20 KiB", lambda r: _get(r, "fanout", "clients", "10000", "rss_per_client_kib"), lambda v: v <= 20, "KiB"),
    Goal("database writes", ">= 50,000 rows/s", lambda r: _get(r, "sink", "rows_per_s"), lambda v: v >= 50_000, "rows/s"),
    Goal("failover: a new event visible after a SIGKILL, p99", "<= 3 s", lambda r: _get(r, "failover", "any_event_s", "p99"), lambda v: v <= 3, "s"),
)  # fmt: skip


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its measured figure and ``pass``/``miss`` (``not run`` when its section was skipped)."""
    out = []
    for g in GOALS:
        value = g.measured(results)
        number = float(value) if isinstance(value, int | float) and value == value else None
        verdict = "not run" if number is None else ("pass" if g.met(number) else "miss")
        out.append({"goal": g.name, "target": g.target, "measured": number, "unit": g.unit, "verdict": verdict})
    return out


def _cpu_per_delivery(r: dict[str, Any], server: str) -> str:
    """``, CPU/delivery: api 12.3 + clients 8.1 µs`` (runs recorded before these figures existed: nothing)."""
    ours, theirs = r.get(f"{server}_cpu_us_per_delivery"), r.get("clients_cpu_us_per_delivery")
    if ours is None or theirs is None:
        return ""
    return f", CPU/delivery: {server} {ours} + clients {theirs} µs"


def table(results: dict[str, Any]) -> str:
    """The figures and goals as plain-text tables."""
    machine = results["machine"]
    lines = [f"ioc bench — {machine['cpus']} CPUs, {machine['python']}, {machine.get('event_loop', 'asyncio')}"]
    if bp := results.get("broker_process"):
        memory = ", ".join(
            f"{label} {bp[key]['rss_mib']:,.0f} MiB"
            for key, label in (("at_start", "RSS at start"), ("at_end", "at end"))
            if bp.get(key, {}).get("rss_mib") is not None
        )
        peak = bp.get("at_end", {}).get("peak_rss_mib")
        started = f", ready in {bp['start_s']} s" if "start_s" in bp else ""
        lines.append(
            f"broker: {bp.get('kind')}{started}"
            + (f"; {memory}" if memory else "")
            + (f", peak {peak:,.0f} MiB" if peak else "")
        )
    lines.append("")
    rows: list[tuple[str, str]] = []
    if b := results.get("baseline"):
        rows.append(("baseline: plain aiokafka consumer + msgspec decode", f"{b['events_per_s']:,.0f} events/s"))
    if t := results.get("throughput"):
        ratio = t.get("ratio_to_baseline")
        rows.append(
            ("pipeline: one worker (Ingest), validation → KPIs → database", f"{t['events_per_s']:,.0f} events/s")
        )
        if ratio is not None:
            rows.append(("pipeline / baseline", f"{100 * ratio:.1f} %"))
        if (cpu := t.get("cpu_us_per_event")) and t.get("events_per_s_if_cores_full"):
            parts = " + ".join(f"{name} {us}" for name, us in cpu.items())
            rows.append(
                (
                    "pipeline CPU per event; events/s were every core busy",
                    f"{parts} µs; {t['events_per_s_if_cores_full']:,.0f}/s",
                )
            )
    if lat := results.get("latency"):
        for interval, runs in lat["emit_interval_s"].items():
            for rate, r in runs.items():
                rows.append(
                    (
                        f"event-to-screen at {int(rate):,}/s, emit {interval} s (p50/p95/p99)",
                        f"{r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} ms",
                    )
                )
    if fo := results.get("fanout"):
        for n, r in fo["clients"].items():
            rows.append(
                (
                    f"fan-out {int(n):,} clients: delivery p50/p99, memory",
                    f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']} ms, {r['rss_per_client_kib']} KiB/client"
                    + _cpu_per_delivery(r, "api"),
                )
            )
        for threads, r in fo.get("floor", {}).items():
            rows.append(
                (
                    f"fan-out floor, {int(r['clients']):,} clients, bare server, {threads} thread(s): p50/p99",
                    f"{r['delivery_p50_ms']} / {r['delivery_p99_ms']} ms" + _cpu_per_delivery(r, "server"),
                )
            )
    if g := results.get("ingest"):
        h, m, lat = g["http"], g["mqtt"], g["latency"]
        rows.append(
            (
                f"ingest HTTP: {h['records']:,} dossiers, NDJSON x{h['batch']}, {h['senders']} senders",
                f"{h['records_per_s']:,.0f} records/s (acknowledged)",
            )
        )
        rows.append(
            (
                f"ingest MQTT: {m['records']:,} readings, QoS 1, one publisher",
                f"{m['records_per_s']:,.0f} records/s (in Kafka)",
            )
        )
        for name, label in (
            ("dossier_kafka", "Kafka"),
            ("dossier_http", "HTTP"),
            ("sensor_kafka", "Kafka"),
            ("sensor_mqtt", "MQTT"),
        ):
            r = lat[name]
            rows.append(
                (
                    f"to the screen, {name.split('_')[0]} via {label}: p50/p95",
                    f"{r['p50']} / {r['p95']} ms ({r['seen']} probes)",
                )
            )
        rows.append(
            (
                "added to the screen by the door (p50): HTTP / MQTT",
                f"{lat.get('http_added_p50_ms')} / {lat.get('mqtt_added_p50_ms')} ms",
            )
        )
    if s := results.get("sink"):
        rows.append(
            (
                f"database sink: {s['rows']:,} dossier states (insert / update)",
                f"{s['insert_rows_per_s']:,.0f} / {s['update_rows_per_s']:,.0f} rows/s",
            )
        )
    if fo := results.get("failover"):
        for who in ("merger", "worker"):
            seen = [r for r in fo["rounds"] if r["killed"] == who]
            if seen:
                rows.append(
                    (
                        f"failover, {who} killed: event in its partition / a survivor's (s)",
                        "; ".join(
                            f"{r.get('killed_partition', '—')} / {r.get('survivor_partition', '—')}" for r in seen
                        ),
                    )
                )
        any_s = fo.get("any_event_s", {})
        rows.append(
            (
                f"failover over {fo['kills']} kills, session {fo['session_timeout_ms']} ms: p50 / p99 / max",
                f"{any_s.get('p50')} / {any_s.get('p99')} / {any_s.get('max')} s",
            )
        )
    width = max((len(a) for a, _ in rows), default=10)
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    lines += ["", "goals:"]
    gw = max(len(g["goal"]) for g in results["goals"])
    for g in results["goals"]:
        shown = "—" if g["measured"] is None else f"{g['measured']:,.1f} {g['unit']}"
        lines.append(f"  {g['goal']:<{gw}}  {g['target']:<20} {shown:<22} {g['verdict']}")
    return "\n".join(lines)


def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory of a process now and at its peak (``VmRSS``, ``VmHWM``), in MiB."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found["rss_mib" if name == "VmRSS" else "peak_rss_mib"] = round(int(value.split()[0]) / 1024, 1)
    return found


@contextlib.contextmanager
def services(settings: Settings, broker_info: dict[str, Any] | None = None) -> Iterator[tuple[str, str]]:
    """(bootstrap, database admin URL): ``IOC_KAFKA_BOOTSTRAP``/``IOC_DATABASE_URL`` when set, else embedded ones.

    ``broker_info`` is filled with what the embedded broker is, how long it took to start, and
    (when the block ends) its memory.
    """
    info = broker_info if broker_info is not None else {}
    with contextlib.ExitStack() as stack:
        bootstrap = os.environ.get("IOC_KAFKA_BOOTSTRAP")
        database = os.environ.get("IOC_DATABASE_URL")
        if bootstrap:
            info["kind"] = "external"
        else:
            from entrypoints.embedded.broker import embedded_broker
            from entrypoints.embedded.kafka import EmbeddedKafka, kafka_version

            progress("starting the embedded broker")
            broker = embedded_broker(settings.embedded_broker)
            began = time.monotonic()
            stack.enter_context(broker)
            info["start_s"] = round(time.monotonic() - began, 2)
            info["kind"] = f"kafka {kafka_version()}" if isinstance(broker, EmbeddedKafka) else "tansu"
            if isinstance(broker, EmbeddedKafka):
                info["jvm_ready_s"] = round(broker.start_seconds or 0.0, 2)
                info["heap_max_mib"] = broker.heap_mb
            bootstrap = broker.bootstrap
            pid = broker.pid
            if pid is not None:
                pipeline.BROKER_PIDS.add(pid)
                info["at_start"] = rss_mib(pid)

                @stack.callback
                def _at_end() -> None:  # before the broker stops (callbacks run last in, first out)
                    info["at_end"] = rss_mib(pid)
                    pipeline.BROKER_PIDS.discard(pid)

            progress(f"broker: {info['kind']}, ready in {info['start_s']} s")
        if not database:
            from entrypoints.embedded.postgres import EmbeddedPostgres

            progress("starting the embedded PostgreSQL")
            database = stack.enter_context(EmbeddedPostgres()).url
        yield bootstrap, database


def fresh_database(url: str, name: str, own: bool) -> str:
    """A migrated database for one section: a new one next to ``url`` when we own the server, else ``url``."""
    from ioc.db.migrate import migrate

    target = url
    if own:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        target = str(psycopg.conninfo.make_conninfo(url, dbname=name))
    migrate(target)
    return target


def run(
    *,
    events: int | None = None,
    quick: bool = False,
    only: tuple[str, ...] = SECTIONS,
    json_path: Path | None = None,
    broker: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the chosen sections; returns the results and where their JSON was written.

    ``broker``: the embedded broker to start (``kafka`` or ``tansu``; default IOC_EMBEDDED_BROKER)."""
    from entrypoints.embedded.broker import ensure_topics
    from ioc.loop import install as install_loop

    plan = Plan.quick() if quick else Plan(events=DEFAULT_EVENTS)
    if events is not None:
        plan = Plan(**{**plan.__dict__, "events": events})
    fds = raise_fd_limit()  # inherited by the API and client processes of the fan-out
    loop = install_loop()  # the worker's loop, for the sections that run its pipeline in-process
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["ioc", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("ioc") else "ioc bench",
        "quick": quick,
        "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "fd_limit": fds,
            "event_loop": loop,
        },
    }
    own_db = not os.environ.get("IOC_DATABASE_URL")
    run_id = secrets.token_hex(3)
    base = Settings()
    if broker is not None:
        base = base.model_copy(update={"embedded_broker": broker})
    results["broker_process"] = {}
    with services(base, results["broker_process"]) as (bootstrap, admin_url):
        results["broker"] = bootstrap

        def settings_for(section: str, database: str, **extra: Any) -> Settings:
            return Settings(
                kafka_bootstrap=bootstrap,
                database_url=database,
                topic_prefix=f"bench{run_id}{section}.",
                consumer_group=f"bench-{run_id}-{section}",
                worker_metrics_port=0,
                signing_key=secrets.token_urlsafe(40),
                **extra,
            )

        if "baseline" in only or "throughput" in only:
            database = fresh_database(admin_url, "bench_throughput", own_db)
            s = settings_for("tp", database)
            ensure_topics(s)
            results["backlog"] = asyncio.run(produce_backlog(s, plan.events))
            n = results["backlog"]["events"]
            if "baseline" in only:
                results["baseline"] = asyncio.run(pipeline.baseline(s, n))
            if "throughput" in only:
                tp = asyncio.run(pipeline.throughput(s, n))
                base = results.get("baseline", {}).get("events_per_s")
                tp["ratio_to_baseline"] = round(tp["events_per_s"] / base, 4) if base else None
                results["throughput"] = tp
        if "sink" in only:
            database = fresh_database(admin_url, "bench_sink", own_db)
            results["sink"] = asyncio.run(pipeline.sink_writes(settings_for("sink", database), plan.sink_rows))
        if "latency" in only:

            def latency_settings(interval: float) -> Settings:
                name = f"lat{str(interval).replace('.', '_')}"
                s = settings_for(
                    name,
                    fresh_database(admin_url, f"bench_{name}", own_db),
                    api_port=live.free_port(),
                    topic_partitions=live.LATENCY_PARTITIONS,
                )
                ensure_topics(s)
                return s

            results["latency"] = live.latency(
                latency_settings, list(plan.latency_rates), list(plan.emit_intervals), plan.latency_seconds
            )
        if "fanout" in only:
            database = fresh_database(admin_url, "bench_fanout", own_db)
            s = settings_for("fan", database, api_port=live.free_port())
            ensure_topics(s)
            results["fanout"] = live.fanout(s, list(plan.fanout_clients), floor_threads=plan.fanout_floor_threads)
        if "ingest" in only:
            from bench import ingest

            database = fresh_database(admin_url, "bench_ingest", own_db)
            s = settings_for("ing", database, api_port=live.free_port())
            ensure_topics(s)
            results["ingest"] = ingest.doors(s, plan.ingest_http_records, plan.ingest_mqtt_records, plan.ingest_probes)
        if "workers" in only or "failover" in only:
            from bench import scale

            if "workers" in only:
                s = settings_for("wk", admin_url)
                ensure_topics(s)
                results["workers_backlog"] = asyncio.run(produce_backlog(s, plan.events, label="workers backlog"))

                def workers_settings(n: int) -> Settings:
                    database = fresh_database(admin_url, f"bench_workers{n}", own_db)
                    return settings_for("wk", database).model_copy(update={"consumer_group": f"bench-{run_id}-wk{n}"})

                results["workers"] = scale.workers(workers_settings, results["workers_backlog"]["events"])
                progress(f"workers: {orjson.dumps(results['workers']).decode()}")
            if "failover" in only:
                session: dict[str, Any] = {}
                if str(results["broker_process"].get("kind", "")).startswith("kafka") and (
                    "worker_session_timeout_ms" not in base.model_fields_set
                ):
                    from entrypoints.embedded.kafka import WORKER_SESSION_TIMEOUT_MS

                    session["worker_session_timeout_ms"] = WORKER_SESSION_TIMEOUT_MS  # as `ioc dev` runs them
                s = settings_for(
                    "fo", fresh_database(admin_url, "bench_failover", own_db), api_port=live.free_port(), **session
                )
                ensure_topics(s)
                results["failover"] = scale.failover(s)
                progress(f"failover: {orjson.dumps(results['failover']).decode()}")
    results["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    results["goals"] = judge(results)
    path = json_path or Path("artifacts") / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return results, path


def main(events: int | None, quick: bool, only: str | None, json_path: Path | None, broker: str | None = None) -> int:
    """The CLI entry: run, print the table and the JSON path."""
    chosen = tuple(s.strip() for s in only.split(",")) if only else SECTIONS
    unknown = [s for s in chosen if s not in SECTIONS + OPTIONAL_SECTIONS + SCALE_SECTIONS]
    if unknown:
        known = ", ".join(SECTIONS + OPTIONAL_SECTIONS + SCALE_SECTIONS)
        print(f"ioc bench: unknown section(s) {', '.join(unknown)}; choose from {known}", file=sys.stderr)
        return 2
    started = time.monotonic()
    if "anomaly" in chosen:  # quality, not speed: no broker or database (bench/anomaly.py)
        from bench import anomaly

        figures = anomaly.run(quick=quick, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(anomaly.table(figures))
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        where = json_path if json_path and chosen == ("anomaly",) else Path("artifacts") / f"bench-anomaly-{stamp}.json"
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
        print(f"\nanomaly figures: {where} ({time.monotonic() - started:.0f} s)")
        chosen = tuple(s for s in chosen if s != "anomaly")
        if not chosen:
            return 0
    results, path = run(events=events, quick=quick, only=chosen, json_path=json_path, broker=broker)
    print(table(results))
    print(f"\nfigures: {path} ({time.monotonic() - started:.0f} s)")
    return 0
