"""The benchmark's bare WebSocket client: frames are found and timed however the bytes arrive (whole,
several per read, split anywhere, with the handshake), and pings are answered."""

from __future__ import annotations

import asyncio

import pytest

from bench import clients, floor


class RecordingTransport:
    """Stands in for an event loop transport: records what the client writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _ping(payload: bytes) -> bytes:
    return bytes((0x89, len(payload))) + payload


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 200, 4096])
def test_probes_are_timed_and_pings_answered_however_the_bytes_are_cut(chunk: int) -> None:
    big = floor.text_frame({"type": "update", "channel": "kpi:province", "item": {"kpi": "x", "pad": "y" * 70_000}})
    stream = (
        floor.RESPONSE
        + floor.SNAPSHOT
        + floor.probe_frame(1, 1000.0)
        + _ping(b"hi")
        + big  # a 64-bit length, larger than the shared read buffer
        + floor.probe_frame(2, 1000.5)
    )

    async def run() -> tuple[clients.WallClient, RecordingTransport]:
        client = clients.WallClient(b"GET / HTTP/1.1\r\n\r\n", [])
        transport = RecordingTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        for at in range(0, len(stream), chunk):
            data = stream[at : at + chunk]
            view = client.get_buffer(len(data))
            while data:  # as the event loop reads: at most the buffer's size at a time
                n = min(len(data), len(view))
                view[:n] = data[:n]
                client.buffer_updated(n)
                data = data[n:]
        return client, transport

    client, transport = asyncio.run(run())
    assert client.subscribed.done() and client.subscribed.exception() is None
    assert len(client.delays) == 2
    assert client.buffer == b""
    opcodes = [w[0] & 0x0F for w in transport.written[1:]]  # after the upgrade request
    assert opcodes == [0x1, 0xA]  # the subscription, then the pong
