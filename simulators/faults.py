"""Labelled anomalies: faulty sensors, a commune's dossier surge and an incident burst, injected at known times.

`SensorFaults` (``--scenario sensor-faults``) bends the readings of chosen stations (a stuck
sensor, spikes, a drift, a float jammed during a regional rain band) and keeps the truth as
`Label` rows (kind, subjects, start, end) for the benchmark (`bench.anomaly`). The live
scenario puts most faults in the warm-start history (``history_h``) so an operator sees them
within a minute of ``ioc dev``; `fault_plan` with ``compressed=False`` spreads them over days.
`DossierSurgeAnomaly` and `IncidentBurst` add extra events for one commune or one system.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ioc.registry import Station
from simulators.baseline import Scenario
from simulators.envelope import Event, event_id, iso
from simulators.sensors import SensorConditions

H = dt.timedelta(hours=1)
M = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Label:
    """One injected anomaly: what, on which subjects (scopes), from when to when."""

    kind: str
    subjects: tuple[str, ...]
    start: dt.datetime
    end: dt.datetime


@dataclass(frozen=True)
class Fault:
    """One sensor fault: ``stuck``, ``spike``, ``drift`` or ``jam`` (the float of a gauge stuck in rain)."""

    kind: str
    station: str
    quantity: str
    start: dt.datetime
    end: dt.datetime
    #: spike: the jump (× for pm25, + otherwise); drift: per hour (× for pm25, + otherwise).
    size: float = 0.0


@dataclass(frozen=True)
class RainBand:
    start: dt.datetime
    end: dt.datetime
    mm_per_h: float = 12.0
    river_rise: float = 0.12


#: Stations the faults are put on (kept apart so the detectors' neighbours stay healthy).
STUCK_AIR = ("AIR-17662", "AIR-17110", "AIR-17254")
STUCK_WATER = ("WL-QUYCHAU", "WL-TUONGDUONG")
SPIKE_STATIONS = (("AIR-16732", "pm25"), ("WL-DOLUONG", "water_level_m"), ("AIR-17935", "pm25"),
                  ("WL-NGHIADAN", "water_level_m"), ("AIR-16941", "pm25"), ("WX-VINH", "temp_c"))  # fmt: skip
DRIFT = (("AIR-17506", "pm25", 0.3), ("WX-VINH", "temp_c", 0.8), ("AIR-17179", "pm25", 0.25))
JAMMED = ("WL-NAMDAN", "WL-CONCUONG")


def fault_plan(
    stations: Mapping[str, Station], begins: dt.datetime, *, compressed: bool = True
) -> tuple[tuple[Fault, ...], tuple[RainBand, ...]]:
    """The faults of the sensor-faults scenario. Compressed: most of them already under way at
    ``begins`` (in the warm-start history) and the rest within minutes; otherwise spread over three
    days after a clean first day."""
    present = set(stations)
    faults: list[Fault] = []
    bands: list[RainBand] = []
    weather = [s for s in stations.values() if s.kind == "weather"]
    wx = weather[0].station_id if weather else ""
    if compressed:
        faults += [
            Fault("stuck", STUCK_WATER[0], "water_level_m", begins - 3 * H, begins + 2 * H),
            Fault("stuck", STUCK_AIR[0], "pm25", begins - 2 * H, begins + 2 * H),
            Fault("spike", SPIKE_STATIONS[0][0], "pm25", begins - 90 * M, begins - 90 * M + 5 * M, 6.0),
            Fault("spike", SPIKE_STATIONS[1][0], "water_level_m", begins - 60 * M, begins - 60 * M + 10 * M, 1.5),
            Fault("spike", SPIKE_STATIONS[2][0], "pm25", begins + 2 * M, begins + 7 * M, 6.0),
            # Exaggerated drifts, so the hourly CUSUM has its evidence by the time the wall opens.
            Fault("drift", DRIFT[0][0], "pm25", begins - 11 * H, begins + 2 * H, 1.2),
            Fault("drift", wx, "temp_c", begins - 11 * H, begins + 2 * H, DRIFT[1][2]),
            Fault("jam", JAMMED[0], "water_level_m", begins - 4 * H, begins + H),
        ]
        bands.append(RainBand(begins - 4 * H, begins + H))
    else:
        day = 24 * H
        for i, sid in enumerate((*STUCK_AIR, *STUCK_WATER)):
            q = "pm25" if sid.startswith("AIR") else "water_level_m"
            start = begins + day + (7 + 11 * i) * H
            faults.append(Fault("stuck", sid, q, start, start + 6 * H))
        for i in range(18):
            sid, q = SPIKE_STATIONS[i % len(SPIKE_STATIONS)]
            if sid == "WX-VINH":
                sid = wx
            size = {"pm25": 6.0, "water_level_m": 1.5, "temp_c": 12.0}[q]
            start = begins + day + (3 + 3.7 * i) * H
            faults.append(Fault("spike", sid, q, start, start + 11 * M, size))
        for i, (sid, q, rate) in enumerate(DRIFT):
            sid = wx if sid == "WX-VINH" else sid
            start = begins + day + (10 + 20 * i) * H
            faults.append(Fault("drift", sid, q, start, start + 14 * H, rate))
        for i, sid in enumerate(JAMMED):
            start = begins + day + (20 + 30 * i) * H
            faults.append(Fault("jam", sid, "water_level_m", start, start + 5 * H))
            bands.append(RainBand(start, start + 5 * H))
    return tuple(f for f in faults if f.station in present), tuple(bands)


def labels_of(faults: Sequence[Fault]) -> list[Label]:
    """What a detector should find: a jammed gauge is an ``unresponsive`` one."""
    kinds = {"jam": "unresponsive"}
    return [Label(kinds.get(f.kind, f.kind), (f"station:{f.station}",), f.start, f.end) for f in faults]


class FaultInjector:
    """Bends sensor events by the plan; deterministic for a seed."""

    def __init__(self, faults: Sequence[Fault], seed: int | str = 0) -> None:
        self.by_station: dict[str, list[Fault]] = {}
        for f in faults:
            self.by_station.setdefault(f.station, []).append(f)
        self.held: dict[tuple[str, dt.datetime], float] = {}
        self.spiked: set[tuple[str, dt.datetime]] = set()
        self.rng = random.Random(f"{seed}/faults-injected")

    def __call__(self, events: Iterator[Event]) -> Iterator[Event]:
        for e in events:
            faults = self.by_station.get(e.key)
            yield self._bend(e, faults) if faults else e

    def _bend(self, e: Event, faults: list[Fault]) -> Event:
        values = dict(e.value["values"])
        for f in faults:
            if not f.start <= e.at < f.end or f.quantity not in values:
                continue
            x = float(values[f.quantity])
            key = (f.station, f.start)
            if f.kind in ("stuck", "jam"):
                held = self.held.setdefault(key, x)
                x = held + (self.rng.choice((-0.01, 0.0, 0.01)) if f.kind == "jam" else 0.0)
            elif f.kind == "spike":
                if key in self.spiked:
                    continue
                self.spiked.add(key)
                x = x * f.size + 40.0 if f.quantity == "pm25" else x + f.size
            elif f.kind == "drift":
                hours = (e.at - f.start) / H
                x = x * (1 + f.size * hours) if f.quantity == "pm25" else x + f.size * hours
            values[f.quantity] = round(max(0.0, x) if f.quantity != "temp_c" else x, 2)
        return Event(e.topic, e.key, e.at, {**e.value, "values": values})


@dataclass(frozen=True)
class SensorFaults(Scenario):
    """Faulty sensors (stuck, spikes, drift, a float jammed in rain) at known times, with labels."""

    faults: tuple[Fault, ...] = ()
    bands: tuple[RainBand, ...] = ()
    seed: str = "sensor-faults"
    #: Hours of warm-start history the scenario needs (its faults begin inside it).
    history_h: float = 36.0

    @property
    def labels(self) -> list[Label]:
        return labels_of(self.faults)

    def sensors(self, t: dt.datetime) -> SensorConditions:
        for b in self.bands:
            if b.start <= t < b.end:
                ramp = (t - b.start) / (b.end - b.start)  # the river keeps rising while it rains
                return SensorConditions(rain_mm_per_h=b.mm_per_h, river_rise=b.river_rise * ramp)
        return SensorConditions()

    #: One injector for the history and the live stream, so a held value carries over.
    injector: dict[str, FaultInjector] = field(default_factory=dict, compare=False, repr=False)

    def bend_sensors(self, events: Iterator[Event]) -> Iterator[Event]:
        injector = self.injector.setdefault("sensors", FaultInjector(self.faults, self.seed))
        return injector(events)


@dataclass(frozen=True)
class DossierSurgeAnomaly(Scenario):
    """One commune receives several times its usual dossiers for a few hours (the rest of the province is normal)."""

    commune: str = "17935"
    factor: float = 4.0
    extra: tuple[tuple[dt.datetime, dt.datetime], ...] = field(default=())

    @property
    def labels(self) -> list[Label]:
        return [Label("dossier_surge", (f"commune:{self.commune}",), a, b) for a, b in self.extra]

    def bend_dossiers(self, events: Iterator[Event]) -> Iterator[Event]:
        """Extra receipts in the commune at ``factor − 1`` times its own rate: during a surge window each
        receipt anywhere is copied into the commune with probability (factor − 1) × the commune's share
        of the receipts seen so far (1/130 before any), so the extra receipts are a Poisson stream
        proportional to the commune's own intake at that hour, a busy ward's and a quiet commune's alike."""
        rng = random.Random(f"surge/{self.commune}")
        mine = seen = 0
        for e in events:
            yield e
            if e.value.get("type") != "received" or e.key.startswith("SURGE-"):
                continue
            seen += 1
            mine += e.value.get("commune_code") == self.commune
            if not any(a <= e.at < b for a, b in self.extra):
                continue
            share = (mine + 1) / (seen + 130)  # about the province's communes, until receipts say otherwise
            if rng.random() < (self.factor - 1) * share:
                dossier = f"SURGE-{self.commune}-{event_id(rng)[:12]}"
                yield Event(e.topic, dossier, e.at, {**e.value, "dossier_id": dossier, "event_id": event_id(rng),
                                                     "commune_code": self.commune})  # fmt: skip


