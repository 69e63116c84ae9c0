"""An embedded Apache Kafka (4.x, KRaft, one combined broker and controller node) run from cached jars.

The jars are pinned by ``kafka-pom.xml`` next to this module and fetched by ``scripts/setup``
(``python -m entrypoints.embedded.kafka fetch``, Maven's ``dependency:copy-dependencies``) into
``$XDG_CACHE_HOME/ioc/kafka-<version>-<pom hash>/libs`` (default ``~/.cache``), outside git.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

from aiokafka import AIOKafkaClient
from aiokafka.client import CoordinationType
from aiokafka.errors import KafkaError

from entrypoints.embedded import die_with_parent, free_port, port_open
from entrypoints.embedded.probe import metadata_ok, run_sync
from entrypoints.embedded.process import EmbeddedProcess
from ioc.errors import EmbeddedServiceError

log = logging.getLogger(__name__)

POM = Path(__file__).with_name("kafka-pom.xml")
LOG4J2_CONFIG = Path(__file__).with_name("kafka-log4j2.xml")
#: The oldest Java Kafka 4.x brokers run on.
JAVA_MIN = 17
#: The broker's heap: a development broker's working set is far below it (its RSS stays under ~450 MiB).
HEAP_MB = 512
#: JVM options chosen for a quick start and a small footprint on a shared machine: the serial
#: collector (one broker, small heap) and class-data sharing of the JDK's own classes.
JVM_OPTIONS = ("-XX:+UseSerialGC", "-Xshare:auto", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
#: The main classes: the broker, and the tool that formats a fresh data dir.
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
#: A file the fetch writes last: a cache dir without it is incomplete.
COMPLETE_MARKER = ".complete"

#: The shortest consumer-group session the embedded broker accepts (Kafka's default floor: 6,000 ms).
MIN_SESSION_TIMEOUT_MS = 1000
#: The workers' session on the embedded broker (`ioc dev`, `ioc bench`) unless IOC_WORKER_SESSION_TIMEOUT_MS
#: says otherwise: a SIGKILLed worker's partitions move within it (docs/scaling.md, "Session timeout").
WORKER_SESSION_TIMEOUT_MS = 1500


def kafka_version() -> str:
    """The pinned Apache Kafka version (``kafka.version`` of ``kafka-pom.xml``)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not found:  # pragma: no cover - the committed pom has it
        raise EmbeddedServiceError(f"{POM} has no <kafka.version>")
    return found.group(1).strip()


def cache_dir() -> Path:
    """Where this pom's jars live: one directory per Kafka version and pom content."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:8]
    return base / "ioc" / f"kafka-{kafka_version()}-{digest}"


def libs_dir() -> Path | None:
    """The directory of the fetched jars, or None when they have not been fetched (completely)."""
    libs = cache_dir() / "libs"
    return libs if (cache_dir() / COMPLETE_MARKER).exists() and any(libs.glob("kafka_2.13-*.jar")) else None


def java_version(java: str) -> int | None:
    """The feature version (17, 21, ...) of a ``java`` executable, or None if it does not run."""
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    # `openjdk version "17.0.15" 2025-04-15`, or "1.8.0_392" for Java 8
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def find_java() -> str | None:
    """A ``java`` of version 17 or later: ``$JAVA_HOME/bin/java``, else the one on PATH."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    for java in candidates:
        version = java_version(java)
        if version is not None and version >= JAVA_MIN:
            return java
    return None


def unavailable_reason() -> str | None:
    """Why the embedded Kafka cannot run here (None: it can)."""
    if find_java() is None:
        return f"no Java {JAVA_MIN}+ (install `default-jre-headless`, or set JAVA_HOME)"
    if libs_dir() is None:
        return f"Kafka {kafka_version()}'s jars are not in {cache_dir()} (run scripts/setup, which fetches them)"
    return None


def fetch_jars(*, quiet: bool = True) -> Path:
    """Fetch the pom's jars with Maven into the cache (nothing to do when present); their directory."""
    present = libs_dir()
    if present is not None:
        return present
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EmbeddedServiceError("fetching Kafka's jars needs Maven (`mvn`, Debian package `maven`)")
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    # Copied into a directory of our own, then renamed: a concurrent or interrupted fetch leaves no half cache.
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=target))
    try:
        cmd = [mvn, "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"]
        if quiet:
            cmd.insert(1, "-q")
        result = subprocess.run(cmd, capture_output=quiet, text=True)
        if result.returncode != 0:
            detail = (result.stdout or "")[-2000:] if quiet else ""
            raise EmbeddedServiceError(f"Maven could not fetch Kafka's jars (status {result.returncode}):\n{detail}")
        libs = target / "libs"
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (target / COMPLETE_MARKER).write_text(f"{kafka_version()}\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Kafka %s's jars fetched into %s", kafka_version(), target / "libs")
    return target / "libs"


#: Temp dirs of embedded brokers, and the file in each naming the process that owns it.
TEMP_PREFIX = "ioc-kafka-"
OWNER_FILE = "owner.pid"


