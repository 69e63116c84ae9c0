"""Waiting on a condition instead of a fixed sleep: in-process (``until``) and across processes (``wait_for``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], *, timeout_s: float = 5.0, what: str = "the condition") -> None:
    """Give the event loop turns until ``condition()`` holds; fail after ``timeout_s`` saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        await asyncio.sleep(0.001)


def wait_for(condition: Callable[[], object], *, timeout_s: float = 30.0, every_s: float = 0.2, what: str = "the condition") -> None:
    """Poll ``condition()`` (another process's state) until it holds; fail after ``timeout_s`` saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(every_s)
