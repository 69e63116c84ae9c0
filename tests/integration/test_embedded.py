"""The embedded broker and PostgreSQL, topic creation, and the migration on each storage flavour."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from entrypoints.embedded.broker import (
    EmbeddedBroker,
    create_topics,
    embedded_broker,
    ensure_topics,
    topic_configs,
)
from entrypoints.embedded.kafka import EmbeddedKafka, unavailable_reason
from entrypoints.embedded.postgres import EmbeddedPostgres, create_database, drop_database
from entrypoints.embedded.probe import run_sync
from ioc.db.migrate import Storage, drop_expired, ensure_partitions, migrate, storage_of
from ioc.errors import EmbeddedServiceError
from ioc.settings import ALL_TOPICS, TOPIC_ALERTS, TOPIC_DEADLETTER, TOPIC_KPI, Settings

pytestmark = pytest.mark.integration
#: Tests of one storage flavour (the server's TimescaleDB, if preloaded, decides which runs).
plain_postgresql = pytest.mark.storage("postgresql")
timescaledb = pytest.mark.storage("timescaledb")
#: Tests of what only Apache Kafka does (the tansu fallback lacks it).
kafka_only = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"Apache Kafka cannot run here: {unavailable_reason()}"
)

UTC = dt.UTC
TABLES = {"kpi_latest", "kpi_history", "dossier_state", "incident_state", "sensor_reading"}


async def _partitions(bootstrap: str, names: list[str]) -> dict[str, int]:
    """Partition counts of the topics that exist (ask for all: a broker may auto-create named ones)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        listed = set(await admin.list_topics())
        present = [n for n in names if n in listed]
        described = await admin.describe_topics(present) if present else []
        return {t["topic"]: len(t["partitions"]) for t in described}
    finally:
        await admin.close()


# --- broker --------------------------------------------------------------------------------


def test_broker_bootstrap_is_a_loopback_address(kafka_bootstrap: str) -> None:
    host, _, port = kafka_bootstrap.rpartition(":")
    assert host and int(port) > 0


def test_broker_stops_and_releases_its_temp_dir() -> None:
    broker = EmbeddedBroker().start()
    log_dir = broker.log_path.parent
    assert broker.running and log_dir.exists()
    broker.stop()
    assert not broker.running and not log_dir.exists()
    with pytest.raises(EmbeddedServiceError):
        _ = broker.bootstrap


async def test_created_topics_have_the_requested_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    names = [f"{topic_prefix}a", f"{topic_prefix}b"]
    await create_topics(kafka_bootstrap, names, partitions=5)
    assert await _partitions(kafka_bootstrap, names) == {names[0]: 5, names[1]: 5}


async def test_creating_existing_topics_is_harmless(kafka_bootstrap: str, topic_prefix: str) -> None:
    name = f"{topic_prefix}again"
    await create_topics(kafka_bootstrap, [name], partitions=2)
    await create_topics(kafka_bootstrap, [name, name], partitions=2)
    assert await _partitions(kafka_bootstrap, [name]) == {name: 2}


async def test_ensure_topics_creates_every_contract_topic(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(database_url="unused", topic_partitions=4)
    ensure_topics(settings)
    ensure_topics(settings)
    names = [settings.topic(t) for t in ALL_TOPICS]
    assert await _partitions(settings.kafka_bootstrap, names) == {
        settings.topic(t): 1 if t in (TOPIC_KPI, TOPIC_ALERTS) else 4 for t in ALL_TOPICS
    }


async def test_a_message_round_trips_through_a_created_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}roundtrip"
    await create_topics(kafka_bootstrap, [topic], partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b'{"hello": "Ngh\xe1\xbb\x87 An"}', key=b"station-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}g", auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.key, record.value) == (b"station-1", '{"hello": "Nghệ An"}'.encode())
    assert (record.partition, record.offset) == (sent.partition, sent.offset)


async def _topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    [resource] = response.to_object()["resources"]
    return {c["config_names"]: c["config_value"] for c in resource["config_entries"]}


