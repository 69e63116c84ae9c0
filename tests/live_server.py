"""The API under uvicorn on a real socket, in a thread of the test process, configured as ``ioc api`` runs it.

In-process (not ``ioc api`` as a subprocess) so a test can fix the WebSocket limits, seed the live state,
read the app's own metrics and see every error the server logs.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI

from api.app import server_options
from api.context import ApiContext
from api.ws.frames import WsLimits
from ioc.settings import Settings
from tests.conftest import TEST_SIGNING_KEY

T = TypeVar("T")


def offline_settings(**fields: Any) -> Settings:
    """Settings for an app built with ``connect=False``: nothing listens at the broker or database named."""
    defaults: dict[str, Any] = {
        "kafka_bootstrap": "127.0.0.1:1",
        "database_url": "postgresql://nobody@127.0.0.1:1/none",
        "signing_key": TEST_SIGNING_KEY,
        "topic_prefix": "offline.",
    }
    return Settings(_env_file=None, **{**defaults, **fields})  # type: ignore[call-arg]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ErrorLog(logging.Handler):
    """Keeps what the server logs at ERROR or above (uvicorn logs an exception escaping the app so)."""

    SOURCES = ("uvicorn", "api", "asyncio", "starlette", "fastapi")
    #: What uvicorn logs at ERROR about a client rather than the app: a text frame that is not UTF-8 (it
    #: then closes the connection with 1007, as RFC 6455 says).
    CLIENT_FAULTS = ("Invalid UTF-8 sequence received from client.",)

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in self.SOURCES and record.getMessage() not in self.CLIENT_FAULTS:
            self.records.append(self.format(record))

    def lines(self) -> list[str]:
        return list(self.records)


class LiveServer:
    """``with LiveServer(app, settings, limits) as server:`` serves ``app`` on ``server.port`` until the end."""

    def __init__(self, app: FastAPI, settings: Settings, limits: WsLimits | None = None) -> None:
        self.app = app
        self.port = free_port()
        options = {**server_options(settings, limits or WsLimits()), "host": "127.0.0.1", "port": self.port}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, name="live-api", daemon=True)
        self.errors = ErrorLog()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def ctx(self) -> ApiContext:
        context: ApiContext = self.app.state.ioc
        return context

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.server.servers[0].get_loop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the server's event loop (the live state is not thread-safe) and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def __enter__(self) -> LiveServer:
        logging.getLogger().addHandler(self.errors)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                logging.getLogger().removeHandler(self.errors)
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        logging.getLogger().removeHandler(self.errors)
