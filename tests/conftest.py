"""Fixtures: broker and PostgreSQL per session, a database and a topic prefix per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ioc.settings import Settings

#: A signing key for tests, so no test touches this machine's development key.
TEST_SIGNING_KEY = "test-signing-key-0123456789abcdef0123456789"


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``IOC_KAFKA_BOOTSTRAP`` when set, else an embedded broker living for the whole session."""
    external = os.environ.get("IOC_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    from entrypoints.embedded.broker import embedded_broker

    # IOC_EMBEDDED_BROKER picks it (auto: Apache Kafka where it can run, else tansu with a warning).
    kind = Settings(_env_file=None).embedded_broker  # type: ignore[call-arg]
    with embedded_broker(kind) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """``IOC_DATABASE_URL`` when set (allowed to create databases), else an embedded PostgreSQL."""
    external = os.environ.get("IOC_DATABASE_URL")
    if external:
        yield external
        return
    from entrypoints.embedded.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        yield pg.url


@pytest.fixture(scope="session")
def storage_flavour(postgres_admin_url: str) -> str:
    """The storage flavour this server's migrations take (``timescaledb`` or ``postgresql``), found
    by migrating a scratch database."""
    from entrypoints.embedded.postgres import create_database, drop_database
    from ioc.db.migrate import migrate

    name = f"ioc_flavour_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name)
    try:
        return migrate(url).value
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture(autouse=True)
def _only_on_its_storage_flavour(request: pytest.FixtureRequest) -> None:
    """``@pytest.mark.storage("postgresql")`` (or ``"timescaledb"``): a test of one storage flavour
    runs only where migrations take that flavour, and says why it is skipped elsewhere."""
    marker = request.node.get_closest_marker("storage")
    if marker is None:
        return
    wanted = marker.args[0]
    found = request.getfixturevalue("storage_flavour")
    if found != wanted:
        pytest.skip(f"a test of the {wanted} storage flavour; this server's migrations take {found}")


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, migrated database for this test, dropped afterwards."""
    from entrypoints.embedded.postgres import create_database, drop_database
    from ioc.db.migrate import migrate

    name = f"ioc_test_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture
def topic_prefix() -> str:
    """A prefix no other test uses, so each test has topics (and consumer groups) of its own."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def make_settings(request: pytest.FixtureRequest, topic_prefix: str) -> Callable[..., Settings]:
    """Factory of Settings for this test: ``make_settings(**overrides)``.

    The broker and database are started (and the test's database created) only when the
    settings are first made without an override for them, so tests that need neither stay fast.
    """

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "topic_prefix": topic_prefix,
            "topic_partitions": 3,
            "topic_replication": 1,
            "consumer_group": f"{topic_prefix}worker",
            "signing_key": TEST_SIGNING_KEY,
            "worker_metrics_port": 0,
        }
        fields.update(overrides)
        if "kafka_bootstrap" not in fields:
            fields["kafka_bootstrap"] = request.getfixturevalue("kafka_bootstrap")
        if "database_url" not in fields:
            fields["database_url"] = request.getfixturevalue("database_url")
        # Keyword arguments beat IOC_* variables; a developer's .env file is not read at all.
        return Settings(_env_file=None, **fields)  # type: ignore[call-arg]

    return make
