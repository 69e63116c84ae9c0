"""The alert engine's timers: typed (a kind and what it is for), due in time order, cancellable, replaced when set again."""

from __future__ import annotations

import datetime as dt
import heapq
from enum import IntEnum
from typing import NamedTuple


class TimerKind(IntEnum):
    """What comes due; the value orders timers due at the same instant (a silence ends before one starts...)."""

    SILENCE_END = 0
    SILENCE_START = 1
    CLEAR = 2
    PENDING = 3
    ABSENCE = 4
    ESCALATE = 5
    REPEAT = 6


class Timer(NamedTuple):
    """One timer: its kind, the series key, silence id or alert fingerprint it is for, and (escalations) the rule."""

    kind: TimerKind
    key: str
    rule: str = ""

    @property
    def tiebreak(self) -> str:
        """Orders timers of one kind due at the same instant (as their joined keys always have)."""
        return f"{self.key}|{self.rule}" if self.rule else self.key


class TimerWheel:
    """Timers in deadline order. Setting a timer again replaces it; a cancelled or replaced one never comes due."""

    __slots__ = ("_heap", "_next", "_tokens")

    def __init__(self) -> None:
        self._heap: list[tuple[dt.datetime, int, str, int, Timer]] = []
        self._tokens: dict[Timer, int] = {}
        self._next = 0

    def schedule(self, timer: Timer, at: dt.datetime) -> None:
        self._next += 1
        self._tokens[timer] = self._next
        heapq.heappush(self._heap, (at, timer.kind.value, timer.tiebreak, self._next, timer))

    def cancel(self, timer: Timer) -> None:
        self._tokens.pop(timer, None)

    def __contains__(self, timer: object) -> bool:
        return timer in self._tokens

    def pop_due(self, until: dt.datetime, *, inclusive: bool = True) -> tuple[dt.datetime, Timer] | None:
        """The next timer due by ``until`` (at ``until`` too when ``inclusive``), taken off the wheel; None if none is."""
        while self._heap:
            at, _, _, token, timer = self._heap[0]
            if at > until or (at == until and not inclusive):
                return None
            heapq.heappop(self._heap)
            if self._tokens.get(timer) != token:
                continue  # cancelled, or set again for another time
            del self._tokens[timer]
            return at, timer
        return None
