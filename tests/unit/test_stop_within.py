"""Stopping a Kafka client is bounded: a client whose ``stop`` never returns (aiokafka's producer with
the broker down) is left behind with a warning, and the process goes on stopping."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ioc.produce import stop_within


class StuckClient:
    """Stands in for an aiokafka client whose ``stop`` waits for ever (aiokafka #1101: the broker down)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def stop(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class PromptClient:
    def __init__(self) -> None:
        self.stopped = False

    async def stop(self) -> None:
        await asyncio.sleep(0)
        self.stopped = True


def test_a_client_that_never_stops_is_left_behind_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    client = StuckClient()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ioc.produce"):
        stopped = asyncio.run(stop_within(client, "a stuck producer", timeout_s=0.2))
    assert stopped is False and client.cancelled
    assert 0.2 <= time.monotonic() - started < 5
    assert "a stuck producer did not stop within 0.2 s" in caplog.text


def test_a_client_that_stops_is_stopped_and_nothing_is_said(caplog: pytest.LogCaptureFixture) -> None:
    client = PromptClient()
    with caplog.at_level(logging.WARNING, logger="ioc.produce"):
        assert asyncio.run(stop_within(client, "a producer", timeout_s=5)) is True
    assert client.stopped and caplog.text == ""


def test_an_error_while_stopping_is_the_caller_s_to_handle() -> None:
    class Failing:
        async def stop(self) -> None:
            raise RuntimeError("connection reset")

    with pytest.raises(RuntimeError, match="connection reset"):
        asyncio.run(stop_within(Failing(), "a producer", timeout_s=5))
