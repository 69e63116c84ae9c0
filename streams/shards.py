"""Scale-out: dossier partitions sharded over the group's workers, their partial counters merged by one merger.

Each worker folds the dossier partitions it owns into one `EntityAggregator` per partition (a
*shard*). Every emission interval a changed shard is published whole to the compacted topic
`ioc.kpi.partials` (key = consumer group, topic and partition): its ABSOLUTE integer counters (every series'
minute, day and month buckets and running sums, at the shard's clock), never a delta, stamped with
an epoch (the group generation that assigned the partition, and the wall clock then) and a
sequence number within the epoch. The merger (the one member the assignor gives every partition
of the low-volume topics) keeps the latest partial of every partition, by (epoch, sequence), and
reads each KPI as the sum of the partitions' counters at its own clock. Applying a partial again,
or an older one, changes nothing: the merge is idempotent under replay and rebalances.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
from aiokafka.partitioner import murmur2

from streams.engine import EntityAggregator, Kind
from streams.kpi import US_PER_MIN, Counters, Value, published
from streams.windows import Series, local_day_of, local_month_of

log = logging.getLogger(__name__)

#: The protocol name every member of the worker group must announce.
ASSIGNOR_NAME = "ioc-shards"

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the producers use) puts ``key`` in."""
    return int(murmur2(key.encode()) & 0x7FFFFFFF) % partitions


# --- partials ---------------------------------------------------------------------------------


#: The sequence of a shard the merger reads live: above any partial of the same assignment.
LOCAL_SEQ = 1 << 62


@dataclass(order=True, frozen=True)
class Stamp:
    """Orders the partials of one partition: a later owner's epoch wins, then the later sequence."""

    generation: int
    epoch_ns: int
    seq: int


def encode_partial(topic: str, partition: int, stamp: Stamp, agg: EntityAggregator, group: str = "") -> bytes:
    """One shard's whole state as counters: absolute, so the latest partial alone is enough."""
    counters = agg.counters
    counters.flush()
    series = [
        [name, scope, s.minutes, s.days, s.months, s.sum_1h, s.sum_24h, s.level]
        for (name, scope), s in counters.series.items()
    ]
    return _encode(
        {
            "group": group,
            "topic": topic,
            "partition": partition,
            "stamp": [stamp.generation, stamp.epoch_ns, stamp.seq],
            "now_m": counters.now_m,
            "scopes": sorted(agg.scopes),
            "series": series,
        }
    )


@dataclass
class Partial:
    group: str
    topic: str
    partition: int
    stamp: Stamp
    now_m: int
    scopes: list[str]
    series: dict[tuple[str, str], list[Any]]


def decode_partial(raw: bytes) -> Partial:
    doc = _decode(raw)
    g, e, n = doc["stamp"]
    return Partial(
        doc.get("group", ""),
        doc["topic"],
        int(doc["partition"]),
        Stamp(g, e, n),
        int(doc["now_m"]),
        list(doc["scopes"]),
        {(s[0], s[1]): s for s in doc["series"]},
    )


class _Header(msgspec.Struct):
    """The fields of a partial that say whose it is and how new (decoding skips the counters)."""

    group: str = ""
    topic: str = ""
    partition: int = -1
    stamp: tuple[int, int, int] = (0, 0, 0)


_decode_header = msgspec.msgpack.Decoder(_Header).decode


def peek(raw: bytes) -> tuple[str, str, int, Stamp]:
    """(group, topic, partition, stamp) of an encoded partial, without decoding its counters."""
    h = _decode_header(raw)
    return h.group, h.topic, h.partition, Stamp(*h.stamp)


def _series(raw: list[Any]) -> Series:
    """A `Series` from a decoded partial (msgpack keeps the buckets' integer keys; the decoded dicts
    are fresh, so they are adopted, not copied)."""
    s = Series()
    s.minutes, s.days, s.months = raw[2], raw[3], raw[4]
    s.sum_1h, s.sum_24h, s.level = raw[5], raw[6], raw[7]
    return s


