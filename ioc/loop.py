"""The event loop the processes run on: uvloop where it is installed (Linux and macOS), else asyncio's.

uvloop's transports and selector are C: the API's fan-out writes a frame to thousands of sockets
per update, and the worker's Kafka and PostgreSQL clients do many small reads, so both spend less
of their one core on the loop itself (figures in docs/performance.md). uvicorn picks uvloop by
itself when it is installed (``loop="auto"``); `install` does the same for the worker and the
benchmarks, which run the worker's pipeline in-process.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any


def install() -> str:
    """Make new event loops uvloop's when it is available; the name of the loop in use."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows: asyncio's own loop
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def settle_heap() -> int:
    """Take what startup built (modules, the app, state rebuilt from the database: it lives as long as
    the process) out of the garbage collector's way; returns how many objects that was.

    A full collection walks every object the collector tracks, and every value of every tracked dict:
    in the worker that is the entity dicts with hundreds of thousands of states. Measured during the
    latency benchmark, those passes stopped the worker's event loop for 70-116 ms, five or six times
    per 80-second run, straight into the tail of event-to-screen latency. Frozen objects are never walked
    again (`gc.freeze`); objects created later are collected as before, and the state holds no
    reference cycles, so nothing is kept alive that would otherwise be freed.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcTimes:
    """How often and how long the garbage collector ran, per generation, until `close` (benchmarks)."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen, took = info["generation"], time.perf_counter() - self._started
        self.runs[gen] += 1
        self.seconds[gen] += took
        self.longest[gen] = max(self.longest[gen], took)

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def figures(self) -> dict[str, Any]:
        return {
            f"gen{g}": {
                "runs": self.runs[g],
                "ms": round(self.seconds[g] * 1000, 1),
                "longest_ms": round(self.longest[g] * 1000, 1),
            }
            for g in range(3)
        }
