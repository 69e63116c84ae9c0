"""A stand-in for the part of a Starlette WebSocket that `api.ws.Connection` uses (unit tests only)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.websockets import WebSocketState


class FakeSocket:
    """Keeps the very texts it is sent; ``stuck`` never finishes a send."""

    def __init__(self, *, stuck: bool = False) -> None:
        self.texts: list[str] = []
        self.gate = asyncio.Event()
        if not stuck:
            self.gate.set()
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.application_state = WebSocketState.CONNECTED
        self.client_state = WebSocketState.CONNECTED
        self.close_code: int | None = None

    async def send_text(self, text: str) -> None:
        await self.gate.wait()
        self.texts.append(text)

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.close_code = code
        self.application_state = WebSocketState.DISCONNECTED

    @property
    def sent(self) -> list[dict[str, Any]]:
        """The messages sent, decoded."""
        return [json.loads(t) for t in self.texts]

    def of_type(self, kind: str) -> list[str]:
        return [t for t in self.texts if json.loads(t)["type"] == kind]
