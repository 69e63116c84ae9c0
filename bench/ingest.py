"""`ioc bench --only ingest`: records/s through each door (HTTP ingest, the MQTT bridge), and the latency each adds to the screen.

Real processes (`ioc worker`, `ioc api`, `ioc mqtt-bridge`) and a real mosquitto. Throughput: HTTP
is NDJSON batches of dossier events from a few concurrent senders, counted once the API answered
them accepted (the broker has them); MQTT is compact water readings published at QoS 1 by one paho
client, counted once the bridge has produced all of them to `ioc.sensor.readings`. Latency: one
record at a time, the time from its send to the WebSocket update that shows it, through the door and
straight to Kafka; the difference is what the door adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from bench.live import child_env, component, token_for, wait_api_ready
from bench.stats import percentiles
from bench.workload import DossierIntake
from entrypoints.embedded.mosquitto import BRIDGE_USER, EmbeddedMosquitto
from ioc.contract import UTC7 as VN
from ioc.settings import TOPIC_DOSSIER, TOPIC_SENSOR, Settings

STATION = "WL-NAMDAN"
HTTP_BATCH = 500
HTTP_SENDERS = 4
WAIT_S = 120.0


def _wait_subscribed(broker: EmbeddedMosquitto, client_id: str) -> None:
    deadline = time.monotonic() + 60
    while f"{client_id} 1 ioc/sensors/+" not in broker.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError("the MQTT bridge did not subscribe within 60 s")
        time.sleep(0.1)


class TopicCounter:
    """Counts a topic's records by reading them (the embedded broker's latest offsets were seen to lag
    the records it had acknowledged: 475 for 500)."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.name = settings.topic(topic)
        self.count = 0
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        if self.name in await self.consumer.topics() and self.consumer.partitions_for_topic(self.name) is None:
            # Kafka's answer to the bootstrap lists no topics (api/feed.py): load every topic's metadata.
            await self.consumer._client.force_metadata_update()
        parts = [TopicPartition(self.name, p) for p in self.consumer.partitions_for_topic(self.name) or ()]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=50)
            self.count += sum(len(r) for r in batch.values())

    async def settled(self, quiet_s: float = 1.0) -> int:
        """The count once nothing new arrived for ``quiet_s``."""
        last, since = -1, time.monotonic()
        while time.monotonic() - since < quiet_s:
            if self.count != last:
                last, since = self.count, time.monotonic()
            await asyncio.sleep(0.05)
        return self.count

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


async def http_throughput(settings: Settings, producer_token: str, records: int) -> dict[str, Any]:
    intake = DossierIntake(f"http{time.monotonic_ns()}")
    batches = [b"\n".join(intake.next()[1] for _ in range(HTTP_BATCH)) for _ in range(max(1, records // HTTP_BATCH))]
    url = f"http://127.0.0.1:{settings.api_port}/api/ingest/{TOPIC_DOSSIER}"
    headers = {"Authorization": f"Bearer {producer_token}", "Content-Type": "application/x-ndjson"}
    accepted = 0
    queue = list(batches)
    async with httpx.AsyncClient(timeout=60) as client:

        async def sender() -> None:
            nonlocal accepted
            while queue:
                body = queue.pop()
                r = await client.post(url, content=body, headers=headers)
                r.raise_for_status()
                accepted += int(r.json()["accepted"])

        started = time.monotonic()
        await asyncio.gather(*(sender() for _ in range(HTTP_SENDERS)))
        elapsed = time.monotonic() - started
    return {
        "records": accepted,
        "batch": HTTP_BATCH,
        "senders": HTTP_SENDERS,
        "seconds": round(elapsed, 2),
        "records_per_s": round(accepted / elapsed, 1),
    }


async def mqtt_throughput(settings: Settings, broker: EmbeddedMosquitto, records: int) -> dict[str, Any]:
    from simulators.mqtt import MqttSensorSender

    counter = TopicCounter(settings, TOPIC_SENSOR)
    await counter.start()
    before = await counter.settled()
    base = dt.datetime.now(VN) - dt.timedelta(days=1)
    sender = MqttSensorSender(broker.url(), client_id=f"bench-{time.monotonic_ns()}")
    started = time.monotonic()
    for i in range(records):
        reading = {"t": (base + dt.timedelta(seconds=i)).isoformat(), "v": {"water_level_m": 2.0 + (i % 100) / 100}}
        sender.publish(STATION, orjson.dumps(reading))
    published = time.monotonic() - started
    await asyncio.to_thread(sender.close, WAIT_S)
    deadline = time.monotonic() + WAIT_S
    produced = 0
    while time.monotonic() < deadline:
        produced = counter.count - before
        if produced >= records:
            break
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    await counter.stop()
    return {
        "records": records,
        "produced": produced,
        "publish_seconds": round(published, 2),
        "seconds": round(elapsed, 2),
        "records_per_s": round(produced / elapsed, 1),
    }


async def _to_screen(
    settings: Settings, channel: str, key: tuple[str, str, str], send: Callable[[int], Awaitable[float]], probes: int
) -> list[float]:
    """For probe k: ``send(k)`` returns the value that will show; the ms from the send to the update showing it."""
    url = f"ws://127.0.0.1:{settings.api_port}/ws"
    token = token_for(settings)
    delays: list[float] = []
    async with connect(url, subprotocols=[Subprotocol("bearer"), Subprotocol(token)], ping_interval=None) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "channels": [channel]}).decode())
        for k in range(probes):
            started = time.monotonic()
            want = await send(k)
            deadline = started + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    msg = orjson.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
                    items = msg.get("items") if msg.get("type") == "snapshot" else [msg.get("item") or {}]
                    if any(
                        (i.get("kpi"), i.get("scope"), i.get("window")) == key and i.get("value") == want
                        for i in items or ()
                    ):
                        delays.append((time.monotonic() - started) * 1000)
                        break
            await asyncio.sleep(0.2)
    return delays