@dataclass(frozen=True)
class IncidentBurst(Scenario):
    """A run of brute-force incidents on one information system."""

    system: str = "dichvucong.nghean.gov.vn"
    category: str = "brute_force"
    per_hour: float = 20.0
    extra: tuple[tuple[dt.datetime, dt.datetime], ...] = field(default=())

    @property
    def labels(self) -> list[Label]:
        return [Label("incident_burst", (f"system:{self.system}", f"category:{self.category}"), a, b)
                for a, b in self.extra]  # fmt: skip

    def extra_incidents(self, rng: random.Random) -> Iterator[Event]:
        """The burst's ``detected`` incidents, in time order."""
        for a, b in self.extra:
            t = a
            while True:
                t += dt.timedelta(hours=rng.expovariate(self.per_hour))
                if t >= b:
                    break
                iid = f"SOC-BURST-{event_id(rng)[:10]}"
                yield Event("ioc.cyber.incidents", iid, t, {
                    "schema": "ioc.incident.v1", "event_id": event_id(rng), "incident_id": iid, "type": "detected",
                    "occurred_at": iso(t), "severity": "medium", "category": self.category, "system": self.system,
                    "system_level": 3, "agency_code": "000.00.16.H40", "commune_code": None,
                    "source_ip": f"203.0.113.{rng.randrange(1, 255)}", "title": "Dò mật khẩu hàng loạt",
                })  # fmt: skip
