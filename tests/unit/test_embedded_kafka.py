"""The choice of embedded broker (Apache Kafka, or tansu with a warning) and the Kafka jar cache, without starting either."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from entrypoints.embedded import broker as broker_mod
from entrypoints.embedded import kafka
from entrypoints.embedded.broker import TANSU_LIMITS, EmbeddedTansu, embedded_broker
from entrypoints.embedded.kafka import EmbeddedKafka
from ioc.errors import EmbeddedServiceError
from ioc.settings import Settings


def _kafka_unavailable(monkeypatch: pytest.MonkeyPatch, reason: str | None) -> None:
    monkeypatch.setattr(broker_mod, "unavailable_reason", lambda: reason)


def test_auto_picks_apache_kafka_where_it_can_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _kafka_unavailable(monkeypatch, None)
    with caplog.at_level(logging.WARNING):
        chosen = embedded_broker("auto", data_dir="/tmp/somewhere")
    assert isinstance(chosen, EmbeddedKafka)
    assert chosen.data_dir == Path("/tmp/somewhere")
    assert caplog.records == []


def test_auto_falls_back_to_tansu_with_one_warning_that_says_what_does_not_work(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _kafka_unavailable(monkeypatch, "no Java 17+")
    with caplog.at_level(logging.WARNING):
        chosen = embedded_broker("auto", data_dir="/srv/kafka")
    assert isinstance(chosen, EmbeddedTansu)
    [warning] = caplog.records
    message = warning.getMessage()
    assert "no Java 17+" in message and TANSU_LIMITS in message and "/srv/kafka is not used" in message
    for limit in ("kcat", "librdkafka", "transactions", "compaction", "retention", "durable", "group"):
        assert limit in message


def test_asking_for_kafka_where_it_cannot_run_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    _kafka_unavailable(monkeypatch, "the jars are not fetched")
    with pytest.raises(EmbeddedServiceError, match="the jars are not fetched"):
        embedded_broker("kafka")


def test_asking_for_tansu_gets_it_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _kafka_unavailable(monkeypatch, None)
    with caplog.at_level(logging.WARNING):
        assert isinstance(embedded_broker("tansu", port=1234, advertised="proxy:1"), EmbeddedTansu)
    assert caplog.records == []


def test_the_setting_refuses_an_unknown_broker() -> None:
    with pytest.raises(ValueError, match="embedded_broker"):
        Settings(_env_file=None, embedded_broker="redpanda")  # type: ignore[call-arg, arg-type]


def test_the_version_comes_from_the_committed_pom_and_names_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    version = kafka.kafka_version()
    assert re.fullmatch(r"4\.\d+\.\d+", version)
    assert kafka.cache_dir().parent == tmp_path / "ioc"
    assert kafka.cache_dir().name.startswith(f"kafka-{version}-")


def test_jars_count_only_once_their_fetch_completed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    libs = kafka.cache_dir() / "libs"
    libs.mkdir(parents=True)
    (libs / f"kafka_2.13-{kafka.kafka_version()}.jar").write_bytes(b"")
    assert kafka.libs_dir() is None  # an interrupted fetch
    (kafka.cache_dir() / kafka.COMPLETE_MARKER).write_text("done\n")
    assert kafka.libs_dir() == libs
    monkeypatch.setattr(kafka, "find_java", lambda: "/usr/bin/java")
    assert kafka.unavailable_reason() is None


def test_the_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kafka, "find_java", lambda: None)
    assert "Java 17+" in (kafka.unavailable_reason() or "")
    monkeypatch.setattr(kafka, "find_java", lambda: "/usr/bin/java")
    reason = kafka.unavailable_reason() or ""
    assert "jars" in reason and "scripts/setup" in reason


@pytest.mark.parametrize(
    ("banner", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("no banner at all", None),
    ],
)
def test_java_version_reads_the_banner(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, banner: str, major: int | None
) -> None:
    fake = tmp_path / "java"
    fake.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{banner}\nEOF\n")
    fake.chmod(0o755)
    assert kafka.java_version(str(fake)) == major


def test_an_old_java_is_not_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "jdk8"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").write_text("#!/bin/sh\necho 'java version \"1.8.0_392\"' >&2\n")
    (home / "bin" / "java").chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert kafka.find_java() is None


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {kafka.random_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id) and not cluster_id.startswith("-")


def test_temp_dirs_of_dead_owners_are_swept_and_others_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kafka.tempfile, "gettempdir", lambda: str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()

    def made(name: str, owner: int | None, age_s: float) -> Path:
        path = tmp_path / f"{kafka.TEMP_PREFIX}{name}"
        (path / "data").mkdir(parents=True)
        if owner is not None:
            (path / kafka.OWNER_FILE).write_text(f"{owner}\n")
        then = time.time() - age_s
        os.utime(path, (then, then))
        return path

    orphan = made("orphan", gone.pid, 3600)
    young = made("young", gone.pid, 0)
    alive = made("alive", os.getpid(), 3600)
    unowned = made("unowned", None, 3600)
    kafka._sweep_orphans()
    assert not orphan.exists()
    assert young.exists() and alive.exists() and unowned.exists()