@dataclass
class _Part:
    stamp: Stamp
    counters: Counters
    raw: dict[tuple[str, str], list[Any]] = field(default_factory=dict)


class MergedCounters:
    """The latest counters of every partition, moved with the merger's clock."""

    def __init__(self, now_us: int) -> None:
        self.now_us = now_us
        self.parts: dict[int, _Part] = {}

    def advance(self, now_us: int) -> bool:
        moved = False
        for part in self.parts.values():
            moved = part.counters.advance(now_us) or moved
        self.now_us = max(self.now_us, now_us)
        return moved

    def prune(self) -> None:
        for part in self.parts.values():
            part.counters.prune()

    def reader(self, as_of_us: int) -> SumReader:
        parts = [p.counters for p in self.parts.values()]
        for counters in parts:
            counters.flush()  # a live local shard may hold additions not folded yet
        return SumReader(parts, as_of_us)


class SumReader:
    """``r(series, scope, window)`` summed over the partitions: every window is a sum of buckets."""

    __slots__ = ("day", "month", "parts")

    def __init__(self, parts: list[Counters], as_of_us: int) -> None:
        self.parts = [c.series for c in parts]
        ts = as_of_us // 1_000_000
        self.day = local_day_of(ts)
        self.month = local_month_of(ts)

    def __call__(self, name: str, scope: str, window: str) -> int:
        total = 0
        key = (name, scope)
        for series_of in self.parts:
            s = series_of.get(key)
            if s is not None:
                total += s.window(window, self.day, self.month)
        return total


class MergedAggregator:
    """Stands in for the engine's dossier aggregator on the merger: KPIs from the partitions' partials."""

    def __init__(self, kind: Kind, now_us: int) -> None:
        self.kind = kind
        self.counters = MergedCounters(now_us)
        self.scopes: set[str] = set()
        self.dirty: set[str] = set()
        #: The sink's view (`streams.sink.take_changes`): the merger's aggregate changes no entity.
        self.changed: dict[str, Any] = {}
        self.states: dict[str, Any] = {}

    def apply_partial(self, p: Partial) -> bool:
        """Adopt ``p`` if it is newer than what is held for its partition; True if it was."""
        held = self.parts.get(p.partition)
        if held is not None and p.stamp <= held.stamp:
            return False
        counters = Counters(p.now_m * US_PER_MIN)
        old = held.raw if held is not None else {}
        dirty = self.dirty
        for key, raw in p.series.items():
            counters.series[key] = _series(raw)
            if old.get(key) != raw:
                dirty.add(key[1])
        for key in old.keys() - p.series.keys():
            dirty.add(key[1])
        if counters.now_m * US_PER_MIN < self.counters.now_us:
            counters.advance(self.counters.now_us)
        self.parts[p.partition] = _Part(p.stamp, counters, p.series)
        new_scopes = set(p.scopes) - self.scopes
        self.scopes.update(p.scopes)
        dirty.update(new_scopes)
        return True

    def bind_local(self, partition: int, stamp: Stamp, agg: EntityAggregator) -> None:
        """Read a shard of this process directly: its live counters stand for the partition (no
        encoding, no lag); its partials read back from the topic then change nothing."""
        self.parts[partition] = _Part(stamp, agg.counters)
        self.scopes.update(agg.scopes)
        self.dirty.update(agg.scopes)

    def take_local(self, agg: EntityAggregator) -> None:
        """What a local shard changed since the last emission."""
        if agg.dirty:
            self.dirty.update(agg.dirty)
            self.scopes.update(agg.dirty)
            agg.dirty.clear()

    def remote_counters(self) -> list[Counters]:
        """The latest partials' counters of the partitions other workers fold (`Engine.remote_receipts_between`
        reads their receipts for the detectors; this process's own shards tell them as they fold)."""
        return [part.counters for part in self.parts.values() if part.stamp.seq != LOCAL_SEQ]

    def held(self, partition: int) -> Stamp | None:
        part = self.parts.get(partition)
        return part.stamp if part is not None else None

    @property
    def parts(self) -> dict[int, _Part]:
        return self.counters.parts

    def stamps(self) -> dict[int, Stamp]:
        return {p: part.stamp for p, part in self.parts.items()}

    def prune(self, now_us: int) -> int:
        self.counters.prune()
        return 0

    def values(self, as_of_us: int, scopes: Iterable[str]) -> Iterable[tuple[str, str, str, str, Value]]:
        r = self.counters.reader(as_of_us)
        for scope in scopes:
            for spec, window in published(self.kind.kpis, scope):
                yield spec.name, spec.unit, scope, window, spec.compute(r, scope, window)  # type: ignore[arg-type]


