"""Alert notifications POSTed to webhooks: signed, retried with backoff, dead-lettered when they cannot go.

`WebhookDispatcher.submit` takes an `AlertEvent` and never blocks: each target has its own bounded
queue and its own delivery task, so a slow or dead receiver delays nobody else (and the events of
one target stay in order). Only events with ``notify=True`` that pass a target's filters are sent.

A delivery is ``POST <url>`` with the event's JSON (the ``ioc.alerts`` value) and

- ``X-IOC-Timestamp``: Unix seconds when this attempt was signed;
- ``X-IOC-Signature``: ``sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>``;
- ``X-IOC-Event-Id``: ``<alert_id>:<state>:<at>`` (with ``:<repeat>`` for a reminder), the same on
  every attempt, so a receiver can drop duplicates.

A 2xx answer delivers it. Timeouts, connection errors, 408, 425, 429 and 5xx are retried with
exponential backoff and jitter (``Retry-After`` honoured, capped) up to ``max_attempts``; other 4xx
answers are not retried. What is given up on, what does not fit a full queue, and what is still
queued when `stop` runs out of time goes to the ``on_dead_letter`` callback as a `WebhookFailure`
(the worker produces it to ``ioc.deadletter`` with stage ``webhook``): nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import httpx
import msgspec

from alerts.model import AlertEvent, Audience, Severity
from ioc.settings import AlertWebhook, Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-IOC-Signature"
TIMESTAMP_HEADER: Final = "X-IOC-Timestamp"
EVENT_ID_HEADER: Final = "X-IOC-Event-Id"
#: Answers worth another attempt besides 5xx: the receiver is busy or timed out, not refusing.
RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
DEADLETTER_STAGE: Final = "webhook"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-IOC-Signature`` value of ``body`` sent at ``timestamp`` (what a receiver recomputes)."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the one `sign` gives (constant-time); receivers should also bound the timestamp's age."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def event_id(event: AlertEvent) -> str:
    """The idempotency key of one notification: ``alert_id:state:at`` (``:repeat`` for a reminder)."""
    base = f"{event.alert_id}:{event.state.value}:{event.at.isoformat()}"
    return f"{base}:{event.repeat}" if event.repeat else base


@dataclass(frozen=True)
class WebhookTarget:
    """One receiver of notifications and the filters an event must pass to be sent to it."""

    name: str
    url: str = field(repr=False)
    secret: bytes = field(repr=False)
    domains: frozenset[str] = frozenset()
    min_severity: Severity | None = None
    audience: frozenset[Audience] = frozenset()
    communes: frozenset[str] = frozenset()

    @classmethod
    def from_setting(cls, hook: AlertWebhook) -> WebhookTarget:
        return cls(
            name=hook.label,
            url=hook.url,
            secret=hook.secret.get_secret_value().encode(),
            domains=frozenset(hook.domains),
            min_severity=Severity(hook.min_severity) if hook.min_severity else None,
            audience=frozenset(Audience(a) for a in hook.audience),
            communes=frozenset(hook.communes),
        )

    def accepts(self, event: AlertEvent) -> bool:
        """Whether ``event`` is for this target: it notifies and passes every filter that is set."""
        if not event.notify:
            return False
        if self.domains and event.domain not in self.domains:
            return False
        if self.min_severity is not None and event.severity.rank < self.min_severity.rank:
            return False
        if self.audience and not self.audience.intersection(event.audience):
            return False
        return not self.communes or event.commune_code in self.communes


def targets_from(settings: Settings) -> list[WebhookTarget]:
    """The targets of ``IOC_ALERT_WEBHOOKS``."""
    return [WebhookTarget.from_setting(h) for h in settings.alert_webhooks]


@dataclass(frozen=True)
class WebhookFailure:
    """A notification that could not be delivered: what, to whom, and why (for ``ioc.deadletter``)."""

    target: str
    event: AlertEvent
    body: bytes
    attempts: int
    reason: str

    @property
    def key(self) -> bytes:
        """The record key it would have had on ``ioc.alerts``: the alert's fingerprint."""
        return self.event.fingerprint.encode()

    @property
    def event_id(self) -> str:
        return event_id(self.event)


DeadLetter = Callable[[WebhookFailure], Awaitable[None] | None]


@dataclass
class _Lane:
    """One target's queue and delivery task."""

    target: WebhookTarget
    queue: asyncio.Queue[tuple[AlertEvent, bytes]]
    task: asyncio.Task[None] | None = None


