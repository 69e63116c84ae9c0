"""Asking a broker from synchronous code: run a coroutine to its end, and whether a broker answers metadata."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka import AIOKafkaClient
from aiokafka.errors import KafkaError

T = TypeVar("T")


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private event loop in a worker thread.

    Works whether or not the caller already runs an event loop (``asyncio.run`` would refuse).
    """

    async def _main() -> T:
        return await make()

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ioc-sync") as pool:
        return pool.submit(asyncio.run, _main()).result()


async def metadata_ok(bootstrap: str) -> bool:
    """Whether the broker at ``bootstrap`` answers a metadata request listing at least one broker."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await client.bootstrap()
        return bool(client.cluster.brokers())
    except KafkaError:
        return False
    finally:
        await client.close()
