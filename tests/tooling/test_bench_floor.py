"""The fan-out floor's bare server: every connection gets every byte of a frame, in order, whether a
socket takes it at once or its buffer is full (the rest then goes through the transport)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from bench import floor


class RecordingTransport:
    """Stands in for an event loop transport: records what is written through it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def _conn(sock: socket.socket) -> Any:
    c = floor.BareServer()
    c.transport = RecordingTransport()
    c.fd = sock.fileno()
    return c


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    got = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_connection_gets_the_whole_frame_with_the_rest_through_its_transport(threads: int) -> None:
    pairs = [socket.socketpair() for _ in range(7)]
    try:
        for server_side, _ in pairs:
            server_side.setblocking(False)
            server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = floor.probe_frame(1, 123.5) * 2000  # far more than a 4 KiB send buffer takes
        conns = [_conn(s) for s, _ in pairs]
        if threads == 1:  # through the transports only
            floor.fan_out(conns, data, threads)
            assert all(c.transport.written == [data] for c in conns)
            return
        floor.fan_out(conns, data, threads)
        for c, (_, client_side) in zip(conns, pairs, strict=True):
            direct = _drain(client_side)
            assert 0 < len(direct) < len(data)  # the socket took part of it
            assert direct + b"".join(c.transport.written) == data
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_a_closed_peer_is_left_to_its_transport_to_find_out() -> None:
    a, b = socket.socketpair()
    ok_a, ok_b = socket.socketpair()
    try:
        a.setblocking(False)
        b.close()
        conns = [_conn(a), _conn(ok_a)]
        data = floor.probe_frame(2, 1.0)
        floor.fan_out(conns, data, 2)
        assert conns[0].transport.written == []  # the write failed: nothing more is forced on it
        assert _drain(ok_b) == data and conns[1].transport.written == []
    finally:
        for s in (a, ok_a, ok_b):
            s.close()


def test_the_probe_frame_is_timed_by_the_benchmark_clients() -> None:
    from bench.clients import probe_timing

    frame = floor.probe_frame(3, 100.0)
    payload = frame[4:] if frame[1] == 126 else frame[2:]
    assert probe_timing(payload, 100.25) == (100.0, pytest.approx(250.0))
