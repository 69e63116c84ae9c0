"""The event loop the processes run on: uvloop where it is installed (Linux and macOS), else asyncio's.

uvloop's transports and selector are C: the API's fan-out writes a frame to thousands of sockets
per update, and the worker's Kafka and PostgreSQL clients do many small reads, so both spend less
of their one core on the loop itself (figures in docs/performance.md). uvicorn picks uvloop by
itself when it is installed (``loop="auto"``); `install` does the same for the worker and the
benchmarks, which run the worker's pipeline in-process.
"""

from __future__ import annotations

import asyncio


def install() -> str:
    """Make new event loops uvloop's when it is available; the name of the loop in use."""
    try:
        import uvloop
    except ImportError:  # e.g. Windows: asyncio's own loop
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
