"""Integration fixtures: the worker and the API as real processes, wired to the session's broker and database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from bench.live import child_env
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(settings: Settings) -> dict[str, str]:
    """The environment of `ioc` child processes for these settings (as `ioc bench` builds it), at the
    caller's log level and with a short emit interval."""
    return child_env(settings, IOC_EMIT_INTERVAL_S="0.5", IOC_LOG_LEVEL=os.environ.get("IOC_LOG_LEVEL", "INFO"))


def start_components(env: dict[str, str], names: tuple[str, ...], api_port: int) -> list[subprocess.Popen[bytes]]:
    """`ioc <name>` processes, returned once the API answers /readyz (as `ioc dev` runs them)."""
    procs = [subprocess.Popen([sys.executable, "-m", "entrypoints.cli", n], env=env, stdin=subprocess.DEVNULL) for n in names]
    try:
        deadline = time.monotonic() + 60
        while True:
            assert all(p.poll() is None for p in procs), "a component exited during start-up"
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=2).status_code == 200:
                    return procs
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "API not ready in 60 s"
            time.sleep(0.3)
    except BaseException:
        stop_components(procs)
        raise


def stop_components(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


async def consume(ingest: Any, records: int) -> None:
    """Drive an in-process worker as `ioc worker` does until it has read ``records`` and gone idle."""
    idle = 0
    while ingest.stats["records"] < records or idle < 2:
        batch = await ingest.gather(500)
        if batch:
            await ingest.process(batch)
            idle = 0
        else:
            idle += 1
        await ingest.emit()


@pytest.fixture
def system(make_settings: Callable[..., Settings]) -> Iterator[Settings]:
    """The worker and the API as separate processes, as `ioc dev` runs them."""
    settings = make_settings(api_port=free_port())
    ensure_topics(settings)
    procs = start_components(env_for(settings), ("worker", "api"), settings.api_port)
    try:
        yield settings
    finally:
        stop_components(procs)
