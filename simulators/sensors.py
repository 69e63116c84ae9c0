"""Environmental sensors: air, river gauges, rain and weather stations at their cadence."""

from __future__ import annotations

import datetime as dt
import heapq
import logging
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from ioc.registry import Station, Unit
from ioc.settings import TOPIC_SENSOR
from simulators.envelope import VN_TZ, Event, event_id, iso

logger = logging.getLogger(__name__)

SCHEMA = "ioc.sensor.v1"

#: Monthly mean air temperature in Vinh, °C (climate normals, rounded).
MONTHLY_MEAN_TEMP_C = (17.5, 18.2, 20.6, 24.5, 28.4, 30.0, 30.0, 29.0, 27.3, 25.0, 22.0, 19.0)
#: Dry-season (Nov–Apr) particulate matter is markedly higher than in the wet season.
PM_SEASON = (1.35, 1.3, 1.15, 1.0, 0.85, 0.75, 0.7, 0.7, 0.8, 0.95, 1.15, 1.3)
#: Hourly chance of a shower starting at a rain gauge, by month (wet season Aug–Nov).
SHOWER_START_PER_H = (0.01, 0.012, 0.015, 0.02, 0.035, 0.035, 0.03, 0.05, 0.07, 0.07, 0.045, 0.015)
VINH_WARDS = frozenset({"16681", "16690", "16702", "16708", "17920"})

#: Ordinary stage of each gauge (m), before the season's offset. Nam Đàn and Dừa follow the
#: dry-season levels the hydrological service reports; the others are plausible, not calibrated.
BASE_LEVEL_M: Mapping[str, float] = {
    "WL-NAMDAN": 2.6,
    "WL-DUA": 15.8,
    "WL-DOLUONG": 10.5,
    "WL-CONCUONG": 26.5,
    "WL-QUYCHAU": 46.0,
    "WL-NGHIADAN": 24.0,
    "WL-HUNGNGUYEN": 1.1,
    "WL-TUONGDUONG": 92.5,
}
#: Rise (m) at the peak of a major flood for gauges without a known BĐ III.
FLOOD_RISE_M: Mapping[str, float] = {
    "WL-DOLUONG": 7.0,
    "WL-CONCUONG": 6.5,
    "WL-QUYCHAU": 5.5,
    "WL-NGHIADAN": 6.0,
    "WL-HUNGNGUYEN": 3.5,
    "WL-TUONGDUONG": 8.0,
}
#: Extra stage (fraction of the flood rise) in the late wet season.
SEASON_STAGE = (0.0, 0.0, 0.0, 0.0, 0.02, 0.04, 0.05, 0.08, 0.12, 0.16, 0.1, 0.03)
TIDAL_GAUGES = frozenset({"WL-HUNGNGUYEN"})
M2_TIDE_S = 12.42 * 3600


@dataclass(frozen=True, slots=True)
class SensorConditions:
    """How a scenario bends sensor traffic at one moment."""

    #: Stations that send nothing (power or network down).
    silent: frozenset[str] = field(default=frozenset())
    #: Rain intensity (mm/h) added at every rain gauge, e.g. a tropical depression's rain band.
    rain_mm_per_h: float = 0.0
    #: 0–1: how far every river stands between its ordinary stage and its flood peak.
    river_rise: float = 0.0
    #: Kinds that switch to a fast cadence (flood mode), and that cadence in seconds.
    fast_kinds: frozenset[str] = field(default=frozenset())
    fast_interval_s: int = 60


NORMAL = SensorConditions()


def gauge_base_m(station: Station) -> float:
    if station.station_id in BASE_LEVEL_M:
        return BASE_LEVEL_M[station.station_id]
    bd1 = station.alarm_levels_m[0]
    return max(0.5, bd1 - 3.0) if bd1 is not None else 5.0


def gauge_peak_m(station: Station) -> float:
    """Stage at the peak of a major flood: just above BĐ III where it is known."""
    bd3 = station.alarm_levels_m[2]
    if bd3 is not None:
        return bd3 + 0.4
    return gauge_base_m(station) + FLOOD_RISE_M.get(station.station_id, 5.0)


def _bump(hour: float, centre: float, width: float) -> float:
    """A Gaussian bump around ``centre`` o'clock that wraps at midnight."""
    d = min(abs(hour - centre), 24 - abs(hour - centre))
    return math.exp(-0.5 * (d / width) ** 2)


