"""uvicorn internals: its sans-I/O WebSocket protocol, trimmed for thousands of mostly idle live-feed connections.

Assumed of uvicorn (a private class, `WebSocketsSansIOProtocol`) and of websockets (its sans-I/O
`ServerProtocol`, which it wraps): the attributes the base class sets (listed as slots below), the
methods overridden here, and that writing a data frame to the transport behind the websockets
protocol object leaves that object's state right (it keeps none for outgoing unfragmented frames).
`problems()` checks what can be checked; `SUPPORTED` is the range it was checked against.

Measured with ``ioc bench --only fanout`` and tracemalloc (docs/performance.md): per connection,
uvicorn keeps the handshake request and response (every header, twice) for the connection's
whole life, and an ``asyncio.Queue`` (four deques, ~2.4 KiB) for messages from a client that, on
the live feed, sends almost nothing. This subclass forgets the handshake once it is done (and empties the request's headers, which
the ``websockets`` parser keeps referenced for the connection's life) and
queues incoming messages in a deque that exists only while messages wait. A text frame is
encoded and framed once for all the clients it goes to (:class:`FrameCache`), and written by
:meth:`LeanWebSocketProtocol.write_text`, a plain call (no coroutine per client and frame; the
app finds it through the scope extension :data:`LEAN_SOCKET`). Reads go into one buffer shared
by the process's connections (``asyncio.BufferedProtocol``): a plain protocol has asyncio allocate
256 KiB per read. A :class:`DirectWebSocketRoute` is served straight from the protocol, without
the app's middleware and router, whose suspended frames (FastAPI's and Starlette's wrappers,
exit stacks) would otherwise be held for every connection's life. Everything else (handshake,
receiving, pings, closing, back-pressure) is uvicorn's.

The middleware rule: a route is served without the app's middleware only when it is declared a
:class:`DirectWebSocketRoute`, and only under this protocol (other servers and the test client go
through the app as usual). `api.app.MIDDLEWARE_NOT_FOR_DIRECT_ROUTES` says why each middleware of
the app is not needed there; tests/unit/test_compat.py fails when a middleware is added without a reason.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State

#: The versions this module was checked against (pyproject.toml pins the same ranges).
SUPPORTED: Final = {"uvicorn": (">=0.54", "<0.55"), "websockets": (">=13", "<18")}

#: The scope extension under which a connection served by :class:`LeanWebSocketProtocol` is
#: found by the app, for :meth:`LeanWebSocketProtocol.write_text`.
LEAN_SOCKET: Final = "ioc.lean_socket"

#: Where every connection of the process reads into (one event loop: one read at a time).
_READ_BUFFER: Final = memoryview(bytearray(64 * 1024))


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


class WriteGate:
    """What uvicorn's protocol uses of ``asyncio.Event`` for back-pressure, lighter (no deque per connection)."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        while not self._open:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True


class DirectWebSocketRoute(WebSocketRoute):
    """A WebSocket route (``endpoint(websocket)``, no path parameters) that :class:`LeanWebSocketProtocol`
    runs directly, without the app's middleware and router in between (other servers, and the test
    client, go through the app as usual). Only for an endpoint that needs none of them: it is given
    ``scope["app"]``, nothing else the router or a middleware would add.
    """

    def __init__(self, path: str, endpoint: Callable[[WebSocket], Awaitable[None]], *, name: str | None = None) -> None:
        super().__init__(path, endpoint, name=name)
        if self.param_convertors:
            raise ValueError("a direct WebSocket route has no path parameters")
        self.direct = _DirectApp(endpoint)


class _DirectApp:
    __slots__ = ("app", "endpoint")

    def __init__(self, endpoint: Callable[[WebSocket], Awaitable[None]]) -> None:
        self.app: Starlette | None = None
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app
        await self.endpoint(WebSocket(scope, receive=receive, send=send))


@functools.lru_cache(maxsize=16)
def direct_routes(app: ASGIApp) -> Mapping[str, ASGIApp]:
    """Path → ASGI app of the :class:`DirectWebSocketRoute` s of the Starlette app ``app`` is or wraps."""
    inner: Any = app
    while not isinstance(inner, Starlette):
        inner = getattr(inner, "app", None)  # uvicorn's and Starlette's middleware keep the next app there
        if inner is None:
            return {}
    routes: dict[str, ASGIApp] = {}
    for route in inner.router.routes:
        if isinstance(route, DirectWebSocketRoute):
            route.direct.app = inner
            routes.setdefault(route.path, route.direct)
    return routes


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


