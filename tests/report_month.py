"""A simulated month of events for the report tests, written as `ioc replay` JSON lines."""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import json
import random
from pathlib import Path

from ioc.registry import Registry, load_registry
from simulators.dossiers import DossierSimulator, load_catalogue
from simulators.incidents import PROVINCIAL_SYSTEMS, IncidentSimulator, commune_portals
from simulators.sensors import SensorSimulator
from streams.windows import TZ

#: A few stations of each kind keep the month small (every station at its cadence is 300,000 readings).
STATIONS = ("AIR-16681", "AIR-17935")


def month_events(path: Path, start: dt.datetime, until: dt.datetime, *, seed: str = "report", registry: Registry | None = None,
                 dossiers_per_s: float = 0.004, incidents_per_s: float = 0.0002) -> int:  # fmt: skip
    """Dossier, incident and sensor events from ``start`` to ``until`` into ``path``; returns the count."""
    registry = registry or load_registry()
    catalogue = load_catalogue(registry.units)
    systems = [*PROVINCIAL_SYSTEMS, *commune_portals(registry.units, catalogue.commune_agency)]
    kinds = {"air": 2, "water": 3, "rain": 3}
    chosen = {}
    for sid, st in sorted(registry.stations.items()):
        if kinds.get(st.kind, 0) > 0 and (st.kind != "water" or any(st.alarm_levels_m)):
            chosen[sid] = dataclasses.replace(st, interval_s=max(st.interval_s, 1800))
            kinds[st.kind] -= 1
    streams = (
        DossierSimulator(random.Random(f"{seed}/d"), catalogue, registry.units, dossiers_per_s=dossiers_per_s,
                         backfill=True).events(start, until),
        IncidentSimulator(random.Random(f"{seed}/i"), systems, incidents_per_s=incidents_per_s).events(start, until),
        SensorSimulator(random.Random(f"{seed}/s"), chosen, registry.units).events(start, until),
    )  # fmt: skip
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for e in heapq.merge(*streams, key=lambda e: e.at):
            fh.write(json.dumps({"topic": e.topic, "value": e.value}, ensure_ascii=False) + "\n")
            n += 1
    return n


if __name__ == "__main__":
    import sys

    start = dt.datetime(2026, 9, 20, tzinfo=TZ)
    print(month_events(Path(sys.argv[1]), start, dt.datetime(2026, 11, 3, tzinfo=TZ)))
