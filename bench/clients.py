"""Many WebSocket clients in one process (`python -m bench.clients URL TOKEN N`), for the fan-out run.

Connects ``N`` clients subscribed to ``kpi:province``, prints ``{"ready": n, "failed": f}`` on
stdout, then records, for every ``bench.probe`` update, the delay from the probe's send time
(its ``value``, wall-clock seconds) to its arrival. When stdin closes it prints the delays (ms), the send time of
the update each is of, and the CPU time the process used since all were connected.

The clients run on the same cores as the API, so what a client spends per frame is charged to
the delivery figure. By default each client is a bare :class:`WallClient` (an asyncio buffered
protocol, reading into one buffer shared by the process's clients and handling whole frames
straight from it, speaking just enough RFC 6455: the handshake a browser sends, with the token as
subprotocol and a permessage-deflate offer; masked frames out; pong to pings) that times a probe
when its bytes arrive, on uvloop where it is installed (as the API runs). Measured with the
fan-out floor (:mod:`bench.floor`): 19.6 µs of client CPU per delivery on asyncio's loop,
13.0 on uvloop with frames handled in place.
``IOC_BENCH_WS_CLIENT=websockets`` uses the ``websockets`` library's client instead, as earlier
runs did (about ten times the client CPU per frame).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import resource
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

PROBE_KPI = "bench.probe"
CONNECT_CONCURRENCY = 100
SUBSCRIBE = b'{"type":"subscribe","channels":["kpi:province"]}'
_PROBE = f'"{PROBE_KPI}"'.encode()
_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, unfragmented client frame (payloads under 126 bytes: all this client sends)."""
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


#: What a client records of a probe: its send time (s, which tells the updates apart) and its delay (ms).
Timing = tuple[float, float]


def probe_timing(payload: bytes, now: float) -> Timing | None:
    """Send time and delay of a ``bench.probe`` update frame (its value is its send time), else None."""
    if _PROBE not in payload:
        return None
    msg = orjson.loads(payload)
    item: Any = msg.get("item")
    if msg.get("type") == "update" and item and item.get("kpi") == PROBE_KPI:
        sent = float(item["value"])
        return sent, (now - sent) * 1000
    return None


#: Where every client of the process receives (one event loop: one read at a time). A plain
#: ``asyncio.Protocol`` has asyncio allocate a 256 KiB ``bytes`` per read (``sock.recv(256 KiB)``):
#: ~16 µs per read on this machine, most of a client's CPU per frame, which the delivery figure paid.
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class WallClient(asyncio.BufferedProtocol):
    """One subscribed client: handshake, subscribe, answer pings, time probe updates on arrival."""

    def __init__(self, request: bytes, delays: list[Timing]) -> None:
        self.request = request
        self.delays = delays
        self.buffer = bytearray()
        self.open = False
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport in effect (uvloop's do not derive from asyncio's classes)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(f"closed before the snapshot: {exc}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.buffer or not self.open:
            self.data_received(_READ_BUFFER[:nbytes])
            return
        # the usual case: whole frames straight from the shared buffer, no copy into our own
        used = self._frames(_READ_BUFFER, nbytes, time.time())
        if used < nbytes:
            self.buffer += _READ_BUFFER[used:nbytes]

    def data_received(self, data: bytes | memoryview) -> None:
        now = time.time()
        buf = self.buffer
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail(f"handshake refused: {bytes(buf[:end])!r}")
                return
            del buf[: end + 4]
            self.open = True
            self._send(_OP_TEXT, SUBSCRIBE)
        del buf[: self._frames(buf, len(buf), now)]

    def _frames(self, buf: bytearray | memoryview, end: int, now: float) -> int:
        """Handle every whole frame in ``buf[:end]``; how many bytes they took."""
        pos = 0
        while end - pos >= 2:
            opcode, size, start = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, pos + 2
            if size == 126:
                if end - pos < 4:
                    break
                size, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
            elif size == 127:
                if end - pos < 10:
                    break
                size, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if end < start + size:
                break
            self._frame(opcode, bytes(buf[start : start + size]), now)
            pos = start + size
        return pos

    def _frame(self, opcode: int, payload: bytes, now: float) -> None:
        if opcode == _OP_TEXT:
            if not self.subscribed.done():
                if payload.startswith(b'{"type":"snapshot"'):
                    self.subscribed.set_result(None)
                return
            timing = probe_timing(payload, now)
            if timing is not None:
                self.delays.append(timing)
        elif opcode == _OP_PING:
            self._send(_OP_PONG, payload)
        elif opcode == _OP_CLOSE:
            self._send(_OP_CLOSE, payload[:2])
            self._fail("closed by the server")

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    def _fail(self, why: str) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._send(_OP_CLOSE, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()


def handshake(url: str, token: str) -> tuple[str, int, bytes]:
    """Host, port and the upgrade request a browser sends (token as subprotocol, deflate offered)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: bearer, {token}\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nUser-Agent: ioc-bench\r\n\r\n"
    )
    return host, port, request.encode()


async def _wall_client(url: str, token: str, gate: asyncio.Semaphore, delays: list[Timing], ready: list[int]) -> None:
    host, port, request = handshake(url, token)
    loop = asyncio.get_running_loop()
    async with gate:
        _, client = await asyncio.wait_for(loop.create_connection(lambda: WallClient(request, delays), host, port), 60)
        await asyncio.wait_for(client.subscribed, 60)
    ready[0] += 1
    try:
        await asyncio.Event().wait()  # until cancelled; frames are handled by the protocol
    finally:
        client.close()


async def _websockets_client(
    url: str, token: str, gate: asyncio.Semaphore, delays: list[Timing], ready: list[int]
) -> None:
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
            timing = probe_timing(frame.encode() if isinstance(frame, str) else frame, now)
            if timing is not None:
                delays.append(timing)
    finally:
        await ws.close()


async def main(url: str, token: str, n: int) -> None:
    raise_fd_limit()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    delays: list[Timing] = []
    ready = [0]
    client = _websockets_client if os.environ.get("IOC_BENCH_WS_CLIENT") == "websockets" else _wall_client
    tasks = [asyncio.create_task(client(url, token, gate, delays, ready)) for _ in range(n)]
    while ready[0] + sum(t.done() for t in tasks) < n:
        await asyncio.sleep(0.1)
    failed = sum(1 for t in tasks if t.done() and t.exception() is not None)
    sys.stdout.write(orjson.dumps({"ready": ready[0], "failed": failed}).decode() + "\n")
    sys.stdout.flush()
    cpu_at_ready = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
    cpu_s = time.process_time() - cpu_at_ready
    out = {"delays_ms": [round(d, 3) for _, d in delays], "sent": [sent for sent, _ in delays], "cpu_s": cpu_s}
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    from ioc.loop import install

    install()
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