def traffic_shape(hour: float) -> float:
    """Relative traffic emissions: morning and evening rush hours, low at night."""
    return 0.55 + 0.75 * _bump(hour, 7.5, 1.2) + 0.85 * _bump(hour, 18.0, 1.5) + 0.3 * _bump(hour, 12.0, 3.0)


def photochemistry(hour: float) -> float:
    """0–1: sunlight-driven ozone production, peaking mid-afternoon."""
    return max(0.0, math.sin(math.pi * (hour - 7.0) / 12.0)) ** 1.5 if 7.0 < hour < 19.0 else 0.0


class _StationState:
    __slots__ = ("anomaly", "carry_mm", "intensity_mm_h", "last", "raining", "urban")

    def __init__(self, urban: float) -> None:
        self.anomaly = 0.0  # slowly varying log-multiplier (air) or offset (water, weather)
        self.raining = False
        self.intensity_mm_h = 0.0
        self.carry_mm = 0.0  # rain fallen since the last reading that got out
        self.last: dt.datetime | None = None
        self.urban = urban


class SensorSimulator:
    """Seeded readings from every registered station at its ``interval_s`` (±2 % jitter).

    Pure: no clock, no I/O. Values follow diurnal and seasonal cycles with persistent noise and
    stay physically valid; a scenario forces rain, raises rivers or silences stations.
    """

    def __init__(
        self,
        rng: random.Random,
        stations: Mapping[str, Station],
        units: Mapping[str, Unit],
        *,
        conditions: Callable[[dt.datetime], SensorConditions] = lambda _t: NORMAL,
    ) -> None:
        self.rng = rng
        self.stations = dict(sorted(stations.items()))
        self.conditions = conditions
        self._state: dict[str, _StationState] = {}
        for sid, station in self.stations.items():
            unit = units.get(station.commune_code)
            urban = 1.3 if station.commune_code in VINH_WARDS else 1.0 if unit and unit.kind == "phuong" else 0.65
            self._state[sid] = _StationState(urban)

    @staticmethod
    def readings_per_s(stations: Mapping[str, Station]) -> float:
        """Mean readings per second of the registry at its normal cadence."""
        return sum(1.0 / s.interval_s for s in stations.values())

    def events(self, start: dt.datetime, until: dt.datetime | None = None) -> Iterator[Event]:
        schedule = [
            (start + dt.timedelta(seconds=self.rng.uniform(0, s.interval_s)), sid) for sid, s in self.stations.items()
        ]
        heapq.heapify(schedule)
        while schedule:
            at, sid = schedule[0]
            if until is not None and at > until:
                return
            station = self.stations[sid]
            cond = self.conditions(at)
            interval = cond.fast_interval_s if station.kind in cond.fast_kinds else station.interval_s
            heapq.heapreplace(schedule, (at + dt.timedelta(seconds=interval * self.rng.uniform(0.98, 1.02)), sid))
            values = self._values(station, at, cond)
            if sid in cond.silent:
                continue
            self._state[sid].carry_mm = 0.0
            yield Event(
                TOPIC_SENSOR,
                sid,
                at,
                {
                    "schema": SCHEMA,
                    "event_id": event_id(self.rng),
                    "station_id": sid,
                    "kind": station.kind,
                    "observed_at": iso(at),
                    "values": values,
                },
            )

    def _values(self, station: Station, at: dt.datetime, cond: SensorConditions) -> dict[str, float]:
        state = self._state[station.station_id]
        elapsed_s = (at - state.last).total_seconds() if state.last else float(station.interval_s)
        state.last = at
        local = at.astimezone(VN_TZ)
        hour = local.hour + local.minute / 60
        month = local.month - 1
        if station.kind == "air":
            return self._air(state, hour, month)
        if station.kind == "water":
            return self._water(station, state, at, month, cond)
        if station.kind == "rain":
            return self._rain(state, elapsed_s, month, cond)
        return self._weather(station, state, hour, month, cond)

    def _air(self, state: _StationState, hour: float, month: int) -> dict[str, float]:
        rng = self.rng
        # Persistent weather-driven pollution episodes: AR(1) in log space, hours of memory.
        state.anomaly = 0.97 * state.anomaly + rng.gauss(0.0, 0.06)
        episode = math.exp(state.anomaly)
        traffic = traffic_shape(hour)
        # Night-time inversions trap particles; midday mixing dilutes them.
        mixing = 1.0 + 0.25 * _bump(hour, 2.0, 3.0) - 0.2 * _bump(hour, 13.5, 2.5)
        urban = state.urban

        def noisy(x: float, sd: float = 0.06) -> float:
            return max(0.0, x * (1.0 + rng.gauss(0.0, sd)))

        pm25 = noisy(27.0 * PM_SEASON[month] * urban * traffic * mixing * episode)
        pm10 = pm25 * max(1.05, rng.gauss(1.6, 0.1))
        no2 = noisy(20.0 * urban * traffic * episode**0.8, 0.08)
        o3 = noisy((18.0 + 85.0 * photochemistry(hour)) * (1.2 - 0.25 * urban), 0.08)
        so2 = noisy(7.0 * urban * episode**0.5, 0.1)
        co = noisy(850.0 * urban * traffic * episode, 0.08)
        return {
            "pm25": round(pm25, 1),
            "pm10": round(pm10, 1),
            "o3": round(o3, 1),
            "no2": round(no2, 1),
            "so2": round(so2, 1),
            "co": round(co),
        }

    def _water(
        self,
        station: Station,
        state: _StationState,
        at: dt.datetime,
        month: int,
        cond: SensorConditions,
    ) -> dict[str, float]:
        base = gauge_base_m(station)
        peak = gauge_peak_m(station)
        state.anomaly = 0.995 * state.anomaly + self.rng.gauss(0.0, 0.01)
        ordinary = base + SEASON_STAGE[month] * (peak - base) + state.anomaly
        if station.station_id in TIDAL_GAUGES:
            ordinary += 0.3 * math.sin(2 * math.pi * at.timestamp() / M2_TIDE_S)
        rise = min(1.0, max(0.0, cond.river_rise))
        # A river in spate is rough: waves and surges move a gauge by centimetres between readings.
        level = ordinary + rise * (peak - ordinary) + self.rng.gauss(0.0, 0.005 + 0.02 * rise)
        return {"water_level_m": round(max(0.05, level), 2)}

    def _rain(self, state: _StationState, elapsed_s: float, month: int, cond: SensorConditions) -> dict[str, float]:
        rng = self.rng
        hours = elapsed_s / 3600
        if state.raining:
            if rng.random() < 1 - math.exp(-1.0 * hours):  # showers last about an hour
                state.raining = False
        elif rng.random() < 1 - math.exp(-SHOWER_START_PER_H[month] * hours):
            state.raining = True
            state.intensity_mm_h = rng.gammavariate(1.3, 5.0)
        fallen = state.intensity_mm_h * hours * rng.uniform(0.5, 1.5) if state.raining else 0.0
        if cond.rain_mm_per_h > 0:
            fallen += cond.rain_mm_per_h * hours * rng.uniform(0.7, 1.3)
        state.carry_mm += fallen
        return {"rain_mm": round(state.carry_mm, 1)}

    def _weather(
        self,
        station: Station,
        state: _StationState,
        hour: float,
        month: int,
        cond: SensorConditions,
    ) -> dict[str, float]:
        rng = self.rng
        state.anomaly = 0.98 * state.anomaly + rng.gauss(0.0, 0.15)
        mean = MONTHLY_MEAN_TEMP_C[month] - (1.0 if station.lon < 105.0 else 0.0)
        cooling = 3.0 if cond.rain_mm_per_h > 0 else 0.0
        temp = mean + 4.0 * math.cos(2 * math.pi * (hour - 14.0) / 24) + state.anomaly - cooling
        temp += rng.gauss(0.0, 0.2)
        humidity = 82.0 - 3.0 * (temp - mean) + rng.gauss(0.0, 2.0) + (12.0 if cooling else 0.0)
        coastal = station.lon > 105.65
        wind = rng.gammavariate(2.0, 1.2) * (1.4 if coastal else 1.0) * (2.5 if cooling else 1.0)
        return {
            "temp_c": round(temp, 1),
            "humidity_pct": round(min(100.0, max(25.0, humidity)), 1),
            "wind_ms": round(wind, 1),
        }