class WebhookDispatcher:
    """Delivers alert notifications to every target that wants them; see the module docstring.

    Use from one event loop: ``await start()``, ``submit(event)`` as events come, ``await stop()``.
    """

    def __init__(
        self,
        targets: Iterable[WebhookTarget],
        *,
        on_dead_letter: DeadLetter | None = None,
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        queue_size: int = 1000,
        backoff_s: float = 0.5,
        backoff_max_s: float = 60.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1 or queue_size < 1:
            raise ValueError("max_attempts and queue_size must be at least 1")
        self.on_dead_letter = on_dead_letter
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.rng = rng or random.Random()
        self._client = client
        self._own_client = client is None
        self._lanes = [_Lane(t, asyncio.Queue(maxsize=queue_size)) for t in targets]
        self._callbacks: set[asyncio.Task[None]] = set()
        self._running = False
        #: delivered, retried (attempts after a failed one), dead_lettered, queue_full.
        self.counts: dict[str, int] = dict.fromkeys(("delivered", "retried", "dead_lettered", "queue_full"), 0)

    @classmethod
    def from_settings(cls, settings: Settings, on_dead_letter: DeadLetter | None = None) -> WebhookDispatcher:
        return cls(
            targets_from(settings),
            on_dead_letter=on_dead_letter,
            timeout_s=settings.alert_webhook_timeout_s,
            max_attempts=settings.alert_webhook_max_attempts,
            queue_size=settings.alert_webhook_queue,
        )

    @property
    def targets(self) -> list[WebhookTarget]:
        return [lane.target for lane in self._lanes]

    def pending(self) -> int:
        """Notifications queued, not counting those being delivered."""
        return sum(lane.queue.qsize() for lane in self._lanes)

    async def start(self) -> None:
        if self._running:
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False)
        self._running = True
        for lane in self._lanes:
            lane.task = asyncio.create_task(self._deliver_all(lane), name=f"ioc-webhook-{lane.target.name}")
        if self._lanes:
            log.info("webhook dispatcher started: %s", ", ".join(t.name for t in self.targets))

    def submit(self, event: AlertEvent) -> int:
        """Queue ``event`` for every target that accepts it; returns for how many. Never waits."""
        body: bytes | None = None
        queued = 0
        for lane in self._lanes:
            if not lane.target.accepts(event):
                continue
            body = body if body is not None else msgspec.json.encode(event)
            try:
                lane.queue.put_nowait((event, body))
            except asyncio.QueueFull:
                self.counts["queue_full"] += 1
                self._dead(WebhookFailure(lane.target.name, event, body, 0, "queue full (the receiver is too slow)"))
                continue
            queued += 1
        return queued

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Let the queues drain for up to ``drain_timeout_s``, then stop; what is left is dead-lettered."""
        if not self._running:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(lane.queue.join() for lane in self._lanes)), drain_timeout_s)
        self._running = False
        for lane in self._lanes:
            if lane.task is not None:
                lane.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
                lane.task = None
            while not lane.queue.empty():
                event, body = lane.queue.get_nowait()
                lane.queue.task_done()
                self._dead(WebhookFailure(lane.target.name, event, body, 0, "dispatcher stopped before delivery"))
        if self._callbacks:
            await asyncio.gather(*self._callbacks, return_exceptions=True)
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._lanes:
            log.info("webhook dispatcher stopped (%s)", self.counts)

    # --- delivery ---------------------------------------------------------------------------

    async def _deliver_all(self, lane: _Lane) -> None:
        while True:
            event, body = await lane.queue.get()
            try:
                await self._deliver(lane.target, event, body)
            except asyncio.CancelledError:
                self._dead(WebhookFailure(lane.target.name, event, body, 0, "dispatcher stopped during delivery"))
                raise
            except Exception as exc:  # a bug must not kill the lane
                log.exception("webhook %s: delivery failed unexpectedly", lane.target.name)
                self._dead(WebhookFailure(lane.target.name, event, body, 0, f"internal error: {exc!r}"))
            finally:
                lane.queue.task_done()

    async def _deliver(self, target: WebhookTarget, event: AlertEvent, body: bytes) -> None:
        assert self._client is not None
        eid = event_id(event)
        reason = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.counts["retried"] += 1
            timestamp = str(int(self.clock()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "ioc-nghean-alerts/1",
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(target.secret, timestamp, body),
                EVENT_ID_HEADER: eid,
            }
            retry_after: float | None = None
            try:
                response = await self._client.post(target.url, content=body, headers=headers, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}"  # the message may quote the URL, which may hold a token
            else:
                if response.is_success:
                    self.counts["delivered"] += 1
                    return
                reason = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code not in RETRYABLE_STATUS:
                    break  # refused: asking again will not help
                retry_after = _seconds(response.headers.get("Retry-After"))
            if attempt < self.max_attempts:
                delay = self._backoff(attempt) if retry_after is None else min(retry_after, self.backoff_max_s)
                log.debug("webhook %s: attempt %d for %s failed (%s); retrying in %.2f s",
                          target.name, attempt, eid, reason, delay)  # fmt: skip
                await asyncio.sleep(delay)
        log.warning("webhook %s: giving up on %s after %d attempt(s): %s", target.name, eid, attempt, reason)
        self._dead(WebhookFailure(target.name, event, body, attempt, reason))

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with "equal jitter": half the step fixed, half random."""
        step = min(self.backoff_max_s, self.backoff_s * 2.0 ** (attempt - 1))
        return step / 2 + self.rng.uniform(0, step / 2)

    def _dead(self, failure: WebhookFailure) -> None:
        self.counts["dead_lettered"] += 1
        if self.on_dead_letter is None:
            log.error("webhook %s: %s dropped (%s): no dead-letter handler", failure.target, failure.event_id,
                      failure.reason)  # fmt: skip
            return
        try:
            result = self.on_dead_letter(failure)
        except Exception:
            log.exception("webhook dead-letter handler failed for %s", failure.event_id)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(_guarded(result, failure))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)


async def _guarded(result: Awaitable[None], failure: WebhookFailure) -> None:
    try:
        await result
    except Exception:
        log.exception("webhook dead-letter handler failed for %s", failure.event_id)


def _seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is not worth a parser here: it falls back to backoff)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
