"""`ioc dev`: the whole system on one machine, supervised: broker, PostgreSQL, MQTT, worker, API, bridge, simulators.

Embedded services are used unless ``IOC_KAFKA_BOOTSTRAP`` / ``IOC_DATABASE_URL`` / ``IOC_MQTT_URL`` are set. Each
component runs as a child process (`ioc worker`, `ioc api`, `ioc simulate`); one that exits is
restarted with backoff and the restart logged. Ctrl-C (or SIGTERM) stops every child, then the
embedded database (its directory removed) and broker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

from ioc.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 30.0
READY_TIMEOUT_S = 120.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    """One supervised component."""

    name: str
    argv: list[str]
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 1.0
    next_start: float = 0.0
    log_lines: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started_at = time.monotonic()
        log.info("%s started (pid %d)", self.name, self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class Supervisor:
    """Keeps children running: a child that exits is restarted after a growing delay."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    def start(self) -> None:
        for child in self.children:
            child.start()

    def watch_once(self) -> None:
        now = time.monotonic()
        for child in self.children:
            p = child.process
            if p is None:
                if now >= child.next_start:
                    child.restarts += 1
                    log.warning("restarting %s (restart #%d)", child.name, child.restarts)
                    child.start()
                continue
            code = p.poll()
            if code is None:
                if now - child.started_at > 60:
                    child.backoff = 1.0  # it has been healthy for a while
                continue
            log.error("%s exited with code %s; restarting in %.0f s", child.name, code, child.backoff)
            child.process = None
            child.next_start = now + child.backoff
            child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX_S)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