class LeanWebSocketProtocol(WebSocketsSansIOProtocol, asyncio.BufferedProtocol):
    """``ws="ioc.compat.uvicorn:LeanWebSocketProtocol"`` for uvicorn (see :func:`api.app.server_options`)."""

    # Every attribute uvicorn 0.54's protocol sets, as slots: its 37 attributes overflow the shared-key
    # instance dict (30 keys at most), which then becomes a 1.6 KiB table per connection. One it adds
    # in a later version simply lands in the instance dict again.
    __slots__ = (
        "app",
        "app_state",
        "asgi_version",
        "client",
        "close_sent",
        "close_timeout",
        "close_timer",
        "config",
        "conn",
        "connections",
        "curr_msg_data_type",
        "default_headers",
        "disconnected",
        "frames",
        "handshake_complete",
        "handshake_initiated",
        "initial_response",
        "last_ping_rtt",
        "logger",
        "loop",
        "pending_ping_payload",
        "ping_interval",
        "ping_sent_at",
        "ping_timeout",
        "ping_timer",
        "pong_timer",
        "queue",
        "read_paused",
        "request",
        "response",
        "root_path",
        "scheme",
        "scope",
        "server",
        "tasks",
        "transport",
        "writable",
    )

    #: Shared by the connections of a process (one event loop: no two sends interleave).
    frame_cache = FrameCache()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = ReceiveQueue()  # type: ignore[assignment]
        self.writable = WriteGate()  # type: ignore[assignment]

    # -- reading: into the shared buffer, then as uvicorn does ----------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_BUFFER[:nbytes]))

    def handle_connect(self, event: Request) -> None:
        if not self.root_path:
            direct = direct_routes(self.app).get(unquote(event.path.partition("?")[0]))
            if direct is not None:
                self.app = direct  # this connection's app: the route's endpoint, without the stack above it
        super().handle_connect(event)
        # the scope holds what the app needs of the request; uvicorn never reads it again, but the
        # websockets parser keeps the request object alive in its generator frame: empty its headers
        del self.request
        event.headers.clear()
        scope: Any = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][LEAN_SOCKET] = self

    # -- sending --------------------------------------------------------------------------------

    def write_text(self, text: str) -> bool:
        """Write a text frame now if the connection is open and not pushing back; False: use ``send``.

        What uvicorn's ``send`` and websockets' ``send_text`` would do, minus a coroutine per call,
        and the encoding and framing per client (:class:`FrameCache`).
        """
        if (
            self.handshake_complete
            and not self.close_sent
            and self.initial_response is None
            and not self.disconnected
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            and not self.conn.extensions
            and not self.conn.expect_continuation_frame
        ):
            self.transport.write(self.frame_cache.text_frame(text))
            return True
        return False

    async def send(self, message: Any) -> None:
        text = message.get("text") if message["type"] == "websocket.send" else None
        if text is not None and self.write_text(text):
            return
        accepting = message["type"] == "websocket.accept" and not self.handshake_complete
        await super().send(message)
        if accepting:
            # only the accept (or the refusal before it) reads the prepared response
            del self.response


def lean_socket(ws: WebSocket) -> LeanWebSocketProtocol | None:
    """The connection behind ``ws`` when :class:`LeanWebSocketProtocol` serves it."""
    scope = getattr(ws, "scope", None)
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    socket = extensions.get(LEAN_SOCKET) if isinstance(extensions, dict) else None
    return socket if isinstance(socket, LeanWebSocketProtocol) else None


#: What :meth:`LeanWebSocketProtocol.write_text` and ``handle_connect`` read of uvicorn's protocol.
_PROTOCOL_ATTRIBUTES: Final = (
    "handshake_complete",
    "close_sent",
    "initial_response",
    "disconnected",
    "writable",
    "conn",
    "transport",
    "queue",
    "request",
    "response",
    "scope",
    "root_path",
    "app",
)
#: What this module overrides of it, with the arguments it expects.
_OVERRIDDEN: Final = {"handle_connect": ("self", "event"), "send": ("self", "message"), "data_received": ("self", "data")}
#: What it reads of websockets' ``ServerProtocol``.
_CONNECTION_ATTRIBUTES: Final = ("state", "extensions", "expect_continuation_frame")


def problems() -> list[str]:
    """Each assumption of this module the installed uvicorn and websockets break, in words (empty: all hold)."""
    from websockets.server import ServerProtocol

    found: list[str] = []
    base = WebSocketsSansIOProtocol
    init_names = set(base.__init__.__code__.co_names)
    found += [
        f"uvicorn's WebSocketsSansIOProtocol.__init__ no longer sets {name}: LeanWebSocketProtocol reads it"
        for name in _PROTOCOL_ATTRIBUTES
        if name not in init_names and name not in {"request", "response", "scope"}
    ]
    # attributes set in __init__ but not listed as slots land in a per-connection dict again (memory, not correctness)
    unslotted = sorted(n for n in init_names - set(LeanWebSocketProtocol.__slots__) if _is_set_in_init(base, n))
    if unslotted:
        found.append(f"uvicorn's protocol sets attributes not in LeanWebSocketProtocol.__slots__: {unslotted}")
    for method, params in _OVERRIDDEN.items():
        impl = getattr(base, method, None)
        if impl is None:
            found.append(f"uvicorn's protocol has no {method}(): LeanWebSocketProtocol overrides it")
        elif tuple(inspect.signature(impl).parameters) != params:
            found.append(f"uvicorn's {method}{inspect.signature(impl)} is not {method}({', '.join(params)})")
    probe = ServerProtocol()
    found += [
        f"websockets' ServerProtocol has no {name}: write_text checks it before writing behind it"
        for name in _CONNECTION_ATTRIBUTES
        if not hasattr(probe, name)
    ]
    if tuple(inspect.signature(Frame.serialize).parameters)[:2] != ("self", "mask"):
        found.append("websockets' Frame.serialize no longer takes mask: FrameCache frames text with it")
    return found


def _is_set_in_init(cls: type, name: str) -> bool:
    """Whether ``cls.__init__`` assigns ``self.<name>`` (rather than only reading a global of that name)."""
    import ast
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(vars(cls)["__init__"])))
    return any(
        isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == name
        for node in ast.walk(tree)
    )
