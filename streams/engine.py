"""The KPI engine: parses records, folds them into entity states and counters, and produces snapshots.

Pure: no broker, database or event loop. The stream worker and `ioc replay` both drive this
class, which is what makes their results identical. Time only moves through `advance()`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ioc.contract import US
from ioc.registry import Registry
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER, TOPIC_SENSOR
from ioc.snapshot import Snapshot
from streams import cyber, dossier, sensor
from streams.anomaly import Detectors
from streams.anomaly_config import AnomalyConfig
from streams.kpi import US_PER_MIN, Contribution, Counters, KpiSpec, Value, published, status_of
from streams.windows import TZ

log = logging.getLogger(__name__)

#: Terminal dossiers and incidents whose last event is older than this are dropped from memory:
#: every window they could count in has closed (month-to-date is the longest).
ENTITY_HORIZON_US = 40 * 86400 * US
#: A dropped entity's id is remembered this much longer, so a re-sent event of it changes nothing
#: (Kafka keeps a week by default; replays older than this meet the database lookup of the worker).
TOMBSTONE_US = 60 * 86400 * US


class EntityState(Protocol):
    last_event: int

    @property
    def terminal(self) -> bool: ...
    def merge(self, p: Any) -> bool: ...
    def kpi_key(self) -> tuple[Any, ...]: ...
    def from_key(self, key: tuple[Any, ...]) -> EntityState: ...
    def scopes(self) -> tuple[str, ...]: ...
    def contributions(self) -> dict[Contribution, int]: ...


@dataclass(frozen=True)
class Kind:
    """One event kind: its topic, parser, state type and KPIs."""

    name: str
    topic: str
    parse: Callable[..., tuple[str, Any]]
    state: Callable[[str], EntityState] | None
    kpis: tuple[KpiSpec, ...]


DOSSIER = Kind("dossier", TOPIC_DOSSIER, dossier.parse, dossier.DossierState, dossier.KPIS)
CYBER = Kind("cyber", TOPIC_CYBER, cyber.parse, cyber.IncidentState, cyber.KPIS)
SENSOR = Kind("sensor", TOPIC_SENSOR, sensor.parse, None, ())
KINDS = {k.topic: k for k in (DOSSIER, CYBER, SENSOR)}


class EntityAggregator:
    """Entity states of one kind and the counters they contribute to, updated by difference."""

    def __init__(self, kind: Kind, now_us: int) -> None:
        assert kind.state is not None
        self.kind = kind
        self.new_state = kind.state
        self.states: dict[str, EntityState] = {}
        self.counters = Counters(now_us)
        self.scopes: set[str] = set()
        self.dirty: set[str] = set()
        #: Entities changed since the sink last took them.
        self.changed: dict[str, EntityState] = {}
        #: Ids of entities dropped by `prune`, with when they were dropped (µs).
        self.tombstones: dict[str, int] = {}

    def apply(self, key: str, parsed: Any, *, record: bool = True) -> bool:
        state = self.states.get(key)
        if state is None and self.tombstones and key in self.tombstones:
            return False  # finished long ago and forgotten: a re-sent event of it changes nothing
        old_key: tuple[Any, ...] | None
        if state is None:
            state = self.new_state(key)
            old_key = None
            self.states[key] = state
        else:
            old_key = state.kpi_key()
        if not state.merge(parsed):
            return False
        if record:
            self.changed[key] = state
        if old_key is not None and state.kpi_key() == old_key:
            return True  # e.g. a `processing` step: nothing any KPI reads has changed
        new, new_scopes = state.contributions(), state.scopes()
        # The hottest loop of the worker: Counters.add inlined (same key: series, scopes, minute).
        pending = self.counters.pending
        if old_key is None:  # a new entity: everything it contributes is an addition
            for (name, ts), amount in new.items():
                k = (name, new_scopes, ts // US_PER_MIN)
                pending[k] = pending.get(k, 0) + amount
            self.scopes.update(new_scopes)
            self.dirty.update(new_scopes)
            return True
        before = state.from_key(old_key)
        old, old_scopes = before.contributions(), before.scopes()
        if old_scopes == new_scopes:
            for c, amount in new.items():
                delta = amount - old.pop(c, 0)
                if delta:
                    k = (c[0], new_scopes, c[1] // US_PER_MIN)
                    pending[k] = pending.get(k, 0) + delta
            for (name, ts), amount in old.items():  # what only the old state contributed
                if amount:
                    k = (name, new_scopes, ts // US_PER_MIN)
                    pending[k] = pending.get(k, 0) - amount
        else:
            add = self.counters.add
            for (name, ts), amount in old.items():
                add(name, old_scopes, ts, -amount)
            for (name, ts), amount in new.items():
                add(name, new_scopes, ts, amount)
            self.scopes.update(new_scopes)
            self.dirty.update(old_scopes)
        self.dirty.update(new_scopes)
        return True

    def load(self, key: str, state: EntityState) -> None:
        """Adopt a state rebuilt from the database (not recorded as changed)."""
        self.states[key] = state
        scopes = state.scopes()
        for (name, ts), amount in state.contributions().items():
            self.counters.add(name, scopes, ts, amount)
        self.scopes.update(state.scopes())
        self.dirty.update(state.scopes())

    def prune(self, now_us: int) -> int:
        horizon = now_us - ENTITY_HORIZON_US
        gone = [k for k, s in self.states.items() if s.terminal and s.last_event < horizon]
        for k in gone:
            del self.states[k]
            self.tombstones[k] = now_us
        for k in [k for k, at in self.tombstones.items() if at < now_us - TOMBSTONE_US]:
            del self.tombstones[k]
        self.counters.prune()
        return len(gone)

    def unknown_and_old(self, key: str, t: int, now_us: int) -> bool:
        """An event for an entity not in memory, older than the horizon: maybe one dropped before a
        restart, which the worker looks up in the database before applying the event."""
        return t < now_us - ENTITY_HORIZON_US and key not in self.states and key not in self.tombstones

    def values(self, as_of_us: int, scopes: Iterable[str]) -> Iterable[tuple[str, str, str, str, Value]]:
        r = self.counters.reader(as_of_us)
        for scope in scopes:
            for spec, window in published(self.kind.kpis, scope):
                yield spec.name, spec.unit, scope, window, spec.compute(r, scope, window)


class Engine:
    """Every KPI of the catalogue, fed one validated event at a time."""

    def __init__(self, registry: Registry, now_us: int, anomaly: AnomalyConfig | None = None) -> None:
        self.registry = registry
        self.now_us = now_us
        #: The worker's input watermark: the event time every input partition still behind its log's
        #: end has reached (None: no such partition). The detectors judge no minute past it: while a
        #: backlog is read, partitions are a day or two apart in event time (a fetch is up to 1 MB of
        #: one partition), and a minute judged before its receipts arrive enters the baseline short.
        self.input_low_us: int | None = None
        #: The anomaly detectors (`streams.anomaly`), driven by the same event times as the KPIs.
        self.anomaly = Detectors(registry, anomaly)
        # The surge detector counts the receipts this process folds itself; on the merger of several
        # workers it also reads the other partitions' from their partials (streams.shards).
        self.anomaly.receipts_source = self.remote_receipts_between
        self._receipt_keys = [(code, ("recv", f"commune:{code}")) for code in sorted(registry.units)]
        self.dossiers = EntityAggregator(DOSSIER, now_us)
        self.incidents = EntityAggregator(CYBER, now_us)
        self.sensor_counters = Counters(now_us)
        self.sensors = sensor.SensorAggregator(registry, self.sensor_counters)
        self.entities = {DOSSIER.topic: self.dossiers, CYBER.topic: self.incidents}
        #: Last published (value, numerator, denominator, status, extra) and seq per series key.
        self.last: dict[str, tuple[Any, ...]] = {}
        self.seq: dict[str, int] = {}
        self._all_dirty = True

    # --- input ------------------------------------------------------------------------------

    def parse(self, topic: str, raw: bytes, produced_us: int | None = None) -> tuple[str, Any]:
        """Validate one record of a (logical) input topic (produced at ``produced_us``, µs since the
        epoch, when known); raises `InvalidEvent`."""
        return KINDS[topic].parse(raw, self.registry, produced_us)

    def apply(self, topic: str, key: str, parsed: Any, *, record: bool = True) -> bool:
        """Fold one validated event in; False when it changed nothing (a duplicate)."""
        return self.applier(topic)(key, parsed, record=record)

    def applier(self, topic: str) -> Callable[..., bool]:
        """`apply` for the events of one topic, without the dispatch (the worker's batch loop takes
        it once per partition)."""
        if topic == SENSOR.topic:
            return self.sensors.apply  # the detectors read the stations' readings themselves
        return self.with_detectors(topic, self.entities[topic].apply)

    def with_detectors(self, topic: str, fold: Callable[..., bool]) -> Callable[..., bool]:
        """``fold`` (an entity aggregator's ``apply``: this engine's, or a dossier shard's) that
        also tells the anomaly detectors of each new receipt or detection it takes in."""
        if not self.anomaly.config.enabled or topic == SENSOR.topic:
            return fold
        if topic == DOSSIER.topic:
            on_dossier = self.anomaly.on_dossier

            def apply_dossier(key: str, parsed: Any, *, record: bool = True) -> bool:
                if not fold(key, parsed, record=record):
                    return False
                e = parsed.event
                if e.type == "received":
                    on_dossier(parsed.t, e.commune_code)
                return True

            return apply_dossier
        on_incident = self.anomaly.on_incident

        def apply_incident(key: str, parsed: Any, *, record: bool = True) -> bool:
            if not fold(key, parsed, record=record):
                return False
            e = parsed.event
            if e.type == "detected":
                on_incident(parsed.t, e.category, e.system)
            return True

        return apply_incident

    def remote_receipts_between(self, m_from: int, m_to: int) -> dict[str, int]:
        """Dossiers received per commune in minutes [m_from, m_to) in the partitions other workers fold, as
        their last partials hold them (the merger's `shards.MergedAggregator`); none on a single engine."""
        remote = getattr(self.dossiers, "remote_counters", None)
        if remote is None:
            return {}
        out: dict[str, int] = {}
        for counters in remote():
            counters.flush()
            series_of = counters.series
            for code, key in self._receipt_keys:
                s = series_of.get(key)
                if s is None:
                    continue
                minutes = s.minutes
                n = sum(minutes.get(m, 0) for m in range(m_from, m_to))
                if n:
                    out[code] = out.get(code, 0) + n
        return out

    def advance(self, now_us: int) -> None:
        """Move the clock forward (sliding windows slide, overdue counts grow, stations go offline)."""
        if now_us <= self.now_us:
            return
        moved = False
        for counters in (self.dossiers.counters, self.incidents.counters, self.sensor_counters):
            moved = counters.advance(now_us) or moved
        self.now_us = now_us
        if moved:
            self._all_dirty = True
        self._detect()

    def _detect(self) -> None:
        """Run the anomaly detectors up to the event-time watermark (never past the clock)."""
        if not self.anomaly.config.enabled:
            return
        cfg = self.anomaly.config
        seen = sorted(s.last_seen for s in self.sensors.stations.values() if s.last_seen is not None)
        # A low quantile of the stations' latest readings, not the newest: Kafka partitions are read
        # unevenly (a backfill's partitions can be an hour apart in event time), and a bucket must
        # not be judged before most stations have reported past it. Silent stations (or none, for
        # dossiers and incidents alone) hold it back at most ``max_lag_s``.
        low = seen[int(cfg.watermark_quantile * (len(seen) - 1))] if seen else 0
        newest = max(seen[-1] if seen else 0, self.anomaly.max_event_us)
        watermark = min(max(low, newest - cfg.max_lag_s * 1_000_000), self.now_us)
        if self.input_low_us is not None:
            watermark = min(watermark, self.input_low_us)
        self.anomaly.advance(watermark, self.sensors.stations)
        changed = self.anomaly.take_changed_stations()
        if changed:
            self.sensors.dirty.update(changed)

    def prune(self) -> None:
        for agg in (self.dossiers, self.incidents):
            agg.prune(self.now_us)
        self.sensor_counters.prune()
        self.sensors.prune(self.now_us)

    # --- output -----------------------------------------------------------------------------

    def restore_published(self, seqs: dict[str, int]) -> None:
        """Continue every series after a restart from the ``seq`` the database holds for it.

        The worker may publish an emission before writing it to the database (never a series'
        first snapshot), and writes it before publishing the next (`streams.worker.Ingest.emit`),
        so subscribers may have seen one seq more than the database holds. Every series continues
        two past the database, newer than anything seen; and since the value last published is not
        known for sure, the first emission after a restart publishes every series (subscribers then
        hold what the database holds).
        """
        self.seq = {key: seq + 1 for key, seq in seqs.items()}

    def snapshots(self, *, changed_only: bool = True) -> list[Snapshot]:
        """Snapshots as of the clock: only the changed ones (the worker), or all (replay)."""
        as_of_us = self.now_us
        all_dirty = self._all_dirty or not changed_only
        out: list[Snapshot] = []
        for agg in (self.dossiers, self.incidents):
            scopes = agg.scopes if all_dirty else agg.dirty
            for kpi, unit, scope, window, value in agg.values(as_of_us, sorted(scopes)):
                self._emit(out, kpi, unit, scope, window, value, as_of_us, changed_only)
            agg.dirty.clear()
        for kpi, unit, scope, window, value in self._sensor_values(as_of_us, all_dirty):
            self._emit(out, kpi, unit, scope, window, value, as_of_us, changed_only)
        self.sensors.dirty.clear()
        self._all_dirty = False
        return out

    def _emit(
        self,
        out: list[Snapshot],
        kpi: str,
        unit: str,
        scope: str,
        window: str,
        value: Value,
        as_of_us: int,
        changed_only: bool,
    ) -> None:
        v, num, den, extra = value
        target = self.registry.targets.get(kpi)
        status = status_of(v, target, self.registry.warn_band)
        key = f"{kpi}|{scope}|{window}"
        quality = self.anomaly.quality(scope[8:]) if scope.startswith("station:") else None
        fingerprint = (v, num, den, status, extra, quality)
        if changed_only and self.last.get(key) == fingerprint:
            return
        if changed_only or key not in self.seq:
            self.seq[key] = self.seq.get(key, 0) + 1
            self.last[key] = fingerprint
        out.append(
            Snapshot(
                kpi=kpi,
                scope=scope,
                window=window,
                value=v,
                unit=unit,
                numerator=num,
                denominator=den,
                target=target.value if target else None,
                status=status,
                as_of=dt.datetime.fromtimestamp(as_of_us / US, TZ),
                seq=self.seq[key],
                extra=extra,
                quality=quality,
            )
        )

    def _sensor_values(self, as_of: int, all_dirty: bool) -> Iterable[tuple[str, str, str, str, Value]]:
        """Station KPIs for dirty stations, then commune and province aggregates over all stations."""
        reg = self.registry
        r = self.sensor_counters.reader(as_of)
        per_station: dict[str, dict[tuple[str, str], tuple[str, Value]]] = {}
        dirty = set(self.sensors.stations) if all_dirty else set(self.sensors.dirty)
        communes = {reg.stations[s].commune_code for s in dirty}
        needed = {s for s in self.sensors.stations if reg.stations[s].commune_code in communes}
        for sid in sorted(needed):
            per_station[sid] = {
                (kpi, window): (unit, value) for kpi, unit, window, value in self.sensors.station_values(sid, as_of, r)
            }
            if sid in dirty:
                for (kpi, window), (unit, value) in per_station[sid].items():
                    yield kpi, unit, f"station:{sid}", window, value
        # Commune = the worst station; the province = the worst commune.
        aggregates = (
            ("env.aqi", "now", "VN_AQI"),
            ("env.aqi", "today", "VN_AQI"),
            ("water.alarm_level", "now", "level"),
            ("rain.mm", "1h", "mm"),
            ("rain.mm", "24h", "mm"),
        )
        for code in sorted(communes):
            stations = [s.station_id for s in reg.stations_in(code)]
            for kpi, window, unit in aggregates:
                worst = _worst(per_station, stations, kpi, window)
                if worst is not None:
                    yield kpi, unit, f"commune:{code}", window, worst
            offline = self.sensors.offline(as_of, (self.sensors.stations[s] for s in stations))
            yield (
                "sensor.offline",
                "stations",
                f"commune:{code}",
                "now",
                (float(len(offline)), None, float(len(stations)), {"stations": offline}),
            )
        if communes:
            # The province needs every station's values; recompute those not already at hand.
            for sid in sorted(set(self.sensors.stations) - set(per_station)):
                per_station[sid] = {
                    (kpi, window): (unit, value)
                    for kpi, unit, window, value in self.sensors.station_values(sid, as_of, r)
                }
            everyone = sorted(self.sensors.stations)
            for kpi, window, unit in aggregates:
                worst = _worst(per_station, everyone, kpi, window)
                if worst is not None:
                    yield kpi, unit, "province", window, worst
            offline = self.sensors.offline(as_of, self.sensors.stations.values())
            yield (
                "sensor.offline",
                "stations",
                "province",
                "now",
                (float(len(offline)), None, float(len(everyone)), {"stations": offline}),
            )


def _worst(
    per_station: dict[str, dict[tuple[str, str], tuple[str, Value]]], stations: Iterable[str], kpi: str, window: str
) -> Value | None:
    """The worst station's value; a null value when stations publish this KPI but none has a value
    now (so a commune's stale value does not linger); None when no station publishes it at all."""
    best: tuple[float, str] | None = None
    chosen: Value | None = None
    publishes = False
    for sid in stations:
        entry = per_station.get(sid, {}).get((kpi, window))
        if entry is None:
            continue
        publishes = True
        if entry[1][0] is None:
            continue
        v = entry[1][0]
        assert v is not None
        if best is None or (v, sid) > best:
            best, chosen = (v, sid), entry[1]
    if chosen is None:
        return (None, None, None, {"station": None}) if publishes else None
    extra = dict(chosen[3] or {})
    extra["station"] = best[1] if best else None
    return chosen[0], None, None, extra
