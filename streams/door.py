"""What the doors for systems that cannot speak Kafka (HTTP ingest, the MQTT bridge) check before a record reaches a topic.

The checks are the worker's own parsers (`streams.engine.KINDS`), so a record accepted at a door is
one the worker folds into the KPIs, and one refused there would have been dead-lettered by the
worker for the same reason. Beside them: splitting NDJSON batches, and the compact form of a sensor
reading that field dataloggers publish over MQTT (docs/api.md, "Feeding it from other systems").
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec

from ioc.errors import InvalidEvent
from ioc.registry import Registry
from ioc.settings import TOPIC_SENSOR
from streams import events, sensor
from streams.engine import KINDS

#: The MQTT topic filter the bridge subscribes to; a station publishes on ``ioc/sensors/<station_id>``.
MQTT_TOPIC_PREFIX = "ioc/sensors/"
MQTT_TOPIC_FILTER = MQTT_TOPIC_PREFIX + "+"


@dataclass(frozen=True, slots=True)
class Checked:
    """A record that passed the worker's parser: its Kafka key and its event_id."""

    key: str
    event_id: str


def check(topic: str, raw: bytes, registry: Registry, produced_us: int) -> Checked:
    """Validate one record of a logical input topic exactly as the worker will; raises `InvalidEvent`."""
    key, parsed = KINDS[topic].parse(raw, registry, produced_us)
    return Checked(key, parsed.event.event_id)


def split_ndjson(body: bytes) -> list[bytes]:
    """The records of an NDJSON body: one per line, blank lines skipped, surrounding whitespace removed."""
    return [line for line in (part.strip() for part in body.split(b"\n")) if line]


class CompactReading(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``{"t": "<observed_at>", "v": {"<value>": number, ...}, "id"?: "<event_id>"}``."""

    t: dt.datetime
    v: dict[str, float]
    id: str | None = None


_compact = events.decoder(CompactReading)
_encode = msgspec.json.Encoder()


def station_of_topic(mqtt_topic: str) -> str:
    """The station an MQTT topic ``ioc/sensors/<station_id>`` names; `InvalidEvent` for any other topic."""
    if not mqtt_topic.startswith(MQTT_TOPIC_PREFIX) or "/" in mqtt_topic[len(MQTT_TOPIC_PREFIX) :]:
        raise InvalidEvent(f"not a sensor topic: {mqtt_topic[:100]!r}", stage="route")
    station_id = mqtt_topic[len(MQTT_TOPIC_PREFIX) :]
    if not station_id:
        raise InvalidEvent("the topic names no station", stage="route")
    return station_id


def compact_event_id(station_id: str, observed_us: int) -> str:
    """The event_id of a compact reading without one: the same reading re-sent gets the same id."""
    return f"{station_id}@{observed_us}"


def sensor_from_mqtt(mqtt_topic: str, payload: bytes, registry: Registry, produced_us: int) -> tuple[Checked, bytes]:
    """A reading published on ``ioc/sensors/<station_id>``: the full ``ioc.sensor.v1`` event or the
    compact form, checked by the worker's parser and against the topic's station.

    Returns the checked key and event_id and the bytes to produce (the full event; a compact reading
    expanded with ``station_id`` from the topic and ``kind`` from the registry). Raises `InvalidEvent`.
    """
    station_id = station_of_topic(mqtt_topic)
    station = registry.stations.get(station_id)
    if station is None:
        raise InvalidEvent(f"unknown station {station_id[:80]!r} in the topic", field="station_id")
    stripped = payload.lstrip()
    if stripped.startswith(b"{") and b'"schema"' in payload:
        value = payload
    else:
        compact = events.decode(_compact, payload)
        observed_us = events.to_us(compact.t, "t", produced_us)
        value = _encode.encode(
            {
                "schema": sensor.SCHEMA,
                "event_id": compact.id or compact_event_id(station_id, observed_us),
                "station_id": station_id,
                "kind": station.kind,
                "observed_at": compact.t.isoformat(),
                "values": compact.v,
            }
        )
    checked = check(TOPIC_SENSOR, value, registry, produced_us)
    if checked.key != station_id:
        raise InvalidEvent(
            f"a reading of station {checked.key[:80]!r} published on the topic of station {station_id!r}",
            field="station_id",
        )
    return checked, value
