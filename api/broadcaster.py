"""The one WebSocket fan-out: serialise once, bounded coalescing queues, history for resume, heartbeat.

Publishing never awaits a client. Each connection has a :class:`Subscriber`; a frame goes straight
to the connection's socket (the same ``str`` object for every client, written without a task
switch) while the client keeps up. Only while a send cannot finish (the client is not reading) do
frames wait, in an ordered map: a KPI update whose key is still pending replaces the older one
and moves to the back (newest value per KPI wins, and a client still receives a channel's ``seq``
in increasing order). A client that has more than ``max_queue`` messages pending, or has not
taken anything for ``max_lag_s`` while messages wait, is closed with :data:`CLOSE_TOO_SLOW`; the
others never notice. One heartbeat task pings every subscriber with one frame.

Channel ``seq`` values start at the process's start time in microseconds, not at 1, so that a
``resume`` position issued by another API replica or an earlier process almost never falls
inside this process's history: it is then answered with a fresh snapshot (``recovered: false``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from prometheus_client import Counter

from ioc.metrics import ApiMetrics

log = logging.getLogger(__name__)

#: WebSocket close code for a client that fell too far behind (4000–4999 are application codes).
CLOSE_TOO_SLOW: Final = 4008


@dataclass(frozen=True, slots=True)
class Published:
    """One message of a channel, serialised once for every subscriber."""

    seq: int
    #: Coalescing key (``kpi|scope|window``), or None for messages that must all be delivered.
    key: str | None
    #: What per-client filters look at (for example ``kpi`` and ``scope``, or an alert's fields).
    attrs: Mapping[str, Any]
    text: str


#: A per-subscription predicate: which of a channel's messages this client may receive.
ItemFilter = Callable[[Published], bool]


def dumps(message: Mapping[str, Any]) -> str:
    """A JSON text frame (orjson: datetimes as ISO 8601 with their offset)."""
    return orjson.dumps(message).decode()


_TYPE_PREFIX: Final = '{"type":"'


def frame_type(text: str) -> str:
    """The ``type`` of a frame, read off its start: every frame is a dict with ``type`` first."""
    if text.startswith(_TYPE_PREFIX):
        end = text.find('"', len(_TYPE_PREFIX))
        if end > 0:
            return text[len(_TYPE_PREFIX) : end]
    return "other"


#: Pending frames a client may have before it is cut off. Keyed KPI frames coalesce, so this is
#: about the number of distinct series a client follows: an operator wall on every commune
#: channel follows ~8,000, and the first publication after a worker (re)start touches them all.
DEFAULT_MAX_QUEUE = 20_000


#: What a connection gives its subscriber to write a frame straight to the socket: True when it took the
#: frame (sent, or now being sent), False while an earlier send is still in progress.
Sink = Callable[[str], bool]


class Subscriber:
    """The send path of one connection: straight to the socket while it keeps up, else a bounded coalescing queue.

    With a :data:`Sink` attached, :meth:`offer` hands a frame to it at once (no task switch, the
    same ``str`` for every client); only while the sink is busy (a send that could not finish, the
    client is not reading) are frames queued here, for the connection to :meth:`drain`. Never awaited
    by the publisher.
    """

    __slots__ = (
        "_behind_since",
        "_clock",
        "_coalesced_total",
        "_pending",
        "_unique",
        "closed",
        "coalesced",
        "filters",
        "max_lag_s",
        "max_queue",
        "on_close",
        "on_ping",
        "sink",
    )

    def __init__(
        self,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_lag_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        coalesced_total: Counter | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._coalesced_total = coalesced_total
        # created on the first frame that has to wait: most clients keep up and never need one
        self._pending: OrderedDict[Hashable, str] | None = None
        self._unique = 0
        self._behind_since: float | None = None
        self.filters: dict[str, ItemFilter | None] = {}
        #: Why the broadcaster closed this subscriber (None while open).
        self.closed: str | None = None
        self.coalesced = 0
        #: Writes a frame to the client now (see :data:`Sink`); None: every frame waits for :meth:`drain`.
        self.sink: Sink | None = None
        #: Called once, with the reason, when the broadcaster gives up on this subscriber.
        self.on_close: Callable[[str], None] | None = None
        #: Asked before each heartbeat ping whether to send it (False: the connection is ending).
        self.on_ping: Callable[[dt.datetime], bool] | None = None

    def __len__(self) -> int:
        return len(self._pending) if self._pending else 0

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self.filters)

    def offer(self, text: str, *, channel: str | None = None, key: str | None = None) -> bool:
        """Send or queue a frame, replacing a queued one of the same channel and key; False once closed."""
        if self.closed is not None:
            return False
        pending = self._pending
        if not pending and self.sink is not None and self.sink(text):
            return True
        now = self._clock()
        if pending is None:
            pending = self._pending = OrderedDict()
        if not pending:
            self._behind_since = now
        elif self._behind_since is not None and now - self._behind_since > self.max_lag_s:
            self.close(f"no progress for {self.max_lag_s:g} s")
            return False
        slot: Hashable
        if key is not None:
            slot = (channel, key)
            if pending.pop(slot, None) is not None:
                self.coalesced += 1
                if self._coalesced_total is not None:
                    self._coalesced_total.inc()
        else:
            slot = self._unique = self._unique + 1
        pending[slot] = text
        if len(pending) > self.max_queue:
            self.close(f"more than {self.max_queue} messages behind")
            return False
        return True

    def drain(self) -> list[str]:
        """Take every queued frame, oldest first (the connection calls this once its sink is free again)."""
        if not self._pending:
            return []
        frames = list(self._pending.values())
        self._pending = None
        self._behind_since = None
        return frames

    def close(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
            self._pending = None
            if self.on_close is not None:
                self.on_close(reason)


@dataclass(slots=True)
class Channel:
    name: str
    seq: int
    history: deque[Published]
    subscribers: set[Subscriber] = field(default_factory=set)


class Broadcaster:
    """Channels with a ``seq``, a bounded history, and subscribers; one instance per API process."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_lag_s: float = 30.0,
        seq_origin: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        metrics: ApiMetrics | None = None,
    ) -> None:
        self.history_size = history_size
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_lag_s = max_lag_s
        self.seq_origin = int(time.time() * 1_000_000) if seq_origin is None else seq_origin
        self._clock = clock
        self._channels: dict[str, Channel] = {}
        self._subscribers: set[Subscriber] = set()
        self.disconnected_slow = 0
        self._heartbeat: asyncio.Task[None] | None = None

    # -- channels -----------------------------------------------------------------------------

    def channel(self, name: str) -> Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = Channel(name, self.seq_origin, deque(maxlen=self.history_size))
        return ch

    def seq(self, name: str) -> int:
        return self.channel(name).seq

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(
        self,
        channel: str,
        item: Any,
        *,
        kind: str = "update",
        key: str | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> int:
        """Serialise ``{"type": kind, "channel", "item", "seq"}`` once; queue it for each client."""
        ch = self.channel(channel)
        ch.seq += 1
        text = dumps({"type": kind, "channel": channel, "item": item, "seq": ch.seq})
        message = Published(ch.seq, key, attrs or {}, text)
        ch.history.append(message)
        for sub in tuple(ch.subscribers):
            accept = sub.filters.get(channel)
            if accept is not None and not accept(message):
                continue
            if not sub.offer(text, channel=channel, key=key):
                self._drop_closed(sub)
        return ch.seq

    # -- subscribers --------------------------------------------------------------------------

    def connect(self) -> Subscriber:
        sub = Subscriber(
            max_queue=self.max_queue,
            max_lag_s=self.max_lag_s,
            clock=self._clock,
            coalesced_total=self.metrics.ws_coalesced if self.metrics else None,
        )
        self._subscribers.add(sub)
        return sub

    def disconnect(self, sub: Subscriber) -> None:
        """Forget ``sub``; one that was closed for falling behind is counted and logged once."""
        if sub in self._subscribers and sub.closed is not None:
            self.disconnected_slow += 1
            if self.metrics is not None:
                self.metrics.ws_disconnected_slow.inc()
            log.warning("websocket client disconnected: %s", sub.closed)
        for name in sub.filters:
            self._leave(sub, name)
        sub.filters.clear()
        self._subscribers.discard(sub)
        if not self._subscribers and self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None

    # -- heartbeat ----------------------------------------------------------------------------

    def ping(self, now: dt.datetime) -> int:
        """Offer one ``ping`` frame, serialised once, to every subscriber whose ``on_ping`` agrees.

        Returns how many were pinged.
        """
        frame = dumps({"type": "ping", "ts": now.isoformat()})
        pinged = 0
        for sub in tuple(self._subscribers):
            if sub.on_ping is not None and not sub.on_ping(now):
                continue
            if sub.offer(frame):
                pinged += 1
            else:
                self._drop_closed(sub)
        return pinged

    def start_heartbeat(self, interval_s: float) -> None:
        """Ping every subscriber every ``interval_s`` from one task (not one per connection).

        Idempotent; the task ends when the last subscriber leaves and starts again with the next.
        """
        task = self._heartbeat
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            return
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(interval_s), name="ws-heartbeat")

    async def _beat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.ping(dt.datetime.now(dt.UTC))

    def _leave(self, sub: Subscriber, name: str) -> None:
        ch = self._channels.get(name)
        if ch is None:
            return
        ch.subscribers.discard(sub)
        if not ch.subscribers and not ch.history:
            # nothing was ever published on it (clients can name any agency): forget it, or subscriptions
            # to made-up names would grow the map for ever; its seq was still the origin, as it will be again
            del self._channels[name]

    def _drop_closed(self, sub: Subscriber) -> None:
        if sub in self._subscribers:
            self.disconnect(sub)

    def subscribe(
        self,
        sub: Subscriber,
        channel: str,
        snapshot: Callable[[], list[Any]],
        *,
        accept: ItemFilter | None = None,
        resume_from: int | None = None,
    ) -> str:
        """Join ``channel``: replay from ``resume_from`` when history allows, else a snapshot.

        Returns ``"replayed"``, ``"snapshot"`` or ``"not_recovered"``. Runs without awaiting, so
        no update can slip between the snapshot (or replay) and the live stream.
        """
        ch = self.channel(channel)
        sub.filters[channel] = accept
        ch.subscribers.add(sub)
        if resume_from is not None and self._can_replay(ch, resume_from):
            missed = [m for m in ch.history if m.seq > resume_from and (accept is None or accept(m))]
            sub.offer(
                dumps(
                    {
                        "type": "resumed",
                        "channel": channel,
                        "seq": ch.seq,
                        "from": resume_from,
                        "recovered": True,
                        "replayed": len(missed),
                    }
                )
            )
            for m in missed:
                sub.offer(m.text, channel=channel, key=m.key)
            outcome = "replayed"
        else:
            message: dict[str, Any] = {
                "type": "snapshot",
                "channel": channel,
                "items": snapshot(),
                "seq": ch.seq,
            }
            if resume_from is not None:
                message["recovered"] = False
            sub.offer(dumps(message))
            outcome = "snapshot" if resume_from is None else "not_recovered"
        if sub.closed is not None:
            self._drop_closed(sub)
        return outcome

    @staticmethod
    def _can_replay(ch: Channel, resume_from: int) -> bool:
        if resume_from == ch.seq:
            return True
        if resume_from > ch.seq or not ch.history:
            return False
        return ch.history[0].seq <= resume_from + 1

    def unsubscribe(self, sub: Subscriber, channel: str) -> None:
        sub.filters.pop(channel, None)
        self._leave(sub, channel)

    @property
    def channel_count(self) -> int:
        """Channels held: those published on, and those someone is subscribed to."""
        return len(self._channels)

    def history(self, channel: str) -> list[Published]:
        ch = self._channels.get(channel)
        return list(ch.history) if ch else []