@kafka_only
async def test_contract_topics_are_created_with_their_retention_and_compaction(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(database_url="unused")
    ensure_topics(settings)
    for topic in ALL_TOPICS:
        configs = await _topic_configs(settings.kafka_bootstrap, settings.topic(topic))
        assert configs.items() >= topic_configs(topic, 1).items(), topic
    kpi = await _topic_configs(settings.kafka_bootstrap, settings.topic(TOPIC_KPI))
    assert kpi["cleanup.policy"] == "compact"
    dead = await _topic_configs(settings.kafka_bootstrap, settings.topic(TOPIC_DEADLETTER))
    assert (dead["cleanup.policy"], int(dead["retention.ms"])) == ("delete", 30 * 86_400_000)
    assert topic_configs(TOPIC_KPI, 3)["min.insync.replicas"] == "2"


async def _round_trip(bootstrap: str, topic: str, value: bytes | None = None) -> list[bytes]:
    """Produce ``value`` (if given), then every value the topic holds, read without a group."""
    if value is not None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=b"k")
        finally:
            await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=5000)
        return [r.value for records in batch.values() for r in records]
    finally:
        await consumer.stop()


@kafka_only
async def test_kafka_with_a_data_dir_keeps_topics_and_records_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "kafka-data"
    with EmbeddedKafka(data_dir=data) as kafka:
        await create_topics(kafka.bootstrap, ["kept"], partitions=1)
        assert await _round_trip(kafka.bootstrap, "kept", b"before the restart") == [b"before the restart"]
        first_pid = kafka.pid
    assert (data / "meta.properties").exists()
    with EmbeddedKafka(data_dir=data) as kafka:
        assert kafka.pid != first_pid
        assert await _round_trip(kafka.bootstrap, "kept") == [b"before the restart"]
    assert (data / "meta.properties").exists()  # stop() removes the temp dir, never the data dir


@kafka_only
def test_kafka_runs_with_a_bounded_heap_and_goes_when_stopped() -> None:
    kafka = EmbeddedKafka().start()
    pid = kafka.pid
    assert pid is not None
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"-Xmx512m" in argv and b"kafka.Kafka" in argv
    kafka.stop()
    assert not Path(f"/proc/{pid}").exists()


@kafka_only
def test_kafka_stops_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_OF_KAFKA], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent did not start Kafka: {line!r}"
        jvm = int(line)
        assert _runs_kafka(jvm)
    finally:
        parent.kill()  # no chance to stop its broker: the kernel tells the JVM
        parent.wait()
    deadline = time.monotonic() + 60
    while _runs_kafka(jvm):
        assert time.monotonic() < deadline, "the JVM outlived its parent by 60 s"
        time.sleep(0.2)


def _runs_kafka(pid: int) -> bool:
    """Whether ``pid`` is a live Kafka JVM (a zombie's command line is empty)."""
    try:
        return b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


#: A process that starts an embedded Kafka, prints the JVM's pid and waits to be killed.
PARENT_OF_KAFKA = """
import sys, time
from entrypoints.embedded.kafka import EmbeddedKafka
kafka = EmbeddedKafka().start()
print(kafka.pid, flush=True)
time.sleep(600)
"""


@kafka_only
async def test_two_members_of_one_group_share_the_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}shared"
    await create_topics(kafka_bootstrap, [topic], partitions=4)

    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}pair")

    first, second = member(), member()
    await first.start()
    await second.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            # getmany drives each member's part of the group protocol (join, sync, heartbeats).
            await asyncio.gather(first.getmany(timeout_ms=200), second.getmany(timeout_ms=200))
            owned = [first.assignment(), second.assignment()]
            if all(len(parts) == 2 for parts in owned):
                break
            assert time.monotonic() < deadline, f"no rebalance to 2 + 2 partitions: {owned}"
        assert owned[0].isdisjoint(owned[1])
    finally:
        await first.stop()
        await second.stop()


def test_the_tansu_fallback_still_serves_aiokafka(topic_prefix: str) -> None:
    try:
        broker = embedded_broker("tansu").start()
    except EmbeddedServiceError as exc:
        pytest.skip(f"no tansu binary here: {exc}")
    try:
        topic = f"{topic_prefix}fallback"
        run_sync(lambda: create_topics(broker.bootstrap, [topic], partitions=2))
        assert run_sync(lambda: _round_trip(broker.bootstrap, topic, b"on tansu")) == [b"on tansu"]
    finally:
        broker.stop()


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the tests run as root")
def test_postgres_runs_as_the_postgres_user_when_we_are_root(postgres_admin_url: str) -> None:
    if os.environ.get("IOC_DATABASE_URL"):
        pytest.skip("an external database is in use")
    with psycopg.connect(postgres_admin_url) as conn:
        data_dir = conn.execute("SHOW data_directory").fetchone()
    assert data_dir is not None
    import pwd

    assert pwd.getpwuid(os.stat(data_dir[0]).st_uid).pw_name == "postgres"


