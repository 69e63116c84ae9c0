"""Sharded dossier partitions merged from their partials equal one engine over every event; the merge
is idempotent (a partial again, or an older one, changes nothing); the assignor deals fairly."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random

import pytest

from ioc.errors import InvalidEvent
from ioc.registry import Registry, load_registry
from simulators.stream import generate
from streams import shards
from streams.anomaly_config import AnomalyConfig, SurgeConfig
from streams.engine import DOSSIER, Engine, EntityAggregator

VN = dt.timezone(dt.timedelta(hours=7))
US = 1_000_000
PARTITIONS = 4


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


def _events(registry: Registry, seed: int) -> list[tuple[str, object]]:
    now = dt.datetime(2026, 3, 31, 23, 50, tzinfo=VN)  # a day and a month end inside the window
    out = []
    for r in generate(seed, now - dt.timedelta(minutes=90), 15.0, None, 0.05, 0.05, until=now):
        if r.topic != DOSSIER.topic:
            continue
        try:
            out.append(DOSSIER.parse(r.value, registry, None))
        except InvalidEvent:
            continue
    return out


def _dossier_snapshots(engine: Engine) -> dict[tuple[str, str, str], tuple[object, ...]]:
    return {
        (s.kpi, s.scope, s.window): (s.value, s.numerator, s.denominator, s.status, s.extra)
        for s in engine.snapshots(changed_only=False)
        if s.kpi in {spec.name for spec in DOSSIER.kpis}
    }


def _merger(registry: Registry, now_us: int) -> tuple[Engine, shards.MergedAggregator]:
    engine = Engine(registry, now_us)
    merged = shards.MergedAggregator(DOSSIER, now_us)
    engine.dossiers = merged  # type: ignore[assignment]
    del engine.entities[DOSSIER.topic]
    return engine, merged


def test_partials_merged_equal_one_engine_at_any_later_clock(registry: Registry) -> None:
    events = _events(registry, 5)
    assert len(events) > 1000
    start_us = dt.datetime(2026, 3, 31, 22, 0, tzinfo=VN).timestamp()
    t0 = int(start_us * US)
    whole = Engine(registry, t0)
    parts = {p: EntityAggregator(DOSSIER, t0) for p in range(PARTITIONS)}
    for key, parsed in events:
        whole.apply(DOSSIER.topic, key, parsed)
        parts[shards.partition_of(key, PARTITIONS)].apply(key, parsed)
    assert all(agg.states for agg in parts.values())
    engine, merged = _merger(registry, t0)
    for p, agg in parts.items():
        raw = shards.encode_partial(DOSSIER.topic, p, shards.Stamp(1, 1, 1), agg)
        assert merged.apply_partial(shards.decode_partial(raw))
    # Clocks across the end of the hour, the day and the month (sliding and calendar windows move).
    for later in (0, 30 * 60, 2 * 3600 + 5, 26 * 3600):
        now = t0 + later * US
        whole.advance(now)
        engine.advance(now)
        expected = _dossier_snapshots(whole)
        assert expected
        assert _dossier_snapshots(engine) == expected


def test_the_merger_reads_the_other_partitions_receipts_per_commune_and_minute(registry: Registry) -> None:
    """What the surge detector counts: on a merger holding 4 partitions as partials, what one engine
    folding every event tells its detectors."""
    events = _events(registry, 6)
    t0 = int(dt.datetime(2026, 3, 31, 22, 0, tzinfo=VN).timestamp() * US)
    whole = Engine(registry, t0)
    parts = {p: EntityAggregator(DOSSIER, t0) for p in range(PARTITIONS)}
    for key, parsed in events:
        whole.apply(DOSSIER.topic, key, parsed)
        parts[shards.partition_of(key, PARTITIONS)].apply(key, parsed)
    engine, merged = _merger(registry, t0)
    for p, agg in parts.items():
        merged.apply_partial(shards.decode_partial(shards.encode_partial(DOSSIER.topic, p, shards.Stamp(1, 1, 1), agg)))
    assert whole.remote_receipts_between(0, 1 << 40) == {}  # one engine: every receipt is its own
    m0 = t0 // (60 * US)  # the events span 22:20-23:50
    for m_from, m_to in ((m0, m0 + 120), (m0 + 30, m0 + 31), (m0 + 60, m0 + 120)):
        expected = whole.anomaly._receipt_counts(m_from, m_to)
        assert engine.anomaly._receipt_counts(m_from, m_to) == expected
    assert sum(whole.anomaly._receipt_counts(m0, m0 + 120).values()) > 100


def _received(registry: Registry, dossier_id: str, commune: str, t: dt.datetime) -> tuple[str, object]:
    doc = {"schema": "ioc.dossier.v1", "event_id": f"e-{dossier_id}", "dossier_id": dossier_id, "type": "received",
           "occurred_at": t.isoformat(), "commune_code": commune, "agency_code": f"UBND-{commune}",
           "procedure_code": "P1", "channel": "in_person", "full_online": False,
           "due_at": (t + dt.timedelta(days=5)).isoformat()}  # fmt: skip
    return DOSSIER.parse(json.dumps(doc).encode(), registry, None)


@pytest.mark.parametrize(("partials_during_surge", "found"), [(True, True), (False, False)])
def test_the_merger_finds_a_surge_in_a_partition_another_worker_owns(
    registry: Registry, partials_during_surge: bool, found: bool
) -> None:
    """The merger owns partition 0 (Vinh's ward 16681, steady); partition 1 (Nam Đàn) is another worker's
    and reaches the merger as partials only. A week of 5 receipts an hour in each, then 30 in Nam Đàn in
    one hour: found when that hour's partials reach the merger before its minutes are judged."""
    config = AnomalyConfig(max_lag_s=0, surge=dataclasses.replace(SurgeConfig(), weeks=1, min_weeks=1))
    h = dt.timedelta(hours=1)
    t0 = dt.datetime(2026, 10, 5, 0, 0, tzinfo=VN)
    t0_us = int(t0.timestamp() * US)
    engine = Engine(registry, t0_us, config)
    merged = shards.MergedAggregator(DOSSIER, t0_us)
    engine.dossiers = merged  # type: ignore[assignment]
    local, remote = EntityAggregator(DOSSIER, t0_us), EntityAggregator(DOSSIER, t0_us)
    merged.bind_local(0, shards.Stamp(1, 1, shards.LOCAL_SEQ), local)
    apply_local = engine.with_detectors(DOSSIER.topic, local.apply)
    ids = (f"D-{i}" for i in range(10**9))
    surge_at = t0 + 7 * 24 * h + 9 * h
    hour, seq, findings = t0, 0, []
    while hour < surge_at + 2 * h:
        for commune, partition, n in (("16681", 0, 5), ("17935", 1, 30 if hour == surge_at else 5)):
            for k in range(n):
                dossier = next(i for i in ids if shards.partition_of(i, 2) == partition)
                key, parsed = _received(registry, dossier, commune, hour + dt.timedelta(minutes=20, seconds=k))
                (apply_local if partition == 0 else remote.apply)(key, parsed)
        if partials_during_surge or not surge_at <= hour < surge_at + 2 * h:
            seq += 1
            raw = shards.encode_partial(DOSSIER.topic, 1, shards.Stamp(1, 1, seq), remote)
            merged.apply_partial(shards.decode_partial(raw))
        hour += h
        engine.advance(int((hour + dt.timedelta(minutes=2, seconds=10)).timestamp() * US))
        findings += engine.anomaly.take()
    surges = [f.scope for f in findings if f.detector == "dossier_surge" and f.active]
    assert surges == (["commune:17935"] if found else [])


def test_partials_again_or_older_change_nothing(registry: Registry) -> None:
    events = _events(registry, 8)
    t0 = int(dt.datetime(2026, 3, 31, 22, 0, tzinfo=VN).timestamp() * US)
    agg = EntityAggregator(DOSSIER, t0)
    half = len(events) // 2
    for key, parsed in events[:half]:
        agg.apply(key, parsed)
    older = shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(3, 10, 1), agg)
    for key, parsed in events[half:]:
        agg.apply(key, parsed)
    newer = shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(3, 10, 2), agg)
    stale_owner = shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(2, 99, 50), agg)

    engine, merged = _merger(registry, t0)
    assert merged.apply_partial(shards.decode_partial(newer))
    engine.advance(t0 + 3600 * US)
    before = _dossier_snapshots(engine)
    rng = random.Random(1)
    for raw in rng.sample([older, newer, stale_owner, newer], 4):
        assert not merged.apply_partial(shards.decode_partial(raw))
    assert _dossier_snapshots(engine) == before


