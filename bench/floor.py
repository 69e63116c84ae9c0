"""The fan-out floor (`python -m bench.floor THREADS`): the least any server can do for the same clients.

A bare WebSocket server on this machine's event loop: it answers a client's upgrade request with
``101`` and a snapshot frame at once, and ignores everything a client sends after that (its
subscription, pongs). Prints ``{"port": p}`` once listening. For every line read on stdin it
fans one ``bench.probe`` update out to every connection, carrying its send time as the API's does
(so the same clients, :mod:`bench.clients`, time it the same way), and prints
``{"clients": n, "send_ms": t, "cpu_s": c}`` (the fan-out's CPU time, every thread's: finer than
``/proc``'s 10 ms ticks, which a fan-out to a few clients does not reach). With ``THREADS`` 1 the
frame goes through each transport's ``write``, as the API's lean protocol writes it; with more, ``THREADS`` threads call ``os.write`` on
the sockets' descriptors (the call releases the GIL, so the kernel's work spreads over the cores;
the event loop waits meanwhile, and anything a socket did not take goes through its transport).

No authentication, no channels, no filters, no queues, no metrics: whatever the API's delivery
takes beyond this floor is the API's own; this floor is the kernel's and the clients' share on
this machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any

import orjson
from websockets.frames import Frame, Opcode

from bench.clients import PROBE_KPI, raise_fd_limit
from ioc.loop import install

RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Protocol: bearer\r\n\r\n"
)


def text_frame(message: dict[str, Any]) -> bytes:
    return Frame(Opcode.TEXT, orjson.dumps(message)).serialize(mask=False)


def probe_frame(seq: int, sent: float) -> bytes:
    """A KPI update shaped like the API's (same fields, about the same size), its value the send time."""
    item = {
        "kpi": PROBE_KPI,
        "scope": "province",
        "window": "1h",
        "value": sent,
        "unit": "s",
        "numerator": None,
        "denominator": None,
        "target": None,
        "status": None,
        "as_of": "2026-11-22T00:00:00+00:00",
        "seq": seq,
        "extra": None,
    }
    return text_frame({"type": "update", "channel": "kpi:province", "item": item, "seq": seq})


SNAPSHOT = text_frame({"type": "snapshot", "channel": "kpi:province", "items": [], "seq": 0})


#: The connections that have had their handshake (one server per process).
OPEN: set[BareServer] = set()


class BareServer(asyncio.Protocol):
    """One connection: handshake answered with the snapshot; everything after that is read and dropped."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.fd = -1
        self.head: bytes | None = b""  # the upgrade request so far; None once answered

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.head = None
            self.transport.write(RESPONSE + SNAPSHOT)
            OPEN.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        OPEN.discard(self)


def _write_all(fds: list[int], data: bytes, taken: list[int], at: int) -> None:
    """``os.write`` ``data`` to each descriptor; ``taken[at + i]``: bytes the i-th took (-1: an error)."""
    write = os.write
    for i, fd in enumerate(fds):
        try:
            taken[at + i] = write(fd, data)
        except BlockingIOError:
            taken[at + i] = 0
        except OSError:
            taken[at + i] = -1


def fan_out(conns: list[BareServer], data: bytes, threads: int) -> None:
    if threads <= 1:
        for c in conns:
            c.transport.write(data)
        return
    fds = [c.fd for c in conns]
    taken = [0] * len(fds)
    share = -(-len(fds) // threads)
    workers = [
        threading.Thread(target=_write_all, args=(fds[i : i + share], data, taken, i))
        for i in range(share, len(fds), share)
    ]
    for w in workers:
        w.start()
    _write_all(fds[:share], data, taken, 0)
    for w in workers:
        w.join()
    for c, n in zip(conns, taken, strict=True):
        if 0 <= n < len(data):
            c.transport.write(data[n:])  # the socket's buffer was full: the rest as the API would send it


async def main(threads: int) -> None:
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareServer, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(orjson.dumps({"port": port}).decode(), flush=True)
    seq = 0
    while await loop.run_in_executor(None, sys.stdin.readline):
        seq += 1
        conns = list(OPEN)
        started, cpu = time.perf_counter(), time.process_time()
        fan_out(conns, probe_frame(seq, time.time()), threads)
        sent_ms, cpu_s = (time.perf_counter() - started) * 1000, time.process_time() - cpu
        print(orjson.dumps({"clients": len(conns), "send_ms": round(sent_ms, 2), "cpu_s": cpu_s}).decode(), flush=True)
    server.close()


if __name__ == "__main__":
    install()
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
