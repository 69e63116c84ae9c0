"""Sensor readings over MQTT, as a station's datalogger sends them: QoS 1 to ``ioc/sensors/<station_id>``."""

from __future__ import annotations

import contextlib
import logging
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from streams.door import MQTT_TOPIC_PREFIX
from streams.mqtt_bridge import parse_mqtt_url

log = logging.getLogger(__name__)

#: Messages handed to paho and not yet acknowledged by the MQTT broker, at most.
MAX_IN_FLIGHT = 1000


class MqttSensorSender:
    """A paho client on its own network thread; `publish` queues a reading, `close` waits for the acks."""

    def __init__(self, url: str, client_id: str = "ioc-simulator") -> None:
        target = parse_mqtt_url(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if target.username:
            self.client.username_pw_set(target.username, target.password)
        self.client.max_inflight_messages_set(MAX_IN_FLIGHT)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.pending: list[mqtt.MQTTMessageInfo] = []
        self.sent = 0
        self.client.connect(target.host, target.port, keepalive=30)
        self.client.loop_start()

    def publish(self, station_id: str, payload: bytes) -> None:
        info = self.client.publish(MQTT_TOPIC_PREFIX + station_id, payload, qos=1)
        self.sent += 1
        self.pending.append(info)
        if len(self.pending) > 10 * MAX_IN_FLIGHT:
            self.pending = [i for i in self.pending if not i.is_published()]

    def close(self, timeout_s: float = 10.0) -> int:
        """Wait (up to ``timeout_s``) until the broker has every reading, disconnect; the unconfirmed count."""
        deadline = time.monotonic() + timeout_s
        for info in self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(RuntimeError, ValueError):  # not queued (disconnected): counted below
                info.wait_for_publish(left)
        unconfirmed = sum(1 for i in self.pending if not i.is_published())
        self.client.disconnect()
        self.client.loop_stop()
        if unconfirmed:
            log.warning("%d readings sent over MQTT were not confirmed by the broker", unconfirmed)
        return unconfirmed