def test_a_later_owner_replaces_every_series_of_the_partition(registry: Registry) -> None:
    """A new epoch's partial replaces the partition's counters whole: series it lacks are gone."""
    events = _events(registry, 9)
    t0 = int(dt.datetime(2026, 3, 31, 22, 0, tzinfo=VN).timestamp() * US)
    first, second = EntityAggregator(DOSSIER, t0), EntityAggregator(DOSSIER, t0)
    for key, parsed in events:
        first.apply(key, parsed)
    for key, parsed in events[: len(events) // 3]:
        second.apply(key, parsed)
    engine, merged = _merger(registry, t0)
    merged.apply_partial(shards.decode_partial(shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(1, 1, 9), first)))
    merged.apply_partial(shards.decode_partial(shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(2, 1, 1), second)))
    only = Engine(registry, t0)
    for key, parsed in events[: len(events) // 3]:
        only.apply(DOSSIER.topic, key, parsed)
    assert _dossier_snapshots(engine) == _dossier_snapshots(only)


@pytest.mark.parametrize("members", [1, 2, 3, 4, 6, 7])
def test_deal_is_even_and_keeps_what_members_own(members: int) -> None:
    partitions = list(range(6))
    ids = [f"m{i}" for i in range(members)]
    out = shards.deal(partitions, ids, "m0", {})
    assert sorted(p for ps in out.values() for p in ps) == partitions
    sizes = [len(ps) for ps in out.values()]
    assert max(sizes) - min(sizes) <= 1
    if members < 6 and 6 % members:
        assert len(out["m0"]) == min(sizes)  # the merger takes the smaller share
    # A member joins: the others keep what they can.
    joined = shards.deal(partitions, [*ids, "new"], "m0", out)
    kept = sum(len(set(joined[m]) & set(out[m])) for m in ids)
    assert kept >= len(partitions) - len(joined["new"]) - members
    assert sorted(p for ps in joined.values() for p in ps) == partitions


def test_partition_of_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for key in ("HS-000001", "dossier-ẞ-17", "x"):
        assert shards.partition_of(key, 6) == DefaultPartitioner()(key.encode(), list(range(6)), list(range(6)))


class _Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(range(self.partitions[topic]))


def _assign(members: dict[str, dict[str, object]]) -> dict[str, dict[str, list[int]]]:
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

    assignor = shards.assignor_for("d")
    topics = ["d", "c", "s"]
    metas = {m: ConsumerProtocolMemberMetadata(0, topics, json.dumps(info).encode()) for m, info in members.items()}
    out = assignor.assign(_Cluster({"d": 6, "c": 6, "s": 6}), metas)
    return {m: dict(a.assignment) for m, a in out.items()}


def test_the_merger_stays_and_a_survivor_replaces_a_lost_one() -> None:
    # The merger keeps its role when a member joins.
    out = _assign({"b": {"merger": True, "owned": [0, 1, 2]}, "c": {"owned": [3, 4, 5]}, "a": {}})
    assert out["b"]["c"] == list(range(6)) and out["b"]["s"] == list(range(6))
    assert "c" not in out["a"] and "c" not in out["c"]
    assert sorted(p for a in out.values() for p in a.get("d", [])) == list(range(6))
    # The merger is gone: the survivor owning partitions takes over, not the restarted "a".
    out = _assign({"c": {"owned": [3, 4, 5]}, "a": {}})
    assert out["c"]["c"] == list(range(6))
    assert out["c"]["d"] == [3, 4, 5] or len(out["c"]["d"]) == 3


def test_a_local_shard_is_read_live_and_its_own_partials_do_not_replace_it(registry: Registry) -> None:
    events = _events(registry, 12)
    t0 = int(dt.datetime(2026, 3, 31, 22, 0, tzinfo=VN).timestamp() * US)
    shard = EntityAggregator(DOSSIER, t0)
    whole = Engine(registry, t0)
    engine, merged = _merger(registry, t0)
    merged.bind_local(0, shards.Stamp(4, 7, shards.LOCAL_SEQ), shard)
    early = shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(4, 7, 1), shard)
    for key, parsed in events:
        shard.apply(key, parsed)
        whole.apply(DOSSIER.topic, key, parsed)
    merged.take_local(shard)
    assert shards.peek(early) == ("", DOSSIER.topic, 0, shards.Stamp(4, 7, 1))
    assert not merged.apply_partial(shards.decode_partial(early))  # its own, read back: older
    assert _dossier_snapshots(engine) == _dossier_snapshots(whole)  # live, not as of the partial
    # A later owner's partial (the partition moved away and back) replaces the live view.
    other = EntityAggregator(DOSSIER, t0)
    assert merged.apply_partial(
        shards.decode_partial(shards.encode_partial(DOSSIER.topic, 0, shards.Stamp(5, 1, 1), other))
    )
    # Scopes once seen stay published (as one engine keeps them), now with nothing counted.
    assert {v[0] for v in _dossier_snapshots(engine).values()} <= {0.0, None}
