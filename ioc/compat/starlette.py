"""Starlette internals: a ``WebSocket.send_text`` coroutine driven by hand, finished by a task only if it must.

The live feed sends the same frame to thousands of clients; a task (or even an ``await``) per
client and frame is a measurable share of a fan-out. :func:`send_text_now` starts Starlette's
``send_text`` coroutine with ``coro.send(None)``: when the server takes the frame at once, the
coroutine ends in that one step, and no task exists. Only when it has to wait (the client is not
reading) is the rest handed back as an awaitable (:class:`Resume`) for a task to finish.

Assumed of Starlette: ``WebSocket.send_text`` is a coroutine function whose only suspension points
are the ASGI ``send`` it awaits, so a send whose transport takes the frame completes in one step.
`problems()` checks this against the installed version; `SUPPORTED` is the range it was checked
against (pyproject.toml pins the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Coroutine, Generator
from typing import Any, Final

from starlette.websockets import WebSocket, WebSocketState

SUPPORTED: Final = (">=0.40", "<2")


class Resume:
    """Await the rest of a coroutine that was started by hand and stopped at ``waiting``.

    ``waiting`` is what the coroutine yielded (a future it waits on, or None for a bare yield);
    yielding it again from a task makes the task wait exactly as if it had run the coroutine from
    the start, so a send that could not finish at once is finished by a task, without sending twice.
    """

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        waiting = self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:  # the task was cancelled: let the coroutine see it
                try:
                    waiting = self.coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = self.coro.send(None)
            except StopIteration:
                return


def send_text_now(ws: WebSocket, text: str) -> Resume | None:
    """Send ``text``: None when it went out at once, else what a task must await to finish it.

    Raises what the send raises (the client is gone)."""
    send = ws.send_text(text)
    try:
        waiting = send.send(None)
    except StopIteration:
        return None
    return Resume(send, waiting)


def problems() -> list[str]:
    """Each assumption of this module the installed Starlette breaks, in words (empty: all hold)."""
    if not inspect.iscoroutinefunction(WebSocket.send_text):
        return ["starlette's WebSocket.send_text is no longer a coroutine function: send_text_now drives one"]
    sent: list[Any] = []

    async def receive() -> Any:  # pragma: no cover (never called: nothing is received)
        raise AssertionError

    async def send(message: Any) -> None:
        sent.append(message)

    ws = WebSocket({"type": "websocket", "path": "/ws", "headers": []}, receive=receive, send=send)
    ws.application_state = WebSocketState.CONNECTED
    try:
        rest = send_text_now(ws, "probe")
    except Exception as exc:
        return [f"starlette's send_text failed when driven by hand: {exc!r}"]
    if rest is not None:
        rest.coro.close()
        return ["starlette's send_text suspends although its ASGI send did not: every frame would need a task"]
    if sent != [{"type": "websocket.send", "text": "probe"}]:
        return [f"starlette's send_text sent {sent!r}, not one websocket.send message with the text"]
    return []
