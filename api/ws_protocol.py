"""uvicorn's sans-I/O WebSocket protocol, trimmed for thousands of mostly idle live-feed connections.

Measured with ``ioc bench --only fanout`` and tracemalloc (docs/performance.md): per connection,
uvicorn keeps the handshake request and response (every header, twice) for the connection's
whole life, and an ``asyncio.Queue`` (four deques, ~2.4 KiB) for messages from a client that, on
the live feed, sends almost nothing. This subclass forgets the handshake once it is done (and empties the request's headers, which
the ``websockets`` parser keeps referenced for the connection's life) and
queues incoming messages in a deque that exists only while messages wait. A text frame is
encoded and framed once for all the clients it goes to (:class:`FrameCache`). Everything else
(handshake, receiving, pings, closing, back-pressure) is uvicorn's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State


class ReceiveQueue:
    """What uvicorn's protocol uses of ``asyncio.Queue`` (``put_nowait``, ``get``, ``empty``), lighter."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item


class FrameCache:
    """The wire bytes of the last text frame sent, for the next connection sent the same ``str``.

    The broadcaster hands one ``str`` object to every subscriber in turn, so a one-entry cache
    keyed by identity turns "encode and frame per client" into once per message. Server frames
    are not masked, so the same bytes are right for every connection without an extension.
    """

    __slots__ = ("data", "text")

    def __init__(self) -> None:
        self.text: str | None = None
        self.data = b""

    def text_frame(self, text: str) -> bytes:
        if text is not self.text:
            self.data = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
            self.text = text
        return self.data


class LeanWebSocketProtocol(WebSocketsSansIOProtocol):
    """``ws="api.ws_protocol:LeanWebSocketProtocol"`` for uvicorn (see :func:`api.app.server_options`)."""

    #: Shared by the connections of a process (one event loop: no two sends interleave).
    frame_cache = FrameCache()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = ReceiveQueue()  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # the scope holds what the app needs of the request; uvicorn never reads it again, but the
        # websockets parser keeps the request object alive in its generator frame: empty its headers
        del self.request
        event.headers.clear()

    async def send(self, message: Any) -> None:
        text = message.get("text") if message["type"] == "websocket.send" else None
        if (
            text is not None
            and self.handshake_complete
            and not self.close_sent
            and self.initial_response is None
            and not self.disconnected
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.conn.extensions
            and not self.conn.expect_continuation_frame
        ):
            # what uvicorn's send and websockets' send_text would do, minus encoding and framing per client
            self.transport.write(self.frame_cache.text_frame(text))
            return
        accepting = message["type"] == "websocket.accept" and not self.handshake_complete
        await super().send(message)
        if accepting:
            # only the accept (or the refusal before it) reads the prepared response
            del self.response
