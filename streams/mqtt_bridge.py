"""`ioc mqtt-bridge`: sensor readings from MQTT (``ioc/sensors/<station_id>``, QoS 1) to `ioc.sensor.readings`.

Each message is checked by the worker's parser (`streams.door.sensor_from_mqtt`: the full
``ioc.sensor.v1`` event or the compact form, and the topic's station must be the reading's), then
produced keyed by station, or dead-lettered to `ioc.deadletter` with the reason and the MQTT topic
as ``ioc.source.topic``. A QoS 1 message is acknowledged to the MQTT broker (paho-mqtt's
``manual_ack``) only once Kafka has acknowledged the record or its dead letter (acks=all): a bridge
that dies before that gets the message again from the broker, which keeps the bridge's persistent
session (``clean_session`` false). A redelivered reading keeps its event_id, so counting it again
changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from aiokafka.errors import KafkaError
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry, start_http_server

from ioc.errors import ConfigurationError, InvalidEvent
from ioc.ingest import DoorProducer, Headers, dead_letter_headers, ingest_counter
from ioc.registry import Registry, load_registry
from ioc.settings import TOPIC_DEADLETTER, TOPIC_SENSOR, Settings
from streams import door

log = logging.getLogger(__name__)

RETRY_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class MqttTarget:
    """Where and as whom to connect, from ``mqtt://USER:PASSWORD@HOST:PORT``."""

    host: str
    port: int
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> MqttTarget:
    parts = urlsplit(url)
    if parts.scheme != "mqtt" or not parts.hostname:
        raise ConfigurationError("IOC_MQTT_URL must look like mqtt://USER:PASSWORD@HOST:PORT")
    return MqttTarget(
        parts.hostname,
        parts.port or 1883,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: bytes
    mid: int
    qos: int


class Bridge:
    """The bridge's asyncio side: check, produce, then acknowledge to MQTT."""

    def __init__(self, settings: Settings, registry: Registry, metrics: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.target = parse_mqtt_url(settings.mqtt_url.get_secret_value())
        self.door = DoorProducer(settings, "ioc-mqtt-bridge")
        self.metrics = metrics or CollectorRegistry()
        self.counter = ingest_counter(self.metrics)
        self.stats: Counter[str] = Counter()
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.subscribed = asyncio.Event()
        self.client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[str]] = set()
        self._stopping = False

    # --- MQTT (paho's network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT connection refused: %s", reason)
            return
        client.subscribe(door.MQTT_TOPIC_FILTER, qos=1)
        log.info(
            "MQTT connected to %s:%d; subscribed to %s", self.target.host, self.target.port, door.MQTT_TOPIC_FILTER
        )

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self._stopping:
            log.info("MQTT disconnected")
        else:
            log.warning("MQTT disconnected (%s); reconnecting", reason)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.subscribed.clear)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        assert self._loop is not None
        received = Received(message.topic, bytes(message.payload), message.mid, message.qos)
        self._loop.call_soon_threadsafe(self.queue.put_nowait, received)

    def connect(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.settings.mqtt_client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if self.target.username:
            client.username_pw_set(self.target.username, self.target.password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.connect_async(self.target.host, self.target.port, keepalive=30)
        client.loop_start()
        self.client = client

    # --- the asyncio side ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.door.start()
        self.connect()

    async def stop(self) -> None:
        self._stopping = True
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        await self.door.stop()

    async def run(self) -> None:
        """Take messages until cancelled; each is handled in its own task (Kafka acks come in any order)."""
        while True:
            received = await self.queue.get()
            task = asyncio.create_task(self.handle(received))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def handle(self, received: Received) -> str:
        """Check, produce (or dead-letter) until the broker has it, then acknowledge; the result."""
        try:
            station = door.station_of_topic(received.topic)
        except InvalidEvent:
            station = ""
        source = station if station in self.registry.stations else "unknown"
        try:
            checked, value = door.sensor_from_mqtt(
                received.topic, received.payload, self.registry, time.time_ns() // 1000
            )
        except InvalidEvent as exc:
            log.info("dead-lettering the message on %s (%s): %s", received.topic[:200], exc.stage, exc)
            headers = dead_letter_headers(exc.stage, str(exc), received.topic)
            await self._deliver(TOPIC_DEADLETTER, station.encode() or None, received.payload, headers)
            result = "rejected"
        else:
            ident = (TOPIC_SENSOR, checked.event_id)
            pending = self.door.pending.get(ident)
            if ident in self.door.recent:
                result = "duplicate"
            elif pending is not None:  # the same reading re-sent while the first is being produced
                await asyncio.shield(pending)
                result = "duplicate"
            else:
                sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self.door.pending[ident] = sent
                try:
                    await self._deliver(TOPIC_SENSOR, checked.key.encode(), value, None)
                    self.door.recent.add(ident)
                    sent.set_result(None)
                finally:
                    del self.door.pending[ident]
                    if not sent.done():
                        sent.cancel()
                result = "accepted"
        self.counter.labels("mqtt", source, result).inc()
        self.stats[result] += 1
        if received.qos > 0 and self.client is not None:
            self.client.ack(received.mid, received.qos)
        return result

    async def _deliver(self, topic: str, key: bytes | None, value: bytes, headers: Headers | None) -> None:
        """Produce until the broker acknowledges (a broker outage delays, never drops)."""
        delay = 0.5
        while True:
            try:
                future = await self.door.send(topic, key, value, headers)
                await future
                return
            except KafkaError as exc:
                self.stats["kafka_retries"] += 1
                log.warning("producing to %s failed (%s); retrying in %.1f s", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)


async def serve(settings: Settings) -> None:
    """Run the bridge until cancelled."""
    if not settings.mqtt_url.get_secret_value():
        raise ConfigurationError("IOC_MQTT_URL is not set (mqtt://USER:PASSWORD@HOST:PORT)")
    registry = load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    bridge = Bridge(settings, registry)
    try:
        server, _ = start_http_server(settings.mqtt_bridge_metrics_port, registry=bridge.metrics)
        log.info("MQTT bridge metrics on http://0.0.0.0:%d/metrics", server.server_port)
    except OSError as exc:
        server = None
        log.warning("MQTT bridge metrics not served on port %d: %s", settings.mqtt_bridge_metrics_port, exc)
    await bridge.start()
    try:
        await bridge.run()
    finally:
        await bridge.stop()
        log.info("MQTT bridge stopped: %s", dict(bridge.stats))
        if server is not None:
            server.shutdown()
