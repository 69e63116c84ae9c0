"""The `ioc` command: dev, worker, api, mqtt-bridge, simulate, replay, db migrate, topics create, token create, report, bench, soak."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ioc.durations import parse_duration
from ioc.errors import IocError
from ioc.logs import configure_logging
from ioc.settings import Settings

log = logging.getLogger(__name__)

#: Scenarios that send their own labelled warm-start history (simulators/faults.py): `ioc dev` gives
#: them no back-fill unless asked, so the labelled faults are the only ones in the sensors' series.
OWN_WARM_START_SCENARIOS = frozenset({"sensor-faults"})


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30m, 8h or 7d") from None


def _timestamp(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (e.g. 2026-11-22T08:00:00+07:00)")
    return t


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ioc", description="Nghệ An provincial operations centre backend")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the whole system on this machine (broker, PostgreSQL, worker, API, simulators)")
    dev.add_argument("--no-simulators", action="store_true", help="start without the simulators")
    dev.add_argument(
        "--rate",
        type=float,
        default=None,
        help="simulated events per second (default 50; with a back-fill, the back-fill's own intake: "
        "about 0.24, a province's 3,000 dossiers a day, shaped by office hours)",
    )
    dev.add_argument(
        "--scenario",
        default=None,
        help="a scenario for the simulators (flood, ddos, dossier-surge, sensor-outage, sensor-faults, dossier-surge-anomaly, incident-burst)",
    )
    dev.add_argument("--api-port", type=int, default=0, help="API port (default: a free one)")
    dev.add_argument(
        "--backfill",
        type=float,
        default=None,
        metavar="DAYS",
        help="days of past history sent first (default 30, or 0 with a scenario that brings its own "
        "warm start: its labelled faults would mix with the back-fill's series; 0: none)",
    )
    dev.add_argument(
        "--kafka-data",
        type=Path,
        default=None,
        help="keep the embedded Kafka's log in DIR across restarts (default: IOC_KAFKA_DATA_DIR, else a temp dir)",
    )
    dev.add_argument(
        "--workers",
        type=int,
        default=1,
        help="stream workers in the consumer group (default 1; at most the partitions)",
    )

    sub.add_parser("worker", help="the stream worker (IOC_KAFKA_BOOTSTRAP, IOC_DATABASE_URL)")
    sub.add_parser("api", help="the HTTP/WebSocket API")
    sub.add_parser("mqtt-bridge", help="sensor readings from MQTT (IOC_MQTT_URL) to ioc.sensor.readings")

    sim = sub.add_parser("simulate", help="produce realistic events to the input topics")
    sim.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events per second across all topics (default 50; after --backfill, the back-fill's intake)",
    )
    sim.add_argument("--duration", type=float, default=None, help="seconds to run (default: until Ctrl-C)")
    sim.add_argument(
        "--scenario",
        default=None,
        help="flood, ddos, dossier-surge, sensor-outage, sensor-faults, dossier-surge-anomaly or incident-burst",
    )
    sim.add_argument("--seed", type=int, default=348)
    sim.add_argument("--dup-rate", type=float, default=0.01, help="share of events sent twice")
    sim.add_argument("--ooo-rate", type=float, default=0.02, help="share of events delayed (out of order)")
    sim.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed records")
    sim.add_argument(
        "--history",
        type=float,
        default=0.0,
        metavar="HOURS",
        help="first send this many past hours of sensor readings (warm start)",
    )
    sim.add_argument("--no-progress", action="store_true")
    sim.add_argument(
        "--backfill",
        type=float,
        default=0.0,
        metavar="DAYS",
        help="first send this many past days of every kind of event and write their KPI history "
        "(simulators/backfill.py); with --duration 0 only that",
    )
    sim.add_argument(
        "--no-kpi-history", action="store_true", help="with --backfill: send the events only, write no KPI history"
    )
    sim.add_argument(
        "--sensors-via",
        choices=["kafka", "mqtt"],
        default="kafka",
        help="send sensor readings to Kafka or to the MQTT broker of IOC_MQTT_URL (for the bridge)",
    )

    rep = sub.add_parser("replay", help="offline: events from a JSON-lines file → KPI snapshots as JSON lines")
    rep.add_argument("file", type=Path, help='JSON lines {"topic": ..., "value": {...}}; - for stdin')
    rep.add_argument("--until", type=_timestamp, default=None, help="as-of time (default: the latest event time)")
    rep.add_argument("--stations", type=Path, default=None, help="station registry CSV")
    rep.add_argument("--units", type=Path, default=None, help="administrative units CSV")
    rep.add_argument("--no-progress", action="store_true")

    db = sub.add_parser("db", help="database commands")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("migrate", help="create or upgrade the schema")

    topics = sub.add_parser("topics", help="Kafka topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    topics_sub.add_parser(
        "create",
        help="create every topic (IOC_TOPIC_PARTITIONS, IOC_TOPIC_REPLICATION; one partition for KPIs, alerts)",
    )

    tok = sub.add_parser("token", help="access tokens")
    tok_sub = tok.add_subparsers(dest="token_command", required=True)
    create = tok_sub.add_parser("create", help="issue a signed access token, printed alone on stdout")
    create.add_argument("--role", required=True, choices=["operator", "security", "commune", "admin", "producer"])
    create.add_argument("--commune", default=None, help="commune code (required for --role commune)")
    create.add_argument("--ttl", type=_duration, default=dt.timedelta(hours=8), help="lifetime, e.g. 8h, 30d")
    create.add_argument("--subject", default=None, help="who the token is for (default: the role)")
    create.add_argument("--source", default=None, help="producer: the source system's name (rate limits, metrics)")
    create.add_argument("--topics", default="", help="producer: input topics it may write, comma-separated")
    create.add_argument("--stations", default="", help="producer of sensor readings: its station ids, or '*'")
    bench = sub.add_parser("bench", help="the performance harness: throughput, latency, fan-out, database writes")
    bench.add_argument("--events", type=int, default=None, help="backlog size for throughput (default 1,000,000)")
    bench.add_argument("--quick", action="store_true", help="small sizes (a smoke test for CI)")
    bench.add_argument(
        "--only",
        default=None,
        help="comma-separated: baseline,throughput,latency,fanout,sink (and ingest,anomaly,workers,failover)",
    )
    bench.add_argument(
        "--broker",
        choices=["kafka", "tansu"],
        default=None,
        help="the embedded broker to measure (default IOC_EMBEDDED_BROKER: Kafka where it can run)",
    )
    bench.add_argument(
        "--json", type=Path, default=None, help="where to write the figures (default artifacts/bench-<time>.json)"
    )
    from reports.cli import add_parser as add_report_parser

    add_report_parser(sub)

    soak = sub.add_parser("soak", help="a steady stream through real worker and API processes: memory over time")
    soak.add_argument("--rate", type=float, default=500.0, help="events per second (default 500)")
    soak.add_argument("--duration", type=_duration, default=dt.timedelta(minutes=30), help="e.g. 90s, 30m, 1h")
    soak.add_argument("--sample-every", type=_duration, default=dt.timedelta(seconds=30), help="default 30s")
    soak.add_argument("--clients", type=int, default=50, help="WebSocket subscribers kept connected (default 50)")
    soak.add_argument("--seed", type=int, default=348)
    soak.add_argument(
        "--json", type=Path, default=None, help="where to write the figures (default artifacts/soak-<time>.json)"
    )
    return p


T = TypeVar("T")


async def until_terminated(work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work``; SIGTERM (a service manager, ``ioc dev``, ``timeout``) cancels it as Ctrl-C does, so
    its clean-up runs, and then this returns None.

    Ctrl-C alone is not enough to rely on: a process started in the background by a shell without job
    control inherits SIGINT ignored, and Python then leaves it ignored.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError):  # no signal handlers here (Windows, a thread): as before
        return await task
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if terminated and (current is None or not current.cancelling()):
            return None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _mqtt_url(settings: Settings) -> str:
    from ioc.errors import ConfigurationError

    url = settings.mqtt_url.get_secret_value()
    if not url:
        raise ConfigurationError("--sensors-via mqtt needs IOC_MQTT_URL (the mqtt: line of `ioc dev`)")
    return url


def _producer_claims(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """A producer token's source, topics and stations; stations must be in the registry (or ``*``)."""
    from ioc.errors import ConfigurationError
    from ioc.registry import load_registry

    stations = [s.strip() for s in args.stations.split(",") if s.strip()]
    known = load_registry(settings.units_file, settings.stations_file, settings.targets_file).stations
    unknown = [s for s in stations if s != "*" and s not in known]
    if unknown:
        raise ConfigurationError(f"unknown station {unknown[0]!r} (see GET /api/stations)")
    return {
        "source": args.source,
        "topics": [t.strip() for t in args.topics.split(",") if t.strip()],
        "stations": stations,
    }