def _sweep_orphans() -> None:
    """Remove the temp dirs whose owner died without stopping its broker (killed: the broker then
    stopped by itself, as a child that dies with its parent, but nobody removed its log)."""
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        try:
            owner = int((path / OWNER_FILE).read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            if time.time() - path.stat().st_mtime > 60:  # not one being set up right now
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left by process %d", path, owner)
        except (OSError, ValueError):  # not ours to judge: another user's, or no owner file yet
            continue


def random_cluster_id() -> str:
    """A KRaft cluster id as ``kafka-storage random-uuid`` makes one (URL-safe base64 of 16 bytes)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka's own rule: an id must not read as a command-line option
            return text


class EmbeddedKafka(EmbeddedProcess):
    """Apache Kafka in KRaft mode, one node that is broker and controller, on free loopback ports.

    Its data goes in the temp dir (removed by ``stop()``), or in ``data_dir`` when given, which
    keeps the log (topics, offsets, groups) across restarts.

    >>> with EmbeddedKafka() as kafka:
    ...     ensure_topics(Settings(kafka_bootstrap=kafka.bootstrap))
    """

    name = "embedded broker"
    stop_signal = signal.SIGTERM  # a controlled shutdown
    stop_timeout = 30.0

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        start_timeout: float = 60.0,
        port: int | None = None,
        advertised: str | None = None,
        data_dir: Path | str | None = None,
        heap_mb: int = HEAP_MB,
    ) -> None:
        """``port``: listen there instead of on a free port. ``advertised``: the ``HOST:PORT``
        clients are told to connect to (a proxy in front of the broker), if not the listener.
        ``data_dir``: a persistent log directory (created, and formatted on first use)."""
        super().__init__(host=host, start_timeout=start_timeout)
        self.fixed_port = port
        self.advertised = advertised
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else None
        self.heap_mb = heap_mb
        #: Seconds from spawning the JVM to the first metadata answer (the last start).
        self.start_seconds: float | None = None
        #: (where the JVM writes its class archive at exit, where it goes once complete), on a first run.
        self._archive: tuple[Path, Path] | None = None

    @property
    def log_path(self) -> Path:
        """The broker's log (warnings, start and stop); its stdout and stderr are beside it."""
        return self._dir() / "server.log"

    @property
    def bootstrap(self) -> str:
        """``HOST:PORT`` for Kafka clients."""
        if self._port is None:
            raise EmbeddedServiceError("the embedded Kafka is not started")
        return f"{self.host}:{self._port}"

    @property
    def log_dir(self) -> Path:
        """Where the broker keeps its topics' data."""
        return self.data_dir or self._dir() / "data"

    def start(self) -> Self:
        """Format the data dir if new, start the node, and wait until it answers a metadata request."""
        if self.running:
            return self
        java = find_java()
        libs = libs_dir()
        if java is None or libs is None:
            raise EmbeddedServiceError(f"the embedded Kafka cannot run: {unavailable_reason()}")
        classpath = f"{libs}/*"
        began = time.monotonic()

        def launch() -> int:
            nonlocal began
            port = self.fixed_port or free_port(self.host)
            config = self._write_config(port, free_port(self.host))
            self._format(java, classpath, config)
            began = time.monotonic()
            self._spawn(java, classpath, config)
            return port

        self._port = self._start_on_a_free_port(launch, self._wait_ready, self.fixed_port is not None)
        self.start_seconds = time.monotonic() - began
        log.info(
            "embedded Kafka %s ready on %s in %.1f s (data %s; log %s)",
            kafka_version(), self.bootstrap, self.start_seconds, self.log_dir, self.log_path,
        )  # fmt: skip
        return self

    # --- internals ---------------------------------------------------------------------------

    def _dir(self) -> Path:
        if self._tmp is None:
            _sweep_orphans()
            self._tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
            (self._tmp / OWNER_FILE).write_text(f"{os.getpid()}\n")
        return self._tmp

    def _jvm(self, java: str, classpath: str, heap_mb: int) -> list[str]:
        return [
            java, f"-Xmx{heap_mb}m", *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self._dir()}",
            "-cp", classpath,
        ]  # fmt: skip

    def _write_config(self, port: int, controller_port: int) -> Path:
        host = self.host
        properties = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{controller_port}",
            "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.advertised or f'{host}:{port}'}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            # One node: every internal topic has one replica; few partitions keep the first group fast.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A group forms as soon as its first member joins (the default waits 3 s for more).
            "group.initial.rebalance.delay.ms": "0",
            # Workers may ask for sessions down to 1 s (Kafka's floor is 6 s): a SIGKILLed worker's
            # partitions move that much sooner (docs/scaling.md, "Session timeout").
            "group.min.session.timeout.ms": str(MIN_SESSION_TIMEOUT_MS),
            # As in production (deploy/): the system creates its topics, a misspelt name is an error.
            "auto.create.topics.enable": "false",
        }
        path = self._dir() / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
        return path

    def _format(self, java: str, classpath: str, config: Path) -> None:
        """Give a new log directory its cluster id and bootstrap metadata (KRaft refuses an unformatted one).

        Kafka's format tool costs a JVM start (1.5-3 s here), so it runs once per jar cache: later
        directories get a copy of its ``bootstrap.checkpoint`` (the feature levels, no cluster id in
        it) and a ``meta.properties`` with fresh ids, which is all the tool writes for this node.
        """
        if (self.log_dir / "meta.properties").exists():
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        template = cache_dir() / "bootstrap.checkpoint"
        if template.exists():
            shutil.copyfile(template, self.log_dir / "bootstrap.checkpoint")
            meta = {
                "version": "1",
                "node.id": "1",
                "directory.id": random_cluster_id(),
                "cluster.id": random_cluster_id(),
            }
            staged = self.log_dir / "meta.properties.tmp"
            staged.write_text("".join(f"{key}={value}\n" for key, value in meta.items()))
            staged.rename(self.log_dir / "meta.properties")
            return
        cmd = [
            *self._jvm(java, classpath, 256), STORAGE_TOOL, "format",
            "--cluster-id", random_cluster_id(), "--config", str(config), "--ignore-formatted",
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout)
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"formatting Kafka's log directory {self.log_dir} failed (status {result.returncode}):\n"
                f"{(result.stdout + result.stderr)[-2000:]}"
            )
        with contextlib.suppress(OSError):  # no template: the next start runs the tool again
            staged = template.with_name(f"{template.name}.{uuid.uuid4().hex}")
            shutil.copyfile(self.log_dir / "bootstrap.checkpoint", staged)
            staged.rename(template)

    def _class_archive_options(self, java: str) -> list[str]:
        """Class-data sharing of Kafka's own classes (a start about a third quicker): the first run
        writes an archive when it exits, later runs map it. One archive per cache and JVM build."""
        binary = Path(java).resolve()
        key = hashlib.sha256(f"{binary}:{binary.stat().st_mtime_ns}".encode()).hexdigest()[:8]
        archive = cache_dir() / f"classes-{key}.jsa"
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        self._archive = (archive.with_name(f"{archive.name}.{uuid.uuid4().hex}.tmp"), archive)
        return [f"-XX:ArchiveClassesAtExit={self._archive[0]}"]

    def _end_process(self, timeout: float) -> None:
        super()._end_process(timeout)
        if self._archive is not None:
            staged, archive = self._archive
            self._archive = None
            with contextlib.suppress(OSError):
                if staged.exists() and staged.stat().st_size > 0:
                    staged.rename(archive)
                else:
                    staged.unlink(missing_ok=True)

    def _spawn(self, java: str, classpath: str, config: Path) -> None:
        jvm = self._jvm(java, classpath, self.heap_mb)
        cmd = [*jvm[:-2], *self._class_archive_options(java), *jvm[-2:], KAFKA_MAIN, str(config)]
        self._log_file = (self._dir() / "stdout.log").open("ab")
        log.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._dir(),
            # The terminal's Ctrl-C is for the parent, which stops its children in order.
            start_new_session=True,
            # A controlled shutdown when the parent dies: a persistent log stays clean.
            preexec_fn=die_with_parent(signal.SIGTERM),
        )

    def _wait_ready(self, port: int) -> None:

        deadline = time.monotonic() + self.start_timeout
        bootstrap = f"{self.host}:{port}"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._error(f"the embedded Kafka exited with status {self._proc.returncode}")
            # Then groups must work too: the first lookup makes the node create its offsets topic,
            # which a worker's first join would otherwise wait for (logging an error).
            if (
                port_open(self.host, port)
                and run_sync(lambda: metadata_ok(bootstrap))
                and run_sync(lambda: group_coordinator_ok(bootstrap))
            ):
                return
            if time.monotonic() > deadline:
                raise self._error(f"the embedded Kafka did not answer on {bootstrap} within {self.start_timeout:.0f}s")
            time.sleep(0.05)

    def _error(self, message: str) -> EmbeddedServiceError:
        error = super()._error(message)
        stdout = self._dir() / "stdout.log"
        if stdout.exists() and stdout.stat().st_size:
            from entrypoints.embedded import log_tail

            return EmbeddedServiceError(f"{error}\nstdout/stderr {stdout}:\n{log_tail(stdout)}")
        return error


async def group_coordinator_ok(bootstrap: str) -> bool:
    """Whether the cluster at ``bootstrap`` names a coordinator for a consumer group."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await client.bootstrap()
        await client.coordinator_lookup(CoordinationType.GROUP, "ioc-embedded-ready")
        return True
    except KafkaError:
        return False
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m entrypoints.embedded.kafka fetch|where``: fetch the jars (scripts/setup), or print their directory."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["fetch"]:
        try:
            print(fetch_jars(), flush=True)
        except EmbeddedServiceError as exc:
            print(f"entrypoints.embedded.kafka: {exc}", file=sys.stderr)
            return 1
        return 0
    if args == ["where"]:
        libs = libs_dir()
        print(libs or f"not fetched: {cache_dir()}")
        return 0 if libs else 1
    print("usage: python -m entrypoints.embedded.kafka fetch|where", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
