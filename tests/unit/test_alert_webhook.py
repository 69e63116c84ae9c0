"""Webhook delivery against a real HTTP server on 127.0.0.1: signatures, retries, dead letters, isolation, filters."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from alerts.model import AlertEvent, AlertState, Audience, Severity
from alerts.webhook import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookDispatcher,
    WebhookFailure,
    WebhookTarget,
    event_id,
    sign,
    targets_from,
    verify,
)
from ioc.settings import Settings

VN = dt.timezone(dt.timedelta(hours=7))
SECRET = b"webhook-secret-for-tests"


def event(
    *,
    notify: bool = True,
    domain: str = "water",
    severity: Severity = Severity.HIGH,
    audience: tuple[Audience, ...] = (Audience.OPERATOR, Audience.COMMUNE),
    commune: str | None = "17935",
    minute: int = 0,
) -> AlertEvent:
    return AlertEvent(
        alert_id="9f2c4e1a7b3d5c60",
        fingerprint="4b1e0c2d9a8f7e61",
        rule="water.alarm_2",
        scope="station:WL-NAMDAN",
        severity=severity,
        state=AlertState.FIRING,
        domain=domain,
        audience=audience,
        commune_code=commune,
        message_vi="Nam Đàn: vượt báo động II",
        message_en="Nam Dan: above alarm level II",
        at=dt.datetime(2026, 11, 22, 8, minute, tzinfo=VN),
        notify=notify,
    )


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: records each request and answers ``statuses`` in turn (then 200).

    ``gate``, when set, holds every answer until it is opened: a receiver that hangs.
    """

    statuses: list[int] = field(default_factory=list)
    gate: asyncio.Event | None = None
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=in-the-url"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(Received(headers, body))
                self.arrived.set()
                if self.gate is not None:
                    await self.gate.wait()
                status = self.statuses.pop(0) if self.statuses else 200
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        if receiver.gate is not None:
            receiver.gate.set()
        server.close()
        for writer in receiver.writers:
            writer.close()
        await server.wait_closed()


def target(receiver: Receiver, name: str = "hook", **filters: Any) -> WebhookTarget:
    return WebhookTarget(name=name, url=receiver.url, secret=SECRET, **filters)


