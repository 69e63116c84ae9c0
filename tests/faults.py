"""Fault injection for the reliability tests: a TCP proxy the test controls.

Components are pointed at the proxy instead of the real server (PostgreSQL, or a Kafka broker
that advertises the proxy's address). The test can then cut the link (every open connection is
reset and new ones are refused, as when a server or the network goes away), restore it on the
same port, or add latency to every chunk of data in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")
CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``target``; runs its own event loop in a daemon thread.

    >>> with TcpProxy(("127.0.0.1", 5432)) as proxy:
    ...     proxy.cut(); proxy.restore(); proxy.slow(0.05)
    """

    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.delay_s = 0.0
        #: Connections accepted, and connections reset by `cut`, over the proxy's life.
        self.accepted = 0
        self.reset = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    # --- control (from the test's thread) ---------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._call(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until `restore`."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again, on the same port, without latency."""
        self.delay_s = 0.0
        self._call(self._listen())

    def slow(self, delay_s: float) -> None:
        """Hold every chunk of data ``delay_s`` before passing it on (both directions)."""
        self.delay_s = delay_s

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # --- the proxy (on its own loop) --------------------------------------------------------

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()  # an RST, as from a dead peer
            self.reset += 1
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        try:
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._links.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(CHUNK):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
        # One side is done: end the other so neither waits forever.
        writer.transport.abort()
