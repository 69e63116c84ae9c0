"""Where a report's inputs come from: a JSON-lines events file or the database, both into one `Engine`.

Either way the result is the stream worker's own `Engine` holding every dossier and incident state
and the sensor readings as of the period's last microsecond, with its clock there: the report then
reads the counters exactly as the month-to-date KPIs do (see docs/reports.md, "Where the numbers
come from").

- Events: each event of the file with event time up to the period's end is applied, as
  `ioc replay --until` applies them.
- Database: the state tables (``dossier_state``, ``incident_state``) keep every entity's merged
  state for ever; the rows that can count in the period (unfinished ones, and those with an event
  since the start of the previous period) are loaded, and so are the period's sensor readings.
  A stored state may hold facts that happened after the period; those counters are stamped with
  their own time and stay beyond the engine's clock, except for a false positive, which removes an
  incident from every count, so a false positive declared after the period is set aside here.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from ioc.contract import US
from ioc.errors import InvalidEvent
from ioc.registry import Registry
from reports.period import Period
from streams import cyber, dossier
from streams.engine import KINDS, Engine
from streams.replay import records
from streams.sensor import Parsed as SensorParsed
from streams.sensor import SensorEvent
from streams.sink import StateDecoder

log = logging.getLogger(__name__)

#: Readings this long before the period are loaded too: the largest 24 h rainfall of the period's
#: first day reaches back into the day before.
READINGS_LEAD_US = 24 * 3600 * US


def engine_from_events(path: Path, registry: Registry, as_of_us: int) -> tuple[Engine, dict[str, int]]:
    """Every valid event of ``path`` with event time up to ``as_of_us``, applied (as `ioc replay` does)."""
    engine = Engine(registry, 0)
    counts = {"lines": 0, "applied": 0, "invalid": 0, "after": 0}
    parsed: list[tuple[str, str, Any]] = []
    for _, topic, raw in records(path):  # the file format of `ioc replay`
        counts["lines"] += 1
        logical = topic[topic.index("ioc.") :] if "ioc." in topic else topic
        if logical not in KINDS:
            counts["invalid"] += 1
            continue
        try:
            key, p = engine.parse(logical, raw)
        except InvalidEvent:
            counts["invalid"] += 1
            continue
        if p.t > as_of_us:
            counts["after"] += 1
            continue
        parsed.append((logical, key, p))
    # The engine's merges do not depend on order; event-time order keeps the minute buckets warm.
    parsed.sort(key=lambda e: (e[2].t, e[0], e[1], e[2].event.event_id))
    for logical, key, p in parsed:
        engine.apply(logical, key, p, record=False)
        counts["applied"] += 1
    return engine, counts


_dossiers = StateDecoder(dossier.DossierState)
_incidents = StateDecoder(cyber.IncidentState)


def _ts(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / US, dt.UTC)


def engine_from_database(
    conn: psycopg.Connection[Any], registry: Registry, period: Period, *, since: Period | None = None
) -> tuple[Engine, dict[str, int]]:
    """The entities and readings that can count in ``period`` (and in ``since``, an earlier period
    read from the same engine, e.g. the previous one), as of the period's end."""
    first = since or period
    start_us = int(first.start.timestamp()) * US
    as_of = period.as_of_us
    engine = Engine(registry, 0)
    counts = {"dossiers": 0, "incidents": 0, "readings": 0}
    with conn.cursor() as cur:
        # Unfinished entities however old (in progress at the period's end), and those with an event since the start.
        cur.execute(
            "SELECT dossier_id, state::text FROM dossier_state WHERE NOT terminal OR last_event_at >= %s",
            (_ts(start_us),),
        )
        for key, text in cur:
            engine.dossiers.load(key, _dossiers.decode(text))
            counts["dossiers"] += 1
        cur.execute(
            "SELECT incident_id, state::text FROM incident_state WHERE NOT terminal OR last_event_at >= %s",
            (_ts(start_us),),
        )
        for key, text in cur:
            state = _incidents.decode(text)
            if state.false_positive is not None and state.false_positive[0] > as_of:
                state.false_positive = None  # declared after the period: it still counted then
            engine.incidents.load(key, state)
            counts["incidents"] += 1
        cur.execute(
            'SELECT station_id, kind, observed_at, event_id, "values" FROM sensor_reading'
            " WHERE observed_at >= %s AND observed_at <= %s",
            (_ts(start_us - READINGS_LEAD_US), _ts(as_of)),
        )
        for sid, kind, observed_at, event_id, values in cur:
            if sid not in engine.sensors.stations:
                continue
            delta = observed_at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
            t = (delta.days * 86400 + delta.seconds) * US + delta.microseconds
            event = SensorEvent("ioc.sensor.v1", event_id, sid, kind, observed_at, values)
            engine.sensors.apply(sid, SensorParsed(event, t), record=False)
            counts["readings"] += 1
    return engine, counts


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


__all__ = ["describe", "engine_from_database", "engine_from_events", "msgspec"]
