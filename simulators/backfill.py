"""The back-fill: days of realistic past events, produced in event time, so a fresh system has history.

What it sends, for ``days`` before ``now`` (``ioc simulate --backfill DAYS``; ``ioc dev`` does 30):

* dossiers at a realistic provincial intake (``BackfillPlan.dossiers_per_day``, shaped by office
  hours) with their whole lifecycles: most complete on time, some late, some are returned or
  cancelled; steps that would fall after ``now`` are not sent (those dossiers are still open);
* SOC incidents, detected, acknowledged and resolved (or closed as false positives);
* every station's readings with their diurnal cycles, at the registry cadence (a day is 11,664
  readings), and one flood episode ``flood_ago`` before ``now``, which the gauges' 72-hour
  hydrographs show rising past the alarm levels and receding.

Intake and cadence are the same over the whole span, with no step anywhere: the anomaly detectors
(`streams.anomaly`) learn each commune's and station's normal from this past, and an earlier
back-fill that thinned its older weeks (a third of the intake, sensors six times slower) made them
read its steps as two dozen dossier surges, drifts and mute gauges on every fresh wall.

The worker folds these events in like any others; its clock is the wall clock, so its KPI history
starts now. The past of the history (``kpi_history``) is written here instead: the worker's own
`Engine` is run over the same events with its clock stepping through event time, and the values at
each step are stored as the history rows the worker would have written then (`KpiHistory`).
Everything is the same for a seed and a ``now``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import heapq
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from ioc.contract import INCIDENT_SEVERITIES, US
from ioc.registry import Registry, load_registry
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER, TOPIC_SENSOR, Settings
from ioc.snapshot import Snapshot
from simulators.dossiers import DossierSimulator, load_catalogue, mean_events_within
from simulators.envelope import VN_TZ, Event, to_millisecond
from simulators.incidents import PROVINCIAL_SYSTEMS, IncidentSimulator, commune_portals
from simulators.scenarios import build_scenario
from simulators.sensors import SensorConditions, SensorSimulator
from simulators.stream import INCIDENT_SHARE
from streams import cyber, dossier
from streams.engine import Engine
from streams.kpi import Value, ratio, status_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BackfillPlan:
    """How much history, and how dense (30 days are about 630,000 events: some 20 s to make on 2 cores)."""

    days: float = 30.0
    #: Nghệ An's one-stop offices take a few thousand dossiers a working day.
    dossiers_per_day: float = 3000.0
    incidents_per_day: float = 120.0
    #: The flood episode: when its rain begins (before now) and its span (`simulators.scenarios.Flood`: the
    #: river peaks at half-span and is back to normal at three spans, just before now, where live takes over).
    flood_ago: dt.timedelta = dt.timedelta(hours=64)
    flood_span: dt.timedelta = dt.timedelta(hours=21)
    #: Step of the KPI history written for the past (the live worker writes one every 10 s).
    history_step: dt.timedelta = dt.timedelta(minutes=15)


def backfill_events(
    seed: int | str,
    now: dt.datetime,
    plan: BackfillPlan,
    registry: Registry | None = None,
    future: list[Event] | None = None,
) -> Iterator[Event]:
    """The past ``plan.days`` before ``now``, every kind merged in event-time order (pure, seeded).

    Dossiers and incidents still open at ``now`` have steps to come: with ``future``, those are
    appended to it (in event-time order, once the past is exhausted) for the live simulator to send
    when their time comes (`simulators.stream.generate`'s ``continuation``). Without them, a
    back-filled dossier would never be completed, and the wall's overdue counts would climb all day.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    registry = registry or load_registry()
    start = now - dt.timedelta(days=plan.days)
    until = now - dt.timedelta(milliseconds=1)
    catalogue = load_catalogue(registry.units)
    systems = [*PROVINCIAL_SYSTEMS, *commune_portals(registry.units, catalogue.commune_agency)]
    flood = build_scenario(
        "flood", now - plan.flood_ago, span=plan.flood_span, stations=registry.stations, systems=systems
    )
    dossiers = DossierSimulator(
        random.Random(f"{seed}/backfill/dossiers"),
        catalogue,
        registry.units,
        dossiers_per_s=plan.dossiers_per_day / 86400,
        diurnal=True,
    )
    incidents = IncidentSimulator(
        random.Random(f"{seed}/backfill/incidents"), systems, incidents_per_s=plan.incidents_per_day / 86400
    )

    def sensor_conditions(t: dt.datetime) -> SensorConditions:
        # The gauges keep their cadence: a month of minute readings would cost more than it shows.
        return dataclasses.replace(flood.sensors(t), fast_kinds=frozenset())

    streams: list[Iterator[Event]] = [
        dossiers.events(start, until, follow_up=future is not None),
        incidents.events(start, until, follow_up=future is not None),
        SensorSimulator(
            random.Random(f"{seed}/backfill/sensors"), registry.stations, registry.units, conditions=sensor_conditions
        ).events(start, until),
    ]
    for event in heapq.merge(*streams, key=lambda e: e.at):
        event = dataclasses.replace(event, at=to_millisecond(event.at))
        if event.at <= until:
            yield event
        elif future is not None:  # only followed-up lifecycles reach past ``until``
            future.append(event)


class KpiHistory:
    """The past of the KPI history for the back-filled events, as the worker would have written it.

    Running the worker's `Engine` with its clock stepping through a month costs minutes (every
    counter slides minute by minute), so only what the wall's charts and the hourly rollups read is
    computed, hourly, from the same merged entity states (`DossierState`, `IncidentState`) and their
    `contributions()` the engine counts:

    * province: dossiers received, completed and the on-time rate (today), in progress and overdue,
      open incidents in all and by severity (now), every hour of the back-fill;
    * each commune: dossiers received and completed (today) hourly on today and on the same weekday
      a week ago, and open incidents by severity hourly over the last 24 hours;
    * each station: its KPIs from the engine's sensor side (only sensor events are applied to it, so
      stepping its clock is cheap), every ``step`` over the last ``station_hours`` (air stations
      hourly over the last 25 hours: their AQI is an hourly index).

    Rows are stamped one second before each boundary, so a bucket's last row is its end. Commune
    scopes of other KPIs, agency scopes and the other windows start with the live worker.
    """

    PROVINCE_DAY = (("dossier.received", "recv"), ("dossier.completed", "comp"))
    LEVELS = ("in_progress", "overdue", "open", *(f"open.{s}" for s in INCIDENT_SEVERITIES))

    def __init__(
        self, registry: Registry, start: dt.datetime, now: dt.datetime, step: dt.timedelta, station_hours: float = 72
    ) -> None:
        self.registry = registry
        self.start_us = int(start.timestamp() * US)
        self.now_us = int(now.timestamp() * US)
        self.step_us = int(step.total_seconds() * US)
        self.sensor_engine = Engine(registry, self.start_us)
        self.dossiers: dict[str, dossier.DossierState] = {}
        self.incidents: dict[str, cyber.IncidentState] = {}
        station_from = max(self.start_us, self.now_us - int(station_hours * 3600 * US))
        self.air_from_us = self.now_us - 25 * 3600 * US
        self.next_us = (station_from // self.step_us + 1) * self.step_us - US
        self.rows: list[Snapshot] = []

    def add(self, event: Event, raw: bytes) -> None:
        key, parsed = self.sensor_engine.parse(event.topic, raw)
        if event.topic == TOPIC_DOSSIER:
            self.dossiers.setdefault(key, dossier.DossierState(key)).merge(parsed)
        elif event.topic == TOPIC_CYBER:
            self.incidents.setdefault(key, cyber.IncidentState(key)).merge(parsed)
        else:
            while parsed.t > self.next_us:
                self._sample_stations(self.next_us)
                self.next_us += self.step_us
            self.sensor_engine.apply(event.topic, key, parsed, record=False)

    def finish(self) -> list[Snapshot]:
        """Every row: the stations' up to ``now``, then the hourly dossier and incident ones."""
        while self.next_us < self.now_us:
            self._sample_stations(self.next_us)
            self.next_us += self.step_us
        self._entity_rows()
        return self.rows

    def _sample_stations(self, at_us: int) -> None:
        engine = self.sensor_engine
        engine.advance(at_us)
        engine.prune()
        as_of = _local(at_us)
        hourly = (at_us + US) % HOUR_US == 0
        reader = engine.sensor_counters.reader(at_us)
        for sid in sorted(engine.sensors.stations):
            if self.registry.stations[sid].kind == "air" and not (hourly and at_us >= self.air_from_us):
                continue
            for kpi, unit, window, value in engine.sensors.station_values(sid, at_us, reader):
                self.rows.append(self._row(kpi, unit, f"station:{sid}", window, value, as_of))

    def _entity_rows(self) -> None:
        """Hourly sums per (counter, scope) of every entity's contributions, then the rows."""
        hourly: dict[tuple[str, str], dict[int, int]] = {}
        wanted = {"recv", "comp", "comp_ontime", "comp_due", *self.LEVELS}
        for states in (self.dossiers.values(), self.incidents.values()):
            for state in states:
                scopes = [sc for sc in state.scopes() if not sc.startswith("agency:")]
                for (name, ts), amount in state.contributions().items():
                    if name not in wanted or not amount:
                        continue
                    hour = _local_hour(ts)
                    for scope in scopes:
                        series = hourly.setdefault((name, scope), {})
                        series[hour] = series.get(hour, 0) + amount
        first, last = _local_hour(self.start_us), _local_hour(self.now_us)  # the current hour: live
        today = (last // 24) * 24
        chart_hours = {*range(today - 7 * 24, today - 6 * 24), *range(today, last)}
        last_day_hours = set(range(last - 24, last))
        scopes = ["province", *(f"commune:{c}" for c in sorted(self.registry.units))]
        for scope in scopes:
            province = scope == "province"
            running = dict.fromkeys(self.LEVELS, 0)
            daily = dict.fromkeys(("recv", "comp", "comp_ontime", "comp_due"), 0)
            for hour in range(first, last):
                if hour % 24 == 0:
                    daily = dict.fromkeys(daily, 0)
                for name in daily:
                    daily[name] += hourly.get((name, scope), {}).get(hour, 0)
                for name in running:
                    running[name] += hourly.get((name, scope), {}).get(hour, 0)
                as_of = _local(_hour_end_us(hour))
                if province or hour in chart_hours:
                    for kpi, name in self.PROVINCE_DAY:
                        self.rows.append(
                            self._row(kpi, "dossiers", scope, "today", (float(daily[name]), None, None, None), as_of)
                        )
                if province:
                    self.rows.append(
                        self._row(
                            "dossier.on_time_rate",
                            "%",
                            scope,
                            "today",
                            ratio(daily["comp_ontime"], daily["comp_due"], 100),
                            as_of,
                        )
                    )
                    for kpi, name, unit in (
                        ("dossier.in_progress", "in_progress", "dossiers"),
                        ("dossier.overdue", "overdue", "dossiers"),
                        ("cyber.open", "open", "incidents"),
                    ):
                        self.rows.append(
                            self._row(kpi, unit, scope, "now", (float(running[name]), None, None, None), as_of)
                        )
                if province or hour in last_day_hours:
                    for sev in INCIDENT_SEVERITIES:
                        value = (float(running[f"open.{sev}"]), None, None, None)
                        self.rows.append(self._row(f"cyber.open.{sev}", "incidents", scope, "now", value, as_of))

    def _row(self, kpi: str, unit: str, scope: str, window: str, value: Value, as_of: dt.datetime) -> Snapshot:
        v, num, den, extra = value
        target = self.registry.targets.get(kpi)
        return Snapshot(
            kpi=kpi,
            scope=scope,
            window=window,
            value=v,
            unit=unit,
            numerator=num,
            denominator=den,
            target=target.value if target else None,
            status=status_of(v, target, self.registry.warn_band),
            as_of=as_of,
            seq=0,
            extra=extra,
        )


HOUR_US = 3600 * US
_OFFSET_US = 7 * HOUR_US  # Asia/Ho_Chi_Minh, no daylight saving


def live_rate(plan: BackfillPlan, registry: Registry | None = None, dup_rate: float = 0.0) -> float:
    """Records per second at which `ioc simulate` goes on where the back-fill stops.

    The sensors at their cadence and the dossiers at ``plan.dossiers_per_day`` (shaped by office
    hours, `ioc simulate` does that after a back-fill), so the live intake is what the anomaly
    detectors learnt from the back-fill: twice as many dossiers would be a surge in every commune.
    """
    registry = registry or load_registry()
    catalogue = load_catalogue(registry.units)
    per_dossier = mean_events_within(catalogue, registry.units, dt.timedelta(days=400), dt.datetime.now(VN_TZ))
    dossier_records = plan.dossiers_per_day / 86400 * per_dossier
    return (SensorSimulator.readings_per_s(registry.stations) + dossier_records / (1 - INCIDENT_SHARE)) * (1 + dup_rate)


def _local_hour(ts_us: int) -> int:
    """Local hours since 1970-01-01 00:00 (+07:00); a multiple of 24 is a local midnight."""
    return (ts_us + _OFFSET_US) // HOUR_US


def _hour_end_us(hour: int) -> int:
    """One second before the end of local hour ``hour``."""
    return (hour + 1) * HOUR_US - _OFFSET_US - US


def _local(ts_us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts_us / US, VN_TZ)


@dataclass
class BackfillStats:
    events: int = 0
    #: The open lifecycles' steps still to come (after ``now``), for the live simulator.
    continuation: list[Event] = dataclasses.field(default_factory=list)
    by_topic: dict[str, int] = dataclasses.field(default_factory=dict)
    history_rows: int = 0
    elapsed_s: float = 0.0


class BackfillProgress:
    """A progress bar on stderr: one updating line on a TTY, else a line every 5 s."""

    WIDTH = 30

    def __init__(self, start: dt.datetime, now: dt.datetime, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = 0.25 if self.tty else 5.0
        self.start, self.span = start, (now - start).total_seconds()
        self._next = 0.0

    def update(self, at: dt.datetime, stats: BackfillStats, *, final: bool = False) -> None:
        wall = time.monotonic()
        if not final and wall < self._next:
            return
        self._next = wall + self.every_s
        done = 1.0 if final else min(1.0, max(0.0, (at - self.start).total_seconds() / self.span))
        bar = "#" * int(done * self.WIDTH)
        text = (
            f"backfill [{bar:<{self.WIDTH}}] {done:4.0%} {stats.events:,} events "
            f"({stats.events / stats.elapsed_s if stats.elapsed_s else 0:,.0f}/s) "
            f"up to {at.astimezone(VN_TZ):%Y-%m-%d %H:%M}"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


async def run_backfill(
    settings: Settings,
    *,
    days: float,
    seed: int | str = 348,
    now: dt.datetime | None = None,
    plan: BackfillPlan | None = None,
    registry: Registry | None = None,
    history: bool = True,
    progress: bool = True,
) -> BackfillStats:
    """Produce the back-fill to the input topics (batched) and write the past KPI history.

    ``history`` writes the past of ``kpi_history`` (and refreshes the hourly rollups) in
    ``settings.database_url``; without it only events are sent.
    """
    plan = dataclasses.replace(plan or BackfillPlan(), days=days)
    registry = registry or load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    now = now or dt.datetime.now(VN_TZ)
    start = now - dt.timedelta(days=days)
    stats = BackfillStats()
    display = BackfillProgress(start, now) if progress else None
    recorder = KpiHistory(registry, start, now, plan.history_step) if history else None
    if history:  # before any event: the worker then writes the past days' readings into their own partitions
        await asyncio.to_thread(_ensure_partitions, settings.database_url, start)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=20,
        max_batch_size=1024 * 1024,
        acks="all",
        client_id="ioc-backfill",
    )
    await producer.start()
    topics = {t: settings.topic(t) for t in (TOPIC_DOSSIER, TOPIC_CYBER, TOPIC_SENSOR)}
    began = time.monotonic()
    try:
        sender = _BatchSender(producer, topics)
        at = start
        # Every partition's batch goes out each hour of event time: a full batch of one partition spans
        # a day or two of it, and partitions that far apart in the log make the worker's detectors judge
        # an hour whose receipts are still in another partition's batch (it enters their baseline short).
        flush_at = start + SEND_EVERY
        for event in backfill_events(seed, now, plan, registry, future=stats.continuation):
            if event.at >= flush_at:
                await sender.flush()
                flush_at = event.at + SEND_EVERY
            raw = orjson.dumps(event.value)
            if recorder is not None:
                recorder.add(event, raw)
            await sender.add(event.topic, event.key.encode(), raw)
            stats.events += 1
            stats.by_topic[event.topic] = stats.by_topic.get(event.topic, 0) + 1
            at = event.at
            if stats.events % 5000 == 0:
                stats.elapsed_s = time.monotonic() - began
                if display:
                    display.update(at, stats)
        await sender.close()
    finally:
        await producer.stop()
    if recorder is not None:
        rows = recorder.finish()
        stats.history_rows = len(rows)
        await asyncio.to_thread(write_history, settings.database_url, rows, start)
    stats.elapsed_s = time.monotonic() - began
    if display:
        display.update(now, stats, final=True)
    logger.info(
        "backfill: %d days, %d events %s, %d KPI history rows in %.1f s",
        days,
        stats.events,
        stats.by_topic,
        stats.history_rows,
        stats.elapsed_s,
    )
    return stats


#: The back-fill sends every partition's batch at least this often in event time (`run_backfill`).
SEND_EVERY = dt.timedelta(hours=1)


class _BatchSender:
    """Records gathered into one batch per partition and sent whole (the producer's per-record ``send``
    caps a loop at a few thousand records a second); keys go to the partitions the live simulator's
    records of the same key go to (the client's default partitioner)."""

    def __init__(self, producer: AIOKafkaProducer, topics: dict[str, str]) -> None:
        self.producer = producer
        self.topics = topics
        self.partitioner = DefaultPartitioner()
        self.partitions: dict[str, list[int]] = {}
        self.batches: dict[tuple[str, int], Any] = {}  # the client's BatchBuilder
        self.sent: list[asyncio.Future[object]] = []

    async def add(self, logical: str, key: bytes, value: bytes) -> None:
        topic = self.topics[logical]
        partitions = self.partitions.get(topic)
        if partitions is None:
            partitions = self.partitions[topic] = sorted(await self.producer.partitions_for(topic))
        partition = self.partitioner(key, partitions, partitions)
        batch = self.batches.get((topic, partition))
        if batch is None:
            batch = self.batches[(topic, partition)] = self.producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it, start another
            await self._send(topic, partition, batch)
            batch = self.batches[(topic, partition)] = self.producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)

    async def _send(self, topic: str, partition: int, batch: Any) -> None:
        self.sent.append(await self.producer.send_batch(batch, topic, partition=partition))
        if len(self.sent) >= 64:  # bounded memory: wait for the oldest half
            await asyncio.gather(*self.sent[:32])
            del self.sent[:32]

    async def flush(self) -> None:
        """Send every partition's batch, full or not."""
        for (topic, partition), batch in self.batches.items():
            if batch.record_count():
                await self._send(topic, partition, batch)
        self.batches.clear()

    async def close(self) -> None:
        await self.flush()
        await asyncio.gather(*self.sent)


_MERGE = """
INSERT INTO kpi_history (as_of, kpi, scope, win, value, numerator, denominator, status, seq)
SELECT as_of, kpi, scope, win, value, numerator, denominator, status, seq FROM stage_backfill
ON CONFLICT (kpi, scope, win, as_of) DO NOTHING
"""


def _ensure_partitions(database_url: str, start: dt.datetime) -> None:
    """Daily partitions (plain PostgreSQL) for the back-filled days, so their rows do not land in the default one."""
    import psycopg

    from ioc.db.migrate import ensure_partitions

    with psycopg.connect(database_url, autocommit=True) as conn:
        ensure_partitions(conn, start.astimezone(dt.UTC).date(), dt.datetime.now(dt.UTC).date())


def write_history(database_url: str, rows: Iterable[Snapshot], start: dt.datetime) -> int:
    """Store back-filled history rows (a row already there is kept) and refresh the hourly rollups."""
    import psycopg

    from ioc.db.migrate import refresh_rollups

    count = 0
    with psycopg.connect(database_url, autocommit=False) as conn:
        conn.execute(
            "CREATE TEMP TABLE stage_backfill (as_of timestamptz, kpi text, scope text, win text, value float8,"
            " numerator float8, denominator float8, status text, seq bigint) ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY stage_backfill FROM STDIN") as copy:
            for s in rows:
                copy.write_row((s.as_of, s.kpi, s.scope, s.window, s.value, s.numerator, s.denominator, s.status, 0))
                count += 1
        conn.execute(_MERGE)
        conn.commit()
        refresh_rollups(conn, since=start, rollup_days=3650)
        conn.commit()
    return count
