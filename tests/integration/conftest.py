"""Integration fixtures: the worker and the API as real processes, wired to the session's broker and database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from ioc.embedded.broker import ensure_topics
from ioc.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "IOC_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "IOC_DATABASE_URL": settings.database_url,
        "IOC_TOPIC_PREFIX": settings.topic_prefix,
        "IOC_TOPIC_PARTITIONS": str(settings.topic_partitions),
        "IOC_CONSUMER_GROUP": settings.consumer_group,
        "IOC_SIGNING_KEY": settings.signing_key.get_secret_value(),
        "IOC_API_PORT": str(settings.api_port),
        "IOC_EMIT_INTERVAL_S": "0.5",
        "IOC_WORKER_METRICS_PORT": "0",
    }


@pytest.fixture
def system(make_settings: Callable[..., Settings]) -> Iterator[Settings]:
    """The worker and the API as separate processes, as `ioc dev` runs them."""
    settings = make_settings(api_port=free_port())
    ensure_topics(settings)
    env = env_for(settings)
    procs = [
        subprocess.Popen([sys.executable, "-m", "ioc.cli", name], env=env, stdin=subprocess.DEVNULL)
        for name in ("worker", "api")
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert all(p.poll() is None for p in procs), "a component exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{settings.api_port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "API not ready in 60 s"
            time.sleep(0.3)
        yield settings
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
