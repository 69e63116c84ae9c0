"""The merged stream of all three input topics, with duplicates, late and malformed records.

How ``rate_per_s`` is split (see :func:`rate_split`): every station of the registry reports at
its own ``interval_s`` (about 0.13 readings/s for the shipped registry); what is left of the rate
goes 99.5 % to dossier events and 0.5 % to incident events, converted to dossier and incident
arrivals by their mean events per lifecycle (about 3). A run starting from nothing lacks the
follow-up events (processing, completion) of dossiers received before it, so the dossier
generator backfills: extra intake covers the shortfall until the lifecycles it started reach a
steady state (days for multi-day procedures); ``received`` counts run high early in a run.
Duplicates and malformed records ride inside the rate: ``rate_per_s`` counts every record put
on the wire.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import json
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from ioc.registry import Registry, Station, load_registry
from ioc.settings import TOPIC_CYBER, TOPIC_DOSSIER, TOPIC_SENSOR
from simulators.baseline import Scenario
from simulators.dossiers import (
    EVENTS_PER_DOSSIER,
    DossierSimulator,
    load_catalogue,
    mean_events_within,
)
from simulators.envelope import VN_TZ, Event, event_id, iso, to_millisecond
from simulators.incidents import (
    EVENTS_PER_INCIDENT,
    PROVINCIAL_SYSTEMS,
    IncidentSimulator,
    commune_portals,
)
from simulators.scenarios import DEFAULT_LEAD, build_scenario
from simulators.sensors import SensorSimulator

logger = logging.getLogger(__name__)

#: Share of the non-sensor events that are SOC incident events.
INCIDENT_SHARE = 0.005
#: An out-of-order record arrives this much after its event time (a few arrive much later).
LATE_BY_S = (2.0, 120.0)
VERY_LATE_BY_S = (300.0, 3600.0)
#: A duplicate follows its original by this much: mostly a quick retry, sometimes a replay.
RESENT_AFTER_S = (0.05, 2.0)
REPLAYED_AFTER_S = (2.0, 120.0)


@dataclass(frozen=True, slots=True)
class SimRecord:
    """One record for the wire: logical topic, key and value bytes, event and arrival times."""

    topic: str
    key: bytes
    value: bytes
    event_time: dt.datetime
    #: When it should be put on the wire: its event time, later for delayed records and re-sends.
    arrival_time: dt.datetime
    duplicate: bool = False
    delayed: bool = False
    malformed: bool = False
    #: The JSON object of a well-formed record (None for malformed ones).
    event: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RateSplit:
    sensor_readings_per_s: float
    dossiers_per_s: float
    incidents_per_s: float


def rate_split(
    rate_per_s: float,
    stations: Mapping[str, Station],
    dup_rate: float = 0.0,
    bad_rate: float = 0.0,
    events_per_dossier: float = EVENTS_PER_DOSSIER,
) -> RateSplit:
    """Arrivals per kind for ``rate_per_s`` records per second in all (see the module docstring)."""
    sensors = SensorSimulator.readings_per_s(stations)
    normal = rate_per_s / (1.0 + dup_rate + bad_rate)
    rest = max(0.0, normal - sensors)
    return RateSplit(
        sensor_readings_per_s=sensors,
        dossiers_per_s=rest * (1 - INCIDENT_SHARE) / events_per_dossier,
        incidents_per_s=rest * INCIDENT_SHARE / EVENTS_PER_INCIDENT,
    )


def _check_rates(**rates: float) -> None:
    for name, value in rates.items():
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def generate(
    seed: int | str,
    start: dt.datetime,
    rate_per_s: float,
    scenario: str | Scenario | None = None,
    dup_rate: float = 0.0,
    ooo_rate: float = 0.0,
    bad_rate: float = 0.0,
    *,
    registry: Registry | None = None,
    until: dt.datetime | None = None,
    diurnal: bool = False,
    scenario_span: dt.timedelta | None = None,
    after_backfill: bool = False,
    continuation: Sequence[Event] = (),
) -> Iterator[SimRecord]:
    """Records of all three topics in arrival order, the same for a seed; endless unless ``until``.

    ``start`` must be timezone-aware. A named scenario begins 30 s after ``start``. ``dup_rate``,
    ``ooo_rate`` and ``bad_rate`` are per well-formed event: the chance it is re-sent with the same
    ``event_id``, delayed past later events (keeping its event time), or joined by a malformed
    record.
    ``diurnal`` shapes dossier intake by office hours (the mean rate stays ``rate_per_s``).
    ``after_backfill``: the run goes on from a back-fill (`simulators.backfill`), so intake is shaped
    by office hours as the back-fill's was and no extra intake makes up for missing follow-ups:
    either would be read as a dossier surge in every commune by detectors that learnt the back-fill.
    ``continuation``: the back-fill's open lifecycles' later steps (`BackfillStats.continuation`, in
    event-time order), sent among the new events when their time comes.
    """
    if start.tzinfo is None:
        raise ValueError("start must be timezone-aware")
    _check_rates(dup_rate=dup_rate, ooo_rate=ooo_rate, bad_rate=bad_rate)
    registry = registry or load_registry()
    catalogue = load_catalogue(registry.units)
    systems = [*PROVINCIAL_SYSTEMS, *commune_portals(registry.units, catalogue.commune_agency)]
    scenario = resolve_scenario(scenario, start, registry, scenario_span)
    per_dossier = mean_events_within(catalogue, registry.units, dt.timedelta(days=400), start)
    split = rate_split(rate_per_s, registry.stations, dup_rate, bad_rate, per_dossier)
    logger.debug("rate split %s, scenario %s", split, scenario.name)

    dossiers = DossierSimulator(
        random.Random(f"{seed}/dossiers"),
        catalogue,
        registry.units,
        dossiers_per_s=split.dossiers_per_s,
        conditions=scenario.dossiers,
        peak_rate_factor=scenario.peak_dossier_factor,
        diurnal=diurnal or after_backfill,
        backfill=not after_backfill,
    )
    incidents = IncidentSimulator(
        random.Random(f"{seed}/incidents"),
        systems,
        incidents_per_s=split.incidents_per_s,
        conditions=scenario.incidents,
        peak_rate_factor=scenario.peak_incident_factor,
        peak_ddos_rate_per_s=scenario.peak_ddos_rate_per_s,
        ddos_ends=scenario.ends if scenario.peak_ddos_rate_per_s > 0 else None,
    )
    sensors = SensorSimulator(
        random.Random(f"{seed}/sensors"),
        registry.stations,
        registry.units,
        conditions=scenario.sensors,
    )
    extra = (e for e in scenario.extra_incidents(random.Random(f"{seed}/extra-incidents")) if e.at >= start)
    if until is not None:
        extra = (e for e in extra if e.at <= until)
    merged = heapq.merge(
        (e for e in continuation if until is None or e.at <= until),
        scenario.bend_dossiers(dossiers.events(start, until)),
        heapq.merge(incidents.events(start, until), extra, key=lambda e: e.at),
        scenario.bend_sensors(sensors.events(start, until)),
        key=lambda e: e.at,
    )
    yield from _perturb(merged, random.Random(f"{seed}/faults"), dup_rate, ooo_rate, bad_rate, until)


def resolve_scenario(
    scenario: str | Scenario | None,
    start: dt.datetime,
    registry: Registry | None = None,
    span: dt.timedelta | None = None,
) -> Scenario:
    """The scenario object for a name (beginning 30 s after ``start``), or the one given."""
    if isinstance(scenario, Scenario):
        return scenario
    registry = registry or load_registry()
    catalogue = load_catalogue(registry.units)
    systems = [*PROVINCIAL_SYSTEMS, *commune_portals(registry.units, catalogue.commune_agency)]
    return build_scenario(scenario, start + DEFAULT_LEAD, span=span, stations=registry.stations, systems=systems)


def _perturb(
    events: Iterator[Event],
    rng: random.Random,
    dup_rate: float,
    ooo_rate: float,
    bad_rate: float,
    until: dt.datetime | None,
) -> Iterator[SimRecord]:
    """Time-ordered events as wire records in arrival order, with the configured faults added."""
    out: list[tuple[dt.datetime, int, SimRecord]] = []
    tiebreak = itertools.count()

    def put(record: SimRecord) -> None:
        if until is None or record.arrival_time <= until:
            heapq.heappush(out, (record.arrival_time, next(tiebreak), record))

    for event in events:
        at = to_millisecond(event.at)  # exactly the time written in the event
        while out and out[0][0] <= at:
            yield heapq.heappop(out)[2]
        key = event.key.encode()
        value = orjson.dumps(event.value)
        arrival = at
        delayed = rng.random() < ooo_rate
        if delayed:
            lateness = VERY_LATE_BY_S if rng.random() < 0.1 else LATE_BY_S
            arrival += dt.timedelta(seconds=rng.uniform(*lateness))
        record = SimRecord(event.topic, key, value, at, arrival, delayed=delayed, event=event.value)
        put(record)
        if rng.random() < dup_rate:
            after = RESENT_AFTER_S if rng.random() < 0.7 else REPLAYED_AFTER_S
            resent = arrival + dt.timedelta(seconds=rng.uniform(*after))
            put(SimRecord(event.topic, key, value, at, resent, duplicate=True, event=event.value))
        if rng.random() < bad_rate:
            put(SimRecord(event.topic, key, malform(rng, event), at, at, malformed=True))
    while out:
        yield heapq.heappop(out)[2]


def malform(rng: random.Random, event: Event) -> bytes:
    """A broken variant of ``event``: invalid JSON or UTF-8, a missing field, a wrong type, an
    impossible value, an unknown station or enum, a bad timestamp. Has a fresh event_id."""
    value: dict[str, Any] = json.loads(json.dumps(event.value))
    value["event_id"] = event_id(rng)
    time_field = "observed_at" if event.topic == TOPIC_SENSOR else "occurred_at"
    defects: list[str] = [
        "truncated",
        "not_object",
        "missing",
        "wrong_type",
        "bad_time",
        "bad_utf8",
        "bad_schema",
        "empty",
    ]
    if event.topic == TOPIC_SENSOR:
        defects += ["negative", "nan", "unknown_station", "impossible", "values_not_object"]
    elif event.topic == TOPIC_DOSSIER:
        defects += ["unknown_type", "bad_channel", "bad_commune"]
    elif event.topic == TOPIC_CYBER:
        defects += ["unknown_type", "bad_level", "long_title", "bad_severity"]
    defect = rng.choice(defects)
    text: str | None = None
    if defect == "truncated":
        full = json.dumps(value, ensure_ascii=False)
        text = full[: rng.randrange(1, len(full) - 1)]
    elif defect == "not_object":
        text = json.dumps(rng.choice([[value], "received", 42, None]), ensure_ascii=False)
    elif defect == "missing":
        required = (
            ["schema", "event_id", "type", time_field]
            if event.topic != TOPIC_SENSOR
            else ["schema", "event_id", "station_id", "kind", time_field, "values"]
        )
        value.pop(rng.choice(required), None)
    elif defect == "wrong_type":
        field = rng.choice([time_field, "event_id"])
        value[field] = int(event.at.timestamp()) if field == time_field else 12345
    elif defect == "bad_time":
        local = event.at.astimezone(VN_TZ)
        value[time_field] = rng.choice(
            [local.strftime("%d/%m/%Y %H:%M"), local.replace(tzinfo=None).isoformat(), "yesterday"]
        )
    elif defect == "bad_utf8":
        return b"\xff\xfe" + json.dumps(value).encode()
    elif defect == "bad_schema":
        value["schema"] = value["schema"].replace(".v1", ".v9")
    elif defect == "empty":
        return b""
    elif defect in ("negative", "nan", "impossible"):
        name = rng.choice(sorted(value["values"]))
        if defect == "negative":
            value["values"][name] = -abs(value["values"][name]) - 1.0
        elif defect == "nan":
            value["values"][name] = math.nan
        else:
            value["values"][name] = {
                "humidity_pct": 180.0,
                "temp_c": 95.0,
                "water_level_m": 9999.0,
                "rain_mm": 5000.0,
            }.get(name, 1.0e7)
    elif defect == "unknown_station":
        value["station_id"] = f"{value['station_id'].split('-')[0]}-99999"
    elif defect == "values_not_object":
        value["values"] = "n/a"
    elif defect == "unknown_type":
        value["type"] = rng.choice(["approved", "escalated", "RECEIVED", ""])
    elif defect == "bad_channel":
        value["type"] = "received"
        value["channel"] = "fax"
        value.setdefault("full_online", False)
        value.setdefault("due_at", iso(event.at + dt.timedelta(days=3)))
    elif defect == "bad_commune":
        value["commune_code"] = rng.choice(["1668", "99999", 16681])
    elif defect == "bad_level":
        value["system_level"] = rng.choice([0, 6, "3"])
    elif defect == "long_title":
        value["title"] = ("Tấn công " * 80)[:620]
    elif defect == "bad_severity":
        value["type"] = "detected"
        value["severity"] = "urgent"
    if text is None:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    return text.encode()


def write_jsonl(
    target: str | Path | IO[str],
    *,
    seed: int | str,
    start: dt.datetime,
    rate_per_s: float,
    count: int | None = None,
    duration: dt.timedelta | None = None,
    scenario: str | Scenario | None = None,
    dup_rate: float = 0.0,
    ooo_rate: float = 0.0,
    bad_rate: float = 0.0,
    registry: Registry | None = None,
) -> int:
    """Write ``count`` records, or a simulated ``duration``, as the JSON lines ``ioc replay`` reads.

    Each line is ``{"topic": ..., "value": {...}}``, or ``{"topic": ..., "raw": "<text>"}`` for a
    malformed record (its exact bytes; undecodable ones as lone surrogates, Python's
    ``surrogateescape``). Returns the number of lines written.
    """
    if count is None and duration is None:
        raise ValueError("give count or duration")
    until = start + duration if duration is not None else None
    records = generate(
        seed,
        start,
        rate_per_s,
        scenario,
        dup_rate,
        ooo_rate,
        bad_rate,
        registry=registry,
        until=until,
    )
    if count is not None:
        records = itertools.islice(records, count)
    if isinstance(target, (str, Path)):
        with open(target, "w", encoding="utf-8") as handle:
            return _write_lines(handle, records)
    return _write_lines(target, records)


def _write_lines(handle: IO[str], records: Iterator[SimRecord]) -> int:
    written = 0
    for record in records:
        line: dict[str, Any] = {"topic": record.topic}
        if record.event is not None:
            line["value"] = record.event
            text = json.dumps(line, ensure_ascii=False, allow_nan=True)
        else:
            # The exact bytes: undecodable ones become lone surrogates (\udcXX), which `ioc replay`
            # turns back into the same bytes, so replay judges exactly what the worker judged.
            line["raw"] = record.value.decode("utf-8", errors="surrogateescape")
            text = json.dumps(line, ensure_ascii=True, allow_nan=True)
        handle.write(text + "\n")
        written += 1
    return written


def sensor_history(
    seed: int | str,
    now: dt.datetime,
    seconds: float,
    registry: Registry | None = None,
    scenario: Scenario | None = None,
) -> Iterator[Event]:
    """Every station's readings over the ``seconds`` before ``now``, in time order (a warm start);
    a scenario's sensor conditions and faults apply to the past too."""
    registry = registry or load_registry()
    scenario = scenario or Scenario()
    sensors = SensorSimulator(
        random.Random(f"{seed}/history"), registry.stations, registry.units, conditions=scenario.sensors
    )
    yield from scenario.bend_sensors(sensors.events(now - dt.timedelta(seconds=seconds), now - dt.timedelta(seconds=1)))
