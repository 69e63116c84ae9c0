"""The stream workers' consumer group as `/readyz` shows it: each member, its partitions, its lag, the merger."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

from ioc.settings import INPUT_TOPICS, TOPIC_CYBER, TOPIC_SENSOR, Settings

log = logging.getLogger(__name__)
#: A readiness probe every few seconds must not cost a broker round trip each time.
CACHE_S = 5.0
TIMEOUT_S = 3.0


class WorkerGroup:
    """Reads the group's members and committed offsets from the broker, at most every `CACHE_S`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def status(self) -> dict[str, Any]:
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            try:
                value = await asyncio.wait_for(self._read(), TIMEOUT_S)
            except Exception as exc:  # readiness reports it; it does not fail because of it
                value = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            self._cached = (time.monotonic(), value)
            return value

    async def _read(self) -> dict[str, Any]:
        s = self.settings
        logical = {s.topic(t): t for t in INPUT_TOPICS}
        admin = AIOKafkaAdminClient(bootstrap_servers=s.kafka_bootstrap)
        await admin.start()
        try:
            (response,) = await admin.describe_consumer_groups([s.consumer_group])
            committed = await admin.list_consumer_group_offsets(s.consumer_group)
        finally:
            await admin.close()
        group = response.groups[0]
        state, members = group[2], group[5]
        owned: list[tuple[str, str, list[TopicPartition], bool]] = []
        for member in members:
            member_id, client_host = member[0], member[2]
            assignment_raw = member[4]
            tps: list[TopicPartition] = []
            if assignment_raw:
                assignment = ConsumerProtocolMemberAssignment.decode(assignment_raw)
                tps = [TopicPartition(t, p) for t, ps in assignment.assignment for p in ps]
            # The merger is the member the assignor gave the low-volume topics (streams.shards): its
            # join metadata says so only from its next join, and a group formed in one go has none.
            merger = any(logical.get(tp.topic) in (TOPIC_CYBER, TOPIC_SENSOR) for tp in tps)
            owned.append((member_id, client_host, tps, merger))
        ends = await self._end_offsets([tp for _, _, tps, _ in owned for tp in tps])
        workers = []
        for member_id, host, tps, merger in sorted(owned, key=lambda m: m[0]):
            partitions: dict[str, list[int]] = {}
            lag = 0
            for tp in sorted(tps):
                partitions.setdefault(logical.get(tp.topic, tp.topic), []).append(tp.partition)
                done = committed.get(tp)
                lag += max(0, ends.get(tp, 0) - (done.offset if done is not None and done.offset >= 0 else 0))
            workers.append({"member": member_id, "host": host, "merger": merger, "partitions": partitions, "lag": lag})
        return {"group": s.consumer_group, "state": state, "members": len(workers), "workers": workers}

    async def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        if not tps:
            return {}
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            return dict(await consumer.end_offsets(tps))
        finally:
            await consumer.stop()