# --- the assignor ------------------------------------------------------------------------------


class ShardAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Deals the sharded topic's partitions out evenly; every partition of the other topics goes to
    one member, the merger (`pick_merger`). Members announce in their metadata whether they are the
    merger and which dossier partitions they own."""

    name = ASSIGNOR_NAME
    version = 0
    #: The sharded (logical-prefixed) topic; set by `assignor_for`.
    sharded: str = ""
    #: Whether this process is the merger now (announced in its metadata).
    merger: bool = False
    #: Dossier partitions this process owns now (kept where balance allows).
    owned: tuple[int, ...] = ()

    @classmethod
    def assign(
        cls, cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        info: dict[str, dict[str, Any]] = {}
        for member, meta in members.items():
            try:
                info[member] = json.loads(meta.user_data or b"{}")
            except ValueError:
                info[member] = {}
        ids = sorted(members)
        merger = pick_merger(ids, info)
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        out: dict[str, dict[str, list[int]]] = {m: {} for m in ids}
        for topic in topics:
            partitions = sorted(cluster.partitions_for_topic(topic) or ())
            if topic != cls.sharded:
                out[merger][topic] = list(partitions)
                continue
            out_of = deal(partitions, ids, merger, {m: info[m].get("owned", []) for m in ids})
            for m, ps in out_of.items():
                if ps:
                    out[m][topic] = ps
        return {m: ConsumerProtocolMemberAssignment(cls.version, sorted(out[m].items()), b"") for m in ids}

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        user = json.dumps({"merger": cls.merger, "owned": list(cls.owned)}).encode()
        return ConsumerProtocolMemberMetadata(cls.version, list(topics), user)

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        pass


def pick_merger(ids: list[str], info: Mapping[str, Mapping[str, Any]]) -> str:
    """The merger stays where it is; if it is gone, the member owning the most dossier partitions (a
    survivor, warm) takes over rather than a worker that has just (re)started, which owns none."""
    mergers = [m for m in ids if info[m].get("merger")]
    if mergers:
        return mergers[0]
    return max(ids, key=lambda m: (len(info[m].get("owned", ())), [-ord(c) for c in m]))


def deal(
    partitions: list[int], members: list[str], merger: str, owned: Mapping[str, Iterable[int]]
) -> dict[str, list[int]]:
    """Partitions over members, at most one apart, each keeping what it owned where it can (fewer
    moves, fewer rebuilds); the merger, which also folds the other topics, takes the smaller share."""
    n = len(members)
    base, extra = divmod(len(partitions), n)
    # The members that take one more: not the merger when it can be avoided.
    order = [m for m in members if m != merger] + [merger]
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(order)}
    out: dict[str, list[int]] = {m: [] for m in members}
    free = set(partitions)
    for m in members:
        for p in sorted(set(owned.get(m, ())) & free):
            if len(out[m]) < quota[m]:
                out[m].append(p)
                free.discard(p)
    for p in sorted(free):
        m = min(order, key=lambda x: len(out[x]) - quota[x])
        out[m].append(p)
    return {m: sorted(ps) for m, ps in out.items()}


def assignor_for(sharded_topic: str) -> type[ShardAssignor]:
    """A class of its own per worker (aiokafka calls the assignor's class methods)."""
    return type("IocShardAssignor", (ShardAssignor,), {"sharded": sharded_topic, "merger": False, "owned": ()})
