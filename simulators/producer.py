"""The producing loop: paces the simulated stream on the wall clock, writes it with aiokafka."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import orjson
from aiokafka import AIOKafkaProducer

from ioc.produce import stop_within
from ioc.registry import Registry
from ioc.settings import TOPIC_SENSOR as SENSOR_TOPIC
from ioc.settings import Settings
from simulators.baseline import Scenario
from simulators.envelope import VN_TZ, Event
from simulators.stream import SimRecord, generate, resolve_scenario, sensor_history

logger = logging.getLogger(__name__)

#: Records due within this window are sent together before the loop sleeps again.
SEND_AHEAD_S = 0.005


@dataclass
class Stats:
    """What a run has put on the wire so far (filled in place: readable after cancellation)."""

    sent: int = 0
    by_topic: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    duplicates: int = 0
    delayed: int = 0
    malformed: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    #: How far the sender trails the schedule at the end (s); grows when the broker cannot keep up.
    lag_s: float = 0.0
    first_event_time: dt.datetime | None = None
    last_event_time: dt.datetime | None = None

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def count(self, record: SimRecord) -> None:
        self.sent += 1
        self.by_topic[record.topic] += 1
        self.duplicates += record.duplicate
        self.delayed += record.delayed
        self.malformed += record.malformed
        if self.first_event_time is None:
            self.first_event_time = record.event_time
        self.last_event_time = record.event_time


class ProgressLine:
    """Sent, rate and elapsed on stderr: one updating line on a TTY, else a line every 5 s."""

    def __init__(self, stream: TextIO | None = None, *, every_s: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else (0.5 if self.tty else 5.0)
        self._next = 0.0
        self._last_sent = 0
        self._last_at = 0.0

    def update(self, stats: Stats, now: float, *, final: bool = False) -> None:
        if not final and now < self._next:
            return
        window = now - self._last_at
        recent = (stats.sent - self._last_sent) / window if window > 0 and self._last_at else stats.rate
        self._next, self._last_sent, self._last_at = now + self.every_s, stats.sent, now
        text = (
            f"simulate: {stats.sent:,} sent ({stats.rate:,.1f}/s avg, {recent:,.1f}/s now) "
            f"dup {stats.duplicates:,} late {stats.delayed:,} bad {stats.malformed:,} "
            f"failed {stats.failed:,} lag {stats.lag_s:.1f}s elapsed {stats.elapsed_s:,.0f}s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


async def run(
    settings: Settings,
    *,
    rate: float,
    duration: float | None = None,
    scenario: str | Scenario | None = None,
    seed: int | str | None = None,
    dup_rate: float = 0.0,
    ooo_rate: float = 0.0,
    bad_rate: float = 0.0,
    speedup: float = 1.0,
    progress: bool = True,
    registry: Registry | None = None,
    diurnal: bool = False,
    max_in_flight: int = 20_000,
    stats: Stats | None = None,
    clock: Callable[[], float] = time.monotonic,
    history_s: float = 0.0,
    sensors_via_mqtt: str | None = None,
    after_backfill: bool = False,
    continuation: Sequence[Event] = (),
) -> Stats:
    """Produce realistic events to the three input topics for ``duration`` s or until cancelled.

    ``rate`` is the total records per second on the wire across all topics: every station
    reports at its registry cadence (about 0.13/s), the rest is 99.5 % dossier and 0.5 %
    incident events (see :mod:`simulators.stream`). Event times start at the wall-clock now and
    advance ``speedup`` times faster than the wall clock (1.0: live, so KPIs are current); each
    record is released when its simulated arrival time comes, which paces the run like a token
    bucket filled at ``rate``. When the broker falls behind, records go out as fast as it
    accepts them, their event times unchanged, and ``Stats.lag_s`` shows the backlog.

    ``scenario`` is one of ``flood``, ``ddos``, ``dossier-surge``, ``sensor-outage`` (or a
    :class:`Scenario`); ``dup_rate``, ``ooo_rate``, ``bad_rate`` add re-sent, late and malformed
    records (malformed ones are raw bytes and may not be JSON). ``seed`` None draws one from the
    clock (logged, so a run can be repeated). Sends are batched (linger 5 ms) with at most
    ``max_in_flight`` unacknowledged records. On cancellation the producer flushes what it has
    handed to the client, stops, and re-raises; pass ``stats`` to read the counts afterwards.
    Not yet explained: stopped by a signal (`ioc simulate`, Ctrl-C or SIGTERM), the topics were seen
    to hold 1-3 records fewer than ``sent`` in about 200; cancelled in-process, exactly ``sent``.

    ``history_s`` > 0 first sends, as fast as the broker takes them, the sensor readings of that
    many past seconds (a warm start: the hourly VN_AQI needs two of the last three hourly means,
    rain sums a day), then goes live.

    ``after_backfill``, ``continuation``: the run continues a back-fill (see `simulators.stream.generate`).

    ``sensors_via_mqtt`` (``mqtt://USER:PASSWORD@HOST:PORT``): sensor readings go to that MQTT broker
    (QoS 1, ``ioc/sensors/<station_id>``, for the bridge) instead of straight to Kafka.
    """
    if rate <= 0 or speedup <= 0:
        raise ValueError("rate and speedup must be positive")
    stats = stats if stats is not None else Stats()
    if seed is None:
        seed = time.time_ns() % 1_000_000_007
    start = dt.datetime.now(VN_TZ)
    until = start + dt.timedelta(seconds=duration * speedup) if duration is not None else None
    scenario = resolve_scenario(scenario, start, registry)
    # A labelled-anomaly scenario starts its faults inside the warm-start history it asks for.
    history_s = max(history_s, scenario.history_h * 3600)
    # Paced in simulated time: at speedup k a simulated second carries rate / k records.
    records = generate(
        seed,
        start,
        rate / speedup,
        scenario,
        dup_rate,
        ooo_rate,
        bad_rate,
        registry=registry,
        until=until,
        diurnal=diurnal,
        after_backfill=after_backfill,
        continuation=continuation,
    )
    logger.info(
        "simulating at %.1f records/s (seed %s, scenario %s, speedup %g) to %s",
        rate,
        seed,
        getattr(scenario, "name", scenario) or "normal",
        speedup,
        settings.kafka_bootstrap,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=5,
        max_batch_size=256 * 1024,
        # As a real source system should: a record counts as sent once every in-sync replica has it
        # (with min.insync.replicas=2 on a real cluster, a lone broker cannot acknowledge it).
        acks="all",
        client_id="ioc-simulator",
    )
    await producer.start()
    mqtt = None
    if sensors_via_mqtt:
        from simulators.mqtt import MqttSensorSender

        mqtt = MqttSensorSender(sensors_via_mqtt)
        logger.info("sensor readings go over MQTT")
    display = ProgressLine() if progress else None
    in_flight: collections.deque[asyncio.Future[object]] = collections.deque()
    topics: dict[str, str] = {}

    def settled(future: asyncio.Future[object]) -> None:
        if future.cancelled() or future.exception() is not None:
            stats.failed += 1
            if stats.failed in (1, 10, 100, 1000) or stats.failed % 10_000 == 0:
                reason = "cancelled" if future.cancelled() else repr(future.exception())
                logger.warning("%d records failed to send (latest: %s)", stats.failed, reason)

    began = clock()
    try:
        if history_s > 0:
            for event in sensor_history(seed, start, history_s, registry, scenario):
                if mqtt is not None:
                    mqtt.publish(event.key, orjson.dumps(event.value))
                    stats.sent += 1
                    continue
                topic = topics.get(event.topic) or topics.setdefault(event.topic, settings.topic(event.topic))
                future = await producer.send(topic, value=orjson.dumps(event.value), key=event.key.encode())
                future.add_done_callback(settled)
                in_flight.append(future)
                if len(in_flight) >= max_in_flight:
                    await asyncio.wait([in_flight.popleft()])
                stats.sent += 1
            logger.info("warm start: %d past sensor readings (%.0f h) sent", stats.sent, history_s / 3600)
        for record in records:
            due = (record.arrival_time - start).total_seconds() / speedup
            now = clock() - began
            if due > now + SEND_AHEAD_S:
                stats.elapsed_s = now
                if display:
                    display.update(stats, now)
                await asyncio.sleep(due - now)
                now = clock() - began
            stats.lag_s = max(0.0, now - due)
            if mqtt is not None and record.topic == SENSOR_TOPIC:
                mqtt.publish(record.key.decode(), record.value)
                stats.count(record)
                continue
            topic = topics.get(record.topic) or topics.setdefault(record.topic, settings.topic(record.topic))
            future = await producer.send(topic, value=record.value, key=record.key)
            future.add_done_callback(settled)
            in_flight.append(future)
            while in_flight and in_flight[0].done():
                in_flight.popleft()
            if len(in_flight) >= max_in_flight:
                await asyncio.wait([in_flight.popleft()])
            stats.count(record)
            if display and stats.sent % 1000 == 0:
                stats.elapsed_s = clock() - began
                display.update(stats, stats.elapsed_s)
        if duration is not None:  # the stream may end a little before the requested duration
            rest = duration - (clock() - began)
            if rest > 0:
                await asyncio.sleep(rest)
    finally:
        if mqtt is not None:
            await asyncio.shield(asyncio.to_thread(mqtt.close))
        try:
            # flushes what was handed over, within a bound (aiokafka's stop can hang after an outage)
            if not await asyncio.shield(stop_within(producer, "the simulator's producer")):
                unconfirmed = sum(1 for f in in_flight if not f.done())
                logger.warning("%d records handed to the producer were not confirmed", unconfirmed)
        finally:
            stats.elapsed_s = clock() - began
            if display:
                display.update(stats, stats.elapsed_s, final=True)
            logger.info(
                "simulator stopped: %d records in %.1f s (%.1f/s), %d failed",
                stats.sent,
                stats.elapsed_s,
                stats.rate,
                stats.failed,
            )
    return stats