def _wait_ready(url: str, supervisor: Supervisor, stop: list[int], timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop:
        supervisor.watch_once()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    if not stop:
        raise TimeoutError(f"the API did not become ready at {url} within {timeout:.0f} s")


@contextlib.contextmanager
def _embedded(settings: Settings) -> Iterator[tuple[str, str, list[str]]]:
    """The broker and database to use: external when configured, else embedded ones for this run."""
    env_kafka = os.environ.get("IOC_KAFKA_BOOTSTRAP")
    env_db = os.environ.get("IOC_DATABASE_URL")
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if env_kafka:
            bootstrap = env_kafka
            notes.append("external Kafka")
        else:
            from entrypoints.embedded.broker import embedded_broker

            broker = embedded_broker(settings.embedded_broker, data_dir=settings.kafka_data_dir)
            stack.enter_context(broker)
            bootstrap = broker.bootstrap
        if env_db:
            database_url = env_db
        else:
            from entrypoints.embedded.postgres import EmbeddedPostgres

            database_url = stack.enter_context(EmbeddedPostgres()).url
        yield bootstrap, database_url, notes


@contextlib.contextmanager
def _mqtt(settings: Settings) -> Iterator[tuple[str | None, str | None]]:
    """(the URL shown to users, the bridge's URL): ``IOC_MQTT_URL`` for both when set, else an embedded
    mosquitto's development and bridge users; (None, None) when mosquitto is not installed."""
    external = settings.mqtt_url.get_secret_value()
    if external:
        yield external, external
        return
    from entrypoints.embedded.mosquitto import BRIDGE_USER, EmbeddedMosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        log.warning("mosquitto is not installed (scripts/setup installs it): no MQTT broker, no bridge")
        yield None, None
        return
    with EmbeddedMosquitto() as broker:
        yield broker.url(), broker.url(BRIDGE_USER)


def run_dev(
    settings: Settings,
    *,
    simulators: bool = True,
    rate: float = 50.0,
    scenario: str | None = None,
    api_port: int = 0,
    backfill_days: float = 30.0,
    workers: int = 1,
) -> int:
    from entrypoints.embedded.broker import ensure_topics
    from ioc.db.migrate import migrate

    # A plain flag: a signal handler must not take a lock the interrupted main thread may hold
    # (threading.Event.set() inside Event.wait() deadlocks).
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stop_requested.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    started = time.monotonic()
    with _embedded(settings) as (bootstrap, database_url, _notes), _mqtt(settings) as (mqtt_url, bridge_url):
        port = api_port or free_port()
        settings = settings.model_copy(
            update={"kafka_bootstrap": bootstrap, "database_url": database_url, "api_port": port}
        )
        storage = migrate(database_url, retention_days=settings.kpi_history_days, rollup_days=settings.kpi_rollup_days)
        log.info("database storage: %s", storage.value)
        ensure_topics(settings)
        metrics_ports = [free_port() for _ in range(workers)]
        env = {
            **os.environ,
            "IOC_KAFKA_BOOTSTRAP": bootstrap,
            "IOC_DATABASE_URL": database_url,
            "IOC_API_HOST": settings.api_host,
            "IOC_API_PORT": str(port),
            "IOC_TOPIC_PREFIX": settings.topic_prefix,
            "IOC_MODE": settings.mode.value,
        }
        if not os.environ.get("IOC_KAFKA_BOOTSTRAP") and "worker_session_timeout_ms" not in settings.model_fields_set:
            from entrypoints.embedded.kafka import WORKER_SESSION_TIMEOUT_MS

            # The embedded broker takes short sessions: a killed worker's partitions move sooner.
            env["IOC_WORKER_SESSION_TIMEOUT_MS"] = str(WORKER_SESSION_TIMEOUT_MS)
        exe = [sys.executable, "-m", "entrypoints.cli"]
        # One consumer group: each worker owns a share of the dossier partitions (docs/scaling.md).
        # Free metrics ports, so two `ioc dev` side by side do not collide; each worker logs its own.
        children = [
            Child(
                "worker" if workers == 1 else f"worker-{i + 1}",
                [*exe, "worker"],
                {**env, "IOC_WORKER_METRICS_PORT": str(port_)},
            )
            for i, port_ in enumerate(metrics_ports)
        ]
        children.append(Child("api", [*exe, "api"], env))
        if workers > settings.topic_partitions:
            log.warning(
                "%d workers for %d partitions: %d will own no dossier partition",
                workers, settings.topic_partitions, workers - settings.topic_partitions,
            )  # fmt: skip
        if bridge_url:
            bridge_env = {**env, "IOC_MQTT_URL": bridge_url, "IOC_MQTT_BRIDGE_METRICS_PORT": str(free_port())}
            children.append(Child("mqtt-bridge", [*exe, "mqtt-bridge"], bridge_env))
        if simulators:
            # A warm start (3 h of past sensor readings) so AQI, rain and river levels show at once.
            sim = [*exe, "simulate", "--rate", str(rate), "--history", "3", "--no-progress"]
            if scenario:
                sim += ["--scenario", scenario]
            children.append(Child("simulators", sim, env))
            if backfill_days > 0:  # first the past (simulators/backfill.py), then live; no warm start then
                at = sim.index("--history")
                sim[at : at + 2] = [f"--backfill={backfill_days:g}"]
        supervisor = Supervisor(children)
        supervisor.start()
        if simulators:  # a restarted simulator goes straight to live: its past is already sent
            children[-1].argv = [a for a in children[-1].argv if not a.startswith("--backfill")]
        try:
            base = f"http://{settings.api_host}:{port}"
            _wait_ready(f"{base}/readyz", supervisor, stop_requested)
            if stop_requested:
                return 0
            from api.auth import create_token

            token = create_token(settings, "operator", subject="ioc-dev")
            print(f"kafka: {bootstrap}", flush=True)
            print(f"database: {database_url}", flush=True)
            print(f"api: {base}", flush=True)
            print(f"wall: {base}/wall", flush=True)
            print(f"token: {token}", flush=True)
            if mqtt_url:
                print(f"mqtt: {mqtt_url}", flush=True)
            # Beyond the contract's five lines: where Prometheus finds each component.
            worker_metrics = " ".join(f"http://{settings.api_host}:{p}/metrics" for p in metrics_ports)
            print(f"metrics: {base}/metrics {worker_metrics}", flush=True)
            log.info(
                "ready in %.1f s (storage: %s); Ctrl-C stops everything", time.monotonic() - started, storage.value
            )
            while not stop_requested:
                time.sleep(0.5)
                supervisor.watch_once()
        finally:
            log.info("stopping")
            supervisor.stop()
    return 0