def test_postgres_stop_removes_its_temp_dir() -> None:
    pg = EmbeddedPostgres().start()
    data_dir = pg.log_path.parent
    with psycopg.connect(pg.url) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("ioc", "ioc")
    pg.stop()
    assert not data_dir.exists()
    with pytest.raises(EmbeddedServiceError):
        _ = pg.url


def test_created_database_can_be_dropped_while_in_use(postgres_admin_url: str) -> None:
    url = create_database(postgres_admin_url, "ioc_test_dropme")
    conn = psycopg.connect(url)
    try:
        drop_database(postgres_admin_url, "ioc_test_dropme")
    finally:
        conn.close()
    with psycopg.connect(postgres_admin_url) as admin:
        assert admin.execute("SELECT 1 FROM pg_database WHERE datname = 'ioc_test_dropme'").fetchone() is None


@plain_postgresql
def test_migrate_creates_the_tables_on_plain_postgresql(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " UNION SELECT relname FROM pg_class WHERE relkind = 'p'"
        ).fetchall()
        assert {r[0] for r in rows} >= TABLES
        assert storage_of(conn) is Storage.POSTGRESQL


@plain_postgresql
def test_migrate_creates_daily_utc_partitions_around_today(database_url: str) -> None:
    today = dt.datetime.now(UTC).date()
    with psycopg.connect(database_url) as conn:
        conn.execute("SET TimeZone = 'Asia/Ho_Chi_Minh'")  # bounds must not follow the session
        rows = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'sensor_reading'::regclass"
        ).fetchall()
        bounds: dict[str, str] = dict(rows)
        assert bounds["sensor_reading_default"] == "DEFAULT"
        assert f"sensor_reading_{today:%Y%m%d}" in bounds
        assert f"kpi_history_{today:%Y%m%d}" in {
            r[0] for r in conn.execute("SELECT inhrelid::regclass::text FROM pg_inherits").fetchall()
        }
        row = conn.execute(
            "INSERT INTO sensor_reading VALUES (%s, 's1', 'water_level', 'e1', '{}')"
            " RETURNING tableoid::regclass::text",
            (dt.datetime.combine(today, dt.time(0, 0), tzinfo=UTC),),
        ).fetchone()
        assert row == (f"sensor_reading_{today:%Y%m%d}",)


@plain_postgresql
def test_migrating_twice_is_harmless(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO kpi_latest (kpi, scope, win, value, unit, as_of, seq)"
            " VALUES ('on_time_rate', 'province', '1d', 0.9, 'ratio', now(), 1)"
        )
        before = conn.execute("SELECT count(*) FROM pg_class").fetchone()
        assert migrate(database_url) is Storage.POSTGRESQL
        assert migrate(database_url) is Storage.POSTGRESQL
        assert conn.execute("SELECT count(*) FROM pg_class").fetchone() == before
        assert conn.execute("SELECT value FROM kpi_latest").fetchall() == [(0.9,)]


@plain_postgresql
def test_drop_expired_drops_old_partitions_and_their_rows(database_url: str) -> None:
    today = dt.datetime.now(UTC).date()
    old = today - dt.timedelta(days=40)
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert ensure_partitions(conn, old, old) == 2
        row = conn.execute(
            "INSERT INTO sensor_reading VALUES (%s, 's1', 'aqi', 'e-old', '{}') RETURNING tableoid::regclass::text",
            (dt.datetime.combine(old, dt.time(12), tzinfo=UTC),),
        ).fetchone()
        assert row == (f"sensor_reading_{old:%Y%m%d}",)
        conn.execute(
            "INSERT INTO sensor_reading VALUES (%s, 's1', 'aqi', 'e-now', '{}')",
            (dt.datetime.combine(today, dt.time(12), tzinfo=UTC),),
        )

        assert drop_expired(conn, retention_days=30, today=today) == 2

        assert conn.execute("SELECT to_regclass(%s)", (f"sensor_reading_{old:%Y%m%d}",)).fetchone() == (None,)
        assert conn.execute("SELECT event_id FROM sensor_reading").fetchall() == [("e-now",)]