def _checkout_harness() -> None:
    """Make the checkout's ``bench/`` importable: the harness is not installed with the packages.

    ``make setup`` installs the project editable from a checkout, whose top level holds ``bench/``;
    an installed copy without it (the Docker image) says so instead of failing on an import.
    """
    if importlib.util.find_spec("bench") is not None:
        return
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__init__.py").is_file():
        raise IocError(
            "ioc bench and ioc soak run from a checkout of the project (make setup): bench/ is not installed"
        )
    sys.path.insert(0, str(root))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings()
        configure_logging(settings)
        return _dispatch(args, settings)
    except (IocError, OSError) as exc:  # bad configuration or input, a file that cannot be read
        print(f"ioc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _live_rate_after_backfill() -> float:
    from simulators.backfill import BackfillPlan, live_rate

    return round(live_rate(BackfillPlan(), dup_rate=0.01), 3)  # `ioc simulate`'s default --dup-rate


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "dev":
        from entrypoints.dev import run_dev

        if args.kafka_data is not None:
            settings = settings.model_copy(update={"kafka_data_dir": args.kafka_data})
        backfill = args.backfill
        if backfill is None:
            backfill = 0.0 if args.scenario in OWN_WARM_START_SCENARIOS else 30.0
        rate = args.rate
        if rate is None:
            rate = _live_rate_after_backfill() if backfill > 0 else 50.0
        return run_dev(
            settings,
            simulators=not args.no_simulators,
            rate=rate,
            scenario=args.scenario,
            api_port=args.api_port,
            backfill_days=backfill,
            workers=args.workers,
        )
    if args.command == "worker":
        from streams.worker import run

        run(settings)
        return 0
    if args.command == "api":
        from api.app import serve

        serve(settings)
        return 0
    if args.command == "mqtt-bridge":
        from streams.mqtt_bridge import serve as bridge

        asyncio.run(until_terminated(bridge(settings)))
        return 0
    if args.command == "simulate":
        from simulators.envelope import Event
        from simulators.producer import run as simulate

        continuation: list[Event] = []
        if args.backfill > 0:
            from simulators.backfill import run_backfill

            filled = asyncio.run(
                until_terminated(
                    run_backfill(settings, days=args.backfill, seed=args.seed, history=not args.no_kpi_history)
                )
            )
            if filled is None:
                return 128 + signal.SIGTERM
            continuation = filled.continuation
            if args.duration == 0:
                return 0

        stats = asyncio.run(
            until_terminated(
                simulate(
                    settings,
                    rate=args.rate
                    if args.rate is not None
                    else (_live_rate_after_backfill() if args.backfill else 50.0),
                    duration=args.duration,
                    scenario=args.scenario,
                    seed=args.seed,
                    dup_rate=args.dup_rate,
                    ooo_rate=args.ooo_rate,
                    bad_rate=args.bad_rate,
                    progress=not args.no_progress,
                    history_s=args.history * 3600,
                    sensors_via_mqtt=_mqtt_url(settings) if args.sensors_via == "mqtt" else None,
                    after_backfill=args.backfill > 0,
                    continuation=continuation,
                )
            )
        )
        if stats is None:  # stopped by SIGTERM: the producer flushed, as on Ctrl-C
            return 128 + signal.SIGTERM
        log.info("simulation finished: %s", stats)
        return 0
    if args.command == "replay":
        from ioc.registry import load_registry
        from streams.replay import replay, write

        registry = load_registry(
            args.units or settings.units_file, args.stations or settings.stations_file, settings.targets_file
        )
        from streams.anomaly_config import load_config

        snapshots, counts, alert_events = replay(
            args.file,
            registry,
            args.until,
            progress=None if args.no_progress else sys.stderr,
            anomaly=load_config(settings.anomaly_config),
        )
        write(snapshots, sys.stdout.buffer, alert_events)
        sys.stdout.flush()
        log.info("replay: %s", counts)
        return 0
    if args.command == "db":
        from ioc.db.migrate import migrate

        storage = migrate(
            settings.database_url, retention_days=settings.kpi_history_days, rollup_days=settings.kpi_rollup_days
        )
        print(f"migrated ({storage.value})")
        return 0
    if args.command == "topics":
        from entrypoints.embedded.broker import ensure_topics

        ensure_topics(settings)
        return 0
    if args.command == "token":
        from api.auth import create_token

        producer = _producer_claims(args, settings) if args.role == "producer" else {}
        subject = args.subject or (None if producer else args.role)
        print(create_token(settings, args.role, commune=args.commune, ttl=args.ttl, subject=subject, **producer))
        return 0
    if args.command == "bench":
        _checkout_harness()
        from bench.harness import main as bench

        return bench(args.events, args.quick, args.only, args.json, args.broker)
    if args.command == "report":
        from reports.cli import run as report

        return report(args, settings)
    if args.command == "soak":
        _checkout_harness()
        from bench.soak import Plan
        from bench.soak import main as soak

        plan = Plan(
            rate=args.rate,
            duration_s=args.duration.total_seconds(),
            sample_every_s=args.sample_every.total_seconds(),
            clients=args.clients,
            seed=args.seed,
        )
        return soak(plan, args.json)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
