"""IoT environmental sensors: the `ioc.sensor.v1` schema, per-station state, and the air, water and rain KPIs.

A reading is identified by (station_id, observed_at); a re-sent reading (same event_id) changes
nothing, and two different events for the same station and instant resolve to the one with the
smaller event_id, whatever order they came in. Rain and PM2.5 sums are integer hundredths, so
window sums are exact; hourly means are taken over readings sorted by time.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from ioc.contract import US
from ioc.errors import InvalidEvent
from ioc.registry import Registry, Station
from streams import aqi, events
from streams.kpi import Counters, Value
from streams.windows import UTC_OFFSET_S

SCHEMA = "ioc.sensor.v1"
US_PER_HOUR = 3600 * US
#: Readings kept in memory: NowCast needs 12 hours, the daily AQI the local day, the 24h rain sum a day.
KEEP_US = 36 * US_PER_HOUR
#: Physically possible ranges of each value by station kind (µg/m³, m, mm, °C, %, m/s).
LIMITS: dict[str, dict[str, tuple[float, float]]] = {
    "air": {
        "pm25": (0, 2000),
        "pm10": (0, 3000),
        "o3": (0, 5000),
        "no2": (0, 5000),
        "so2": (0, 10000),
        "co": (0, 200000),
    },
    "water": {"water_level_m": (0, 1000)},
    "rain": {"rain_mm": (0, 500)},
    # Temperature may be below zero: the one exception to "negative is invalid", stated in docs/kpis.md.
    "weather": {"temp_c": (-30, 60), "humidity_pct": (0, 100), "wind_ms": (0, 120)},
}


class SensorEvent(msgspec.Struct, frozen=True, gc=False):
    schema: Literal["ioc.sensor.v1"]
    event_id: str
    station_id: str
    kind: Literal["air", "water", "rain", "weather"]
    observed_at: dt.datetime
    values: dict[str, float]


_decoder = events.decoder(SensorEvent)


class Parsed(msgspec.Struct, frozen=True, gc=False):
    event: SensorEvent
    t: int


def parse(raw: bytes, registry: Registry, produced_us: int | None = None) -> tuple[str, Parsed]:
    """Decode and validate one reading against the station registry; raises `InvalidEvent`."""
    e = events.decode(_decoder, raw)
    if not e.event_id or len(e.event_id) > 200:
        raise InvalidEvent("must be 1–200 characters", field="event_id")
    station = registry.stations.get(e.station_id)
    if station is None:
        raise InvalidEvent(f"unknown station {e.station_id[:80]!r}", field="station_id")
    if station.kind != e.kind:
        raise InvalidEvent(f"station {e.station_id} is a {station.kind} station, not {e.kind}", field="kind")
    limits = LIMITS[e.kind]
    if not e.values:
        raise InvalidEvent("no values", field="values")
    for name, value in e.values.items():
        if name not in limits:
            raise InvalidEvent(f"{name!r} is not a {e.kind} value", field="values")
        lo, hi = limits[name]
        if not math.isfinite(value) or not lo <= value <= hi:
            raise InvalidEvent(f"{name}={value!r} outside [{lo}, {hi}]", field=f"values.{name}")
    return e.station_id, Parsed(e, events.to_us(e.observed_at, "observed_at", produced_us))


class Reading(msgspec.Struct, frozen=True, gc=False):
    event_id: str
    values: dict[str, float]


class StationState:
    """Recent readings of one station, keyed by observation time (µs)."""

    __slots__ = ("_times", "last_seen", "readings", "station")

    def __init__(self, station: Station) -> None:
        self.station = station
        self.readings: dict[int, Reading] = {}
        self.last_seen: int | None = None
        self._times: list[int] | None = None

    def times(self) -> list[int]:
        """Observation times in order (sorted once per change, not once per pollutant and window)."""
        if self._times is None:
            self._times = sorted(self.readings)
        return self._times

    def changed(self) -> None:
        self._times = None

    def hourly_means(self, pollutant: str, first_hour: int, last_hour: int, until: int) -> list[float | None]:
        """Hourly means for hours [first_hour, last_hour] (hour index = µs // 1h), newest first."""
        sums: dict[int, list[float]] = {}
        for t in self.times():
            if t > until:
                break
            h = t // US_PER_HOUR
            if first_hour <= h <= last_hour:
                v = self.readings[t].values.get(pollutant)
                if v is not None:
                    sums.setdefault(h, []).append(v)
        return [(sum(sums[h]) / len(sums[h])) if h in sums else None for h in range(last_hour, first_hour - 1, -1)]


def _contributions(kind: str, reading: Reading) -> dict[str, int]:
    c: dict[str, int] = {}
    if kind == "rain" and "rain_mm" in reading.values:
        c["rain_cmm"] = round(reading.values["rain_mm"] * 100)
        c["rain_n"] = 1
    if kind == "air" and "pm25" in reading.values:
        c["pm25_c"] = round(reading.values["pm25"] * 100)
        c["pm25_n"] = 1
    return c


class SensorAggregator:
    """Station states and counters; computes every sensor KPI snapshot value."""

    def __init__(self, registry: Registry, counters: Counters) -> None:
        self.registry = registry
        self.counters = counters
        self.stations = {sid: StationState(s) for sid, s in registry.stations.items()}
        self.dirty: set[str] = set()
        #: Readings changed since the sink last took them: (station_id, t) -> (kind, reading).
        self.changed: dict[tuple[str, int], tuple[str, Reading]] = {}

    def apply(self, station_id: str, p: Parsed, *, record: bool = True) -> bool:
        state = self.stations[station_id]
        e, t = p.event, p.t
        old = state.readings.get(t)
        if old is not None and old.event_id <= e.event_id:
            return False  # the same reading again, or a rival that loses the tie-break
        new = Reading(e.event_id, dict(e.values))
        scopes = (f"station:{station_id}",)
        if old is not None:
            for name, amount in _contributions(e.kind, old).items():
                self.counters.add(name, scopes, t, -amount)
        for name, amount in _contributions(e.kind, new).items():
            self.counters.add(name, scopes, t, amount)
        state.readings[t] = new
        state.changed()
        if state.last_seen is None or t > state.last_seen:
            state.last_seen = t
        self.dirty.add(station_id)
        if record:
            self.changed[(station_id, t)] = (e.kind, new)
        return True

    def prune(self, now_us: int) -> None:
        """Drop readings no window needs, but keep each station's latest one ("latest level" has no horizon)."""
        horizon = now_us - KEEP_US
        for state in self.stations.values():
            old = [t for t in state.readings if t < horizon]
            if old and len(old) == len(state.readings):
                old.remove(max(old))
            for t in old:
                del state.readings[t]
            if old:
                state.changed()

    # --- KPI values -------------------------------------------------------------------------

    def station_values(self, sid: str, as_of: int, r: Any) -> Iterable[tuple[str, str, str, Value]]:
        """(kpi, unit, window, value) for one station."""
        state = self.stations[sid]
        st = state.station
        scope = f"station:{sid}"
        if st.kind == "air":
            yield "env.aqi", "VN_AQI", "now", self._aqi(state, as_of, daily=False)
            yield "env.aqi", "VN_AQI", "today", self._aqi(state, as_of, daily=True)
            for window in ("1h", "24h"):
                n, c = r("pm25_n", scope, window), r("pm25_c", scope, window)
                value = round(c / n / 100, 2) if n else None
                yield "env.pm25", "µg/m³", window, (value, c / 100, float(n), None)
        elif st.kind == "water":
            latest = self._latest(state, as_of, "water_level_m")
            yield "water.level_m", "m", "now", (latest, None, None, None)
            yield (
                "water.alarm_level",
                "level",
                "now",
                (alarm_level(latest, st.alarm_levels_m), latest, None, _levels(st)),
            )
        elif st.kind == "rain":
            for window in ("1h", "24h"):
                # No reading in the window: unknown (a silent gauge), not "no rain".
                n = r("rain_n", scope, window)
                total = r("rain_cmm", scope, window) / 100 if n else None
                yield "rain.mm", "mm", window, (total, None, float(n), None)

    def _latest(self, state: StationState, as_of: int, name: str) -> float | None:
        times = [t for t in state.readings if t <= as_of and name in state.readings[t].values]
        return state.readings[max(times)].values[name] if times else None

    def _aqi(self, state: StationState, as_of: int, *, daily: bool) -> Value:
        hour = as_of // US_PER_HOUR
        if daily:
            first = (((as_of // US) + UTC_OFFSET_S) // 86400 * 86400 - UTC_OFFSET_S) * US // US_PER_HOUR
            series = {p: list(reversed(state.hourly_means(p, first, hour, as_of))) for p in aqi.POLLUTANTS}
            result = aqi.daily_aqi(series)
        else:
            series = {p: state.hourly_means(p, hour - 11, hour, as_of) for p in aqi.POLLUTANTS}
            result = aqi.hourly_aqi(series)
        if result is None:
            return None, None, None, None
        return float(result.aqi), None, None, {**result.describe(), "station": state.station.station_id}

    def offline(self, as_of: int, stations: Iterable[StationState]) -> list[str]:
        """Stations silent for more than 3 × their interval, judged at the minute of ``as_of``
        (like every clock-driven KPI, so the value only moves when the engine's minute does)."""
        as_of -= as_of % (60 * US)
        out = []
        for s in stations:
            seen = s.last_seen
            if seen is not None and seen > as_of:  # a reading stamped ahead of the clock has not happened yet
                seen = max((t for t in s.readings if t <= as_of), default=None)
            if seen is None or as_of - seen > 3 * s.station.interval_s * US:
                out.append(s.station.station_id)
        return sorted(out)


def alarm_level(level_m: float | None, levels: tuple[float | None, float | None, float | None]) -> float | None:
    """Highest flood alarm level (BĐ I–III) reached; None when unknown.

    Unknown means no reading, or the reading is below every configured level while some lower
    level is not configured (e.g. Dừa below BĐ III with BĐ I and II unknown).
    """
    if level_m is None or all(b is None for b in levels):
        return None
    for k in (3, 2, 1):
        b = levels[k - 1]
        if b is not None and level_m >= b:
            return float(k)
    return 0.0 if all(b is not None for b in levels) else None


def _levels(st: Station) -> dict[str, Any]:
    return {
        "bd1_m": st.alarm_levels_m[0],
        "bd2_m": st.alarm_levels_m[1],
        "bd3_m": st.alarm_levels_m[2],
        "river": st.river,
    }
