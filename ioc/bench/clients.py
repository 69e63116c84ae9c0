"""Many WebSocket clients in one process (`python -m ioc.bench.clients URL TOKEN N`), for the fan-out run.

Connects ``N`` clients subscribed to ``kpi:province``, prints ``{"ready": n, "failed": f}`` on
stdout, then records, for every ``bench.probe`` update, the delay from the probe's send time
(its ``value``, wall-clock seconds) to its arrival. When stdin closes it prints the delays (ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

PROBE_KPI = "bench.probe"
CONNECT_CONCURRENCY = 100


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _client(url: str, token: str, gate: asyncio.Semaphore, delays: list[float], ready: list[int]) -> None:
    async with gate:
        ws: ClientConnection = await connect(
            url,
            subprotocols=[Subprotocol("bearer"), Subprotocol(token)],
            ping_interval=None,
            open_timeout=60,
            max_size=None,
        )
        await ws.send('{"type":"subscribe","channels":["kpi:province"]}')
        while True:
            msg = orjson.loads(await ws.recv())
            if msg.get("type") == "snapshot":
                break
    ready[0] += 1
    try:
        async for frame in ws:
            now = time.time()
            msg = orjson.loads(frame)
            item: Any = msg.get("item")
            if msg.get("type") == "update" and item and item.get("kpi") == PROBE_KPI:
                delays.append((now - float(item["value"])) * 1000)
    finally:
        await ws.close()


async def main(url: str, token: str, n: int) -> None:
    raise_fd_limit()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    delays: list[float] = []
    ready = [0]
    tasks = [asyncio.create_task(_client(url, token, gate, delays, ready)) for _ in range(n)]
    while ready[0] + sum(t.done() for t in tasks) < n:
        await asyncio.sleep(0.1)
    failed = sum(1 for t in tasks if t.done() and t.exception() is not None)
    sys.stdout.write(orjson.dumps({"ready": ready[0], "failed": failed}).decode() + "\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
    sys.stdout.write(orjson.dumps({"delays_ms": [round(d, 3) for d in delays]}).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