def dispatcher(*targets: WebhookTarget, dead: list[WebhookFailure] | None = None, **kw: Any) -> WebhookDispatcher:
    options: dict[str, Any] = {"backoff_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0, "rng": random.Random(7)}
    options.update(kw)
    return WebhookDispatcher(targets, on_dead_letter=dead.append if dead is not None else None, **options)


async def test_delivery_is_signed_with_the_targets_secret_and_carries_an_event_id() -> None:
    async with serving(Receiver()) as rx:
        d = dispatcher(target(rx), clock=lambda: 1795000000.0)
        await d.start()
        sent = event()
        assert d.submit(sent) == 1
        await d.stop()
    (req,) = rx.requests
    assert req.headers[TIMESTAMP_HEADER.lower()] == "1795000000"
    signature = req.headers[SIGNATURE_HEADER.lower()]
    assert signature == "sha256=" + hmac.new(SECRET, b"1795000000." + req.body, "sha256").hexdigest()
    assert verify(SECRET, "1795000000", req.body, signature)
    assert not verify(b"another secret", "1795000000", req.body, signature)
    assert not verify(SECRET, "1795000001", req.body, signature)
    assert req.headers[EVENT_ID_HEADER.lower()] == "9f2c4e1a7b3d5c60:firing:2026-11-22T08:00:00+07:00"
    assert req.headers["content-type"] == "application/json"
    assert msgspec.json.decode(req.body, type=AlertEvent) == sent
    assert d.counts["delivered"] == 1


async def test_server_errors_are_retried_with_the_same_event_id_until_success() -> None:
    dead: list[WebhookFailure] = []
    async with serving(Receiver(statuses=[500, 503])) as rx:
        d = dispatcher(target(rx), dead=dead, max_attempts=5)
        await d.start()
        d.submit(event())
        await d.stop()
    assert len(rx.requests) == 3
    assert len({r.headers[EVENT_ID_HEADER.lower()] for r in rx.requests}) == 1
    assert all(verify(SECRET, r.headers["x-ioc-timestamp"], r.body, r.headers["x-ioc-signature"]) for r in rx.requests)
    assert dead == [] and d.counts == {"delivered": 1, "retried": 2, "dead_lettered": 0, "queue_full": 0}


async def test_after_max_attempts_the_notification_goes_to_the_dead_letter_callback() -> None:
    dead: list[WebhookFailure] = []
    async with serving(Receiver(statuses=[500] * 10)) as rx:
        d = dispatcher(target(rx, name="zalo-bot"), dead=dead, max_attempts=3)
        await d.start()
        sent = event()
        d.submit(sent)
        await d.stop()
    assert len(rx.requests) == 3
    (failure,) = dead
    assert (failure.target, failure.attempts, failure.reason) == ("zalo-bot", 3, "HTTP 500")
    assert failure.event == sent and failure.key == b"4b1e0c2d9a8f7e61" and failure.body == rx.requests[0].body
    assert failure.event_id == event_id(sent)


async def test_a_refusal_is_not_retried() -> None:
    dead: list[WebhookFailure] = []
    async with serving(Receiver(statuses=[401])) as rx:
        d = dispatcher(target(rx), dead=dead, max_attempts=5)
        await d.start()
        d.submit(event())
        await d.stop()
    assert len(rx.requests) == 1
    assert [(f.attempts, f.reason) for f in dead] == [(1, "HTTP 401")]


async def test_an_unreachable_target_is_dead_lettered_without_its_url() -> None:
    dead: list[WebhookFailure] = []
    async with serving(Receiver()) as rx:
        url = rx.url
    gone = WebhookTarget(name="gone", url=url, secret=SECRET)  # the server is closed: connection refused
    d = dispatcher(gone, dead=dead, max_attempts=2)
    await d.start()
    d.submit(event())
    await d.stop()
    (failure,) = dead
    assert failure.attempts == 2 and failure.reason == "ConnectError" and "token" not in failure.reason


async def test_an_async_dead_letter_callback_is_awaited_before_stop_returns() -> None:
    produced: list[str] = []

    async def produce(failure: WebhookFailure) -> None:
        await asyncio.sleep(0.01)
        produced.append(failure.event_id)

    async with serving(Receiver(statuses=[500])) as rx:
        d = WebhookDispatcher([target(rx)], on_dead_letter=produce, max_attempts=1)
        await d.start()
        d.submit(event())
        await d.stop()
    assert produced == [event_id(event())]


async def test_a_slow_target_does_not_delay_another() -> None:
    gate = asyncio.Event()
    async with serving(Receiver(gate=gate)) as slow, serving(Receiver()) as fast:
        d = dispatcher(target(slow, "slow"), target(fast, "fast"))
        await d.start()
        d.submit(event(minute=1))
        d.submit(event(minute=2))
        await asyncio.wait_for(fast.arrived.wait(), 10)
        while len(fast.requests) < 2:
            await asyncio.sleep(0.01)
        # the slow receiver still holds its first request, unanswered, while the fast one has both
        assert len(slow.requests) == 1 and not gate.is_set()
        gate.set()
        await d.stop()
    assert [r.headers[EVENT_ID_HEADER.lower()] for r in slow.requests] == [
        event_id(event(minute=1)),
        event_id(event(minute=2)),
    ]
    assert d.counts["delivered"] == 4


async def test_submit_never_waits_a_full_queue_dead_letters_the_overflow() -> None:
    dead: list[WebhookFailure] = []
    gate = asyncio.Event()
    async with serving(Receiver(gate=gate)) as rx:
        d = dispatcher(target(rx), dead=dead, queue_size=1)
        await d.start()
        d.submit(event(minute=1))
        await asyncio.wait_for(rx.arrived.wait(), 10)  # the first is in flight, the queue is empty
        assert d.submit(event(minute=2)) == 1
        assert d.submit(event(minute=3)) == 0  # the queue holds one: this one cannot wait
        assert [f.reason for f in dead] == ["queue full (the receiver is too slow)"]
        gate.set()
        await d.stop()
    assert len(rx.requests) == 2 and d.counts["queue_full"] == 1


async def test_stop_dead_letters_what_could_not_be_delivered_in_time() -> None:
    dead: list[WebhookFailure] = []
    async with serving(Receiver(gate=asyncio.Event())) as rx:
        d = dispatcher(target(rx), dead=dead)
        await d.start()
        d.submit(event(minute=1))
        d.submit(event(minute=2))
        await asyncio.wait_for(rx.arrived.wait(), 10)
        await d.stop(drain_timeout_s=0.05)
    assert sorted(f.reason for f in dead) == [
        "dispatcher stopped before delivery",
        "dispatcher stopped during delivery",
    ]


async def test_only_notifying_events_that_pass_the_filters_are_sent() -> None:
    async with serving(Receiver()) as cyber_rx, serving(Receiver()) as all_rx:
        d = dispatcher(target(cyber_rx, "soc", domains=frozenset({"cyber"})), target(all_rx, "all"))
        await d.start()
        assert d.submit(event(notify=False)) == 0
        assert d.submit(event(domain="cyber")) == 2
        assert d.submit(event()) == 1
        await d.stop()
    assert [msgspec.json.decode(r.body)["domain"] for r in cyber_rx.requests] == ["cyber"]
    assert [msgspec.json.decode(r.body)["domain"] for r in all_rx.requests] == ["cyber", "water"]


@pytest.mark.parametrize(
    ("filters", "sent", "accepted"),
    [
        ({}, event(), True),
        ({}, event(notify=False), False),
        ({"domains": frozenset({"water", "env"})}, event(), True),
        ({"domains": frozenset({"cyber"})}, event(), False),
        ({"min_severity": Severity.HIGH}, event(severity=Severity.CRITICAL), True),
        ({"min_severity": Severity.HIGH}, event(severity=Severity.HIGH), True),
        ({"min_severity": Severity.HIGH}, event(severity=Severity.WARNING), False),
        ({"audience": frozenset({Audience.SECURITY})}, event(), False),
        ({"audience": frozenset({Audience.COMMUNE})}, event(), True),
        ({"communes": frozenset({"17935"})}, event(), True),
        ({"communes": frozenset({"16681"})}, event(), False),
        ({"communes": frozenset({"16681"})}, event(commune=None), False),
    ],
)
def test_target_filters(filters: dict[str, Any], sent: AlertEvent, accepted: bool) -> None:
    assert WebhookTarget(name="t", url="http://x", secret=b"s", **filters).accepts(sent) is accepted


def test_event_id_of_a_reminder_carries_its_number() -> None:
    reminder = msgspec.structs.replace(event(), repeat=2)
    assert event_id(reminder) == event_id(event()) + ":2"


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    assert sign(b"k", "1", b"{}") == "sha256=" + hmac.new(b"k", b"1.{}", "sha256").hexdigest()


# --- configuration ---------------------------------------------------------------------------------

HOOKS = (
    '[{"url": "https://soc.nghean.gov.vn/hook/abc123", "secret": "s3cret-value", "name": "soc",'
    ' "domains": ["cyber"], "min_severity": "high", "audience": ["security"]},'
    ' {"url": "http://127.0.0.1:9/x?token=t0k", "secret": "other-secret", "communes": ["17935"]}]'
)


def test_webhooks_are_read_from_ioc_alert_webhooks_and_never_show_secrets(
    monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings]
) -> None:
    monkeypatch.setenv("IOC_ALERT_WEBHOOKS", HOOKS)
    settings = make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x")
    soc, commune = targets_from(settings)
    assert (soc.name, soc.domains, soc.min_severity, soc.audience) == (
        "soc", frozenset({"cyber"}), Severity.HIGH, frozenset({Audience.SECURITY})
    )  # fmt: skip
    assert (commune.name, commune.communes, commune.secret) == ("127.0.0.1", frozenset({"17935"}), b"other-secret")
    shown = repr(settings) + repr(soc) + repr(commune) + str(settings.alert_webhooks)
    for secret in ("s3cret-value", "other-secret", "abc123", "t0k"):
        assert secret not in shown


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ('[{"url": "ftp://x", "secret": "s"}]', r"http\(s\) URL"),
        ('[{"url": "https://x", "secret": ""}]', "non-empty secret"),
        ('[{"url": "https://x", "secret": "s", "min_severity": "urgent"}]', "min_severity"),
        ('[{"url": "https://x", "secret": "s", "colour": "red"}]', "colour"),
    ],
)
def test_bad_webhook_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, make_settings: Callable[..., Settings], hooks: str, message: str
) -> None:
    monkeypatch.setenv("IOC_ALERT_WEBHOOKS", hooks)
    with pytest.raises(ValueError, match=message):
        make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x")


def test_production_wants_https_and_long_secrets(make_settings: Callable[..., Settings]) -> None:
    key = "k" * 40
    common = {"mode": "production", "signing_key": key, "kafka_bootstrap": "a:1", "database_url": "postgresql://a"}
    with pytest.raises(ValueError, match="must use https"):
        make_settings(**common, alert_webhooks=[{"url": "http://x", "secret": "s" * 40}])
    with pytest.raises(ValueError, match="32 characters"):
        make_settings(**common, alert_webhooks=[{"url": "https://x", "secret": "short"}])
    assert make_settings(**common, alert_webhooks=[{"url": "https://x", "secret": "s" * 40}]).alert_webhooks