@plain_postgresql
def test_drop_expired_also_clears_old_rows_of_the_default_partition(database_url: str) -> None:
    today = dt.datetime.now(UTC).date()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sensor_reading VALUES (%s, 's1', 'aqi', 'e-old', '{}')",
            (dt.datetime.combine(today - dt.timedelta(days=90), dt.time(12), tzinfo=UTC),),
        )
        drop_expired(conn, retention_days=30, today=today)
        assert conn.execute("SELECT count(*) FROM sensor_reading_default").fetchone() == (0,)


@plain_postgresql
def test_a_day_whose_rows_sit_in_the_default_partition_is_left_there(database_url: str) -> None:
    day = dt.datetime.now(UTC).date() - dt.timedelta(days=20)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sensor_reading VALUES (%s, 's1', 'aqi', 'e1', '{}')",
            (dt.datetime.combine(day, dt.time(12), tzinfo=UTC),),
        )
        assert ensure_partitions(conn, day, day) == 1  # kpi_history's only
        assert conn.execute("SELECT tableoid::regclass::text FROM sensor_reading").fetchall() == [
            ("sensor_reading_default",)
        ]


def test_migrate_succeeds_and_says_nothing_of_timescaledb_where_it_is_absent(
    postgres_admin_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with psycopg.connect(postgres_admin_url) as conn:
        installed = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    if installed:
        pytest.skip("TimescaleDB is installed on this server")
    url = create_database(postgres_admin_url, "ioc_test_no_timescale")
    try:
        with caplog.at_level("WARNING", logger="ioc.db.migrate"):
            assert migrate(url) is Storage.POSTGRESQL
        assert caplog.records == []
    finally:
        drop_database(postgres_admin_url, "ioc_test_no_timescale")


@timescaledb
def test_migrate_on_timescaledb_makes_hypertables_policies_and_the_hourly_aggregate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert storage_of(conn) is Storage.TIMESCALEDB
        hypertables = dict(
            conn.execute(
                "SELECT hypertable_name, compression_enabled FROM timescaledb_information.hypertables"
                " WHERE hypertable_schema = 'public'"
            ).fetchall()
        )
        assert hypertables == {"kpi_history": True, "sensor_reading": True}
        jobs = set(
            conn.execute(
                "SELECT proc_name, hypertable_name FROM timescaledb_information.jobs WHERE hypertable_name IS NOT NULL"
            ).fetchall()
        )
        for table in ("kpi_history", "sensor_reading"):
            assert {("policy_compression", table), ("policy_retention", table)} <= jobs
        aggregate = conn.execute(
            "SELECT materialization_hypertable_name FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'kpi_hourly'"
        ).fetchone()
        assert aggregate is not None
        assert {p for p, _ in jobs} >= {"policy_refresh_continuous_aggregate"}
        # Migrating again changes nothing and keeps the flavour.
        before = conn.execute("SELECT count(*) FROM timescaledb_information.jobs").fetchone()
        assert migrate(database_url) is Storage.TIMESCALEDB
        assert conn.execute("SELECT count(*) FROM timescaledb_information.jobs").fetchone() == before
        # Rows go into chunks, and history reads them back through time_bucket.
        conn.execute(
            "INSERT INTO kpi_history (as_of, kpi, scope, win, value, seq) VALUES (now(), 'k', 'province', 'now', 1, 1)"
        )
        bucket = conn.execute(
            "SELECT time_bucket(INTERVAL '1 hour', as_of), value FROM kpi_history WHERE kpi = 'k'"
        ).fetchone()
        assert bucket is not None and bucket[1] == 1


@timescaledb
def test_the_embedded_postgresql_preloads_timescaledb_where_it_is_installed(postgres_admin_url: str) -> None:
    with psycopg.connect(postgres_admin_url) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
    assert row is not None and "timescaledb" in row[0]