async def latencies(settings: Settings, broker: EmbeddedMosquitto, producer_token: str, probes: int) -> dict[str, Any]:
    kafka = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    await kafka.start()
    from simulators.mqtt import MqttSensorSender

    mqtt = MqttSensorSender(broker.url(), client_id=f"bench-lat-{time.monotonic_ns()}")
    http = httpx.AsyncClient(timeout=30)
    url = f"http://127.0.0.1:{settings.api_port}/api/ingest/"
    headers = {"Authorization": f"Bearer {producer_token}", "Content-Type": "application/json"}
    run = f"{time.monotonic_ns()}"
    agency = f"BENCH-LAT-{run}"  # a scope of its own: each probe moves it by exactly one
    counted = {"n": 0}
    out: dict[str, Any] = {}
    try:

        async def dossier_via(door: str, k: int) -> float:
            now = dt.datetime.now(VN)
            value = orjson.dumps(
                {
                    "schema": "ioc.dossier.v1",
                    "event_id": f"lat-{run}-{door}-{k}",
                    "dossier_id": f"LAT-{run}-{door}-{k}",
                    "type": "received",
                    "occurred_at": now.isoformat(),
                    "agency_code": agency,
                    "channel": "online",
                    "full_online": True,
                    "due_at": (now + dt.timedelta(days=3)).isoformat(),
                }
            )
            if door == "kafka":
                await kafka.send_and_wait(settings.topic(TOPIC_DOSSIER), value, key=str(k).encode())
            else:
                (await http.post(url + TOPIC_DOSSIER, content=value, headers=headers)).raise_for_status()
            counted["n"] += 1
            return float(counted["n"])

        def reading(value: float) -> bytes:
            return orjson.dumps({"t": dt.datetime.now(VN).isoformat(), "v": {"water_level_m": value}})

        async def sensor_via(door: str, k: int) -> float:
            value = round(3.0 + (k + (0 if door == "kafka" else 500)) / 1000, 3)
            if door == "kafka":
                t = dt.datetime.now(VN)
                event = {"schema": "ioc.sensor.v1", "event_id": f"bench-{t.isoformat()}", "station_id": STATION,
                         "kind": "water", "observed_at": t.isoformat(), "values": {"water_level_m": value}}  # fmt: skip
                await kafka.send_and_wait(settings.topic(TOPIC_SENSOR), orjson.dumps(event), key=STATION.encode())
            else:
                mqtt.publish(STATION, reading(value))
            await asyncio.sleep(0.002)  # distinct observation times
            return value

        dossier_key = ("dossier.received", f"agency:{agency}", "today")
        sensor_key = ("water.level_m", f"station:{STATION}", "now")
        for door in ("kafka", "http"):
            ms = await _to_screen(
                settings, f"kpi:agency:{agency}", dossier_key, functools.partial(dossier_via, door), probes
            )
            out[f"dossier_{door}"] = {"seen": len(ms), **percentiles(ms)}
        for door in ("kafka", "mqtt"):
            ms = await _to_screen(
                settings, f"kpi:station:{STATION}", sensor_key, functools.partial(sensor_via, door), probes
            )
            out[f"sensor_{door}"] = {"seen": len(ms), **percentiles(ms)}
    finally:
        await http.aclose()
        await asyncio.to_thread(mqtt.close, 10.0)
        await kafka.stop()
    for door, base in (("http", "dossier_kafka"), ("mqtt", "sensor_kafka")):
        mine = out[f"{'dossier' if door == 'http' else 'sensor'}_{door}"]
        if not (math.isnan(mine["p50"]) or math.isnan(out[base]["p50"])):
            out[f"{door}_added_p50_ms"] = round(mine["p50"] - out[base]["p50"], 1)
    return out


def doors(settings: Settings, http_records: int, mqtt_records: int, probes: int) -> dict[str, Any]:
    """The ingest section: worker, API, bridge and mosquitto up; throughput of each door, then latencies."""
    from api.auth import create_token

    with EmbeddedMosquitto() as broker:
        client_id = f"bench-bridge-{time.monotonic_ns()}"
        env = child_env(
            settings,
            IOC_MQTT_URL=broker.url(BRIDGE_USER),
            IOC_MQTT_CLIENT_ID=client_id,
            IOC_MQTT_BRIDGE_METRICS_PORT="0",
            IOC_INGEST_RATE="1000000",
            IOC_INGEST_BURST="1000000",
        )
        producer_token = create_token(settings, "producer", source="bench", topics=[TOPIC_DOSSIER])
        with component("worker", env), component("api", env) as api, component("mqtt-bridge", env):
            wait_api_ready(settings, api)
            _wait_subscribed(broker, client_id)
            results: dict[str, Any] = {}
            results["http"] = asyncio.run(http_throughput(settings, producer_token, http_records))
            results["mqtt"] = asyncio.run(mqtt_throughput(settings, broker, mqtt_records))
            time.sleep(3)  # the worker folds the backlog before the latency probes
            results["latency"] = asyncio.run(latencies(settings, broker, producer_token, probes))
    return results
