"""Scenarios: modifiers of the generators' parameters over simulated time.

Flood, DDoS, dossier surge and sensor outage.

Spans are compressed by default so an operator sees the whole story within minutes of
``ioc simulate``; pass ``span`` for realistic timing (a Cả river flood takes a day or two to peak).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ioc.errors import ConfigurationError
from ioc.registry import Station
from simulators import faults
from simulators.baseline import Scenario
from simulators.dossiers import DossierConditions
from simulators.incidents import IncidentConditions, InformationSystem
from simulators.sensors import SensorConditions

logger = logging.getLogger(__name__)

SCENARIOS = (
    "flood",
    "ddos",
    "dossier-surge",
    "sensor-outage",
    "sensor-faults",
    "dossier-surge-anomaly",
    "incident-burst",
)
#: A named scenario begins this long after the simulation starts, so the baseline shows first.
DEFAULT_LEAD = dt.timedelta(seconds=30)
DEFAULT_SPAN: Mapping[str, dt.timedelta] = {
    "flood": dt.timedelta(minutes=20),
    "ddos": dt.timedelta(minutes=5),
    "dossier-surge": dt.timedelta(minutes=30),
    # Longer than 3 × the slowest cadence (600 s), so every silent station counts as offline.
    "sensor-outage": dt.timedelta(minutes=40),
    # Labelled anomalies (simulators/faults.py): their own timelines, partly in the warm-start history.
    "sensor-faults": dt.timedelta(hours=2),
    "dossier-surge-anomaly": dt.timedelta(hours=3),
    "incident-burst": dt.timedelta(minutes=40),
}
#: Stations west of this longitude (the highland communes on the upper Cả) lose their uplink.
OUTAGE_WEST_OF_LON = 105.1
DDOS_TARGETS = 24


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3 - 2 * x)


@dataclass(frozen=True)
class Flood(Scenario):
    """A tropical depression's rain band: rain for 60 % of the span; rivers pass BĐ III by half-span,
    crest as the rain ends, then recede; gauges and rain stations report every minute meanwhile."""

    peak_rain_mm_per_h: float = 120.0

    def sensors(self, t: dt.datetime) -> SensorConditions:
        u = self.phase(t)
        if u is None or u >= 3.0:
            return SensorConditions()
        rain = self.peak_rain_mm_per_h * (0.5 + 0.5 * _smoothstep(u / 0.3)) if u < 0.6 else 0.0
        if u < 0.5:
            rise = 0.95 * _smoothstep(u / 0.5)
        elif u < 0.7:
            rise = 1.0 - 0.05 * ((u - 0.6) / 0.1) ** 2  # a crest, not a plateau: it rises while the rain lasts
        else:
            rise = 1.0 - 0.6 * _smoothstep((u - 0.7) / 0.3) if u < 1.0 else 0.4 * 0.5 ** ((u - 1.0) / 0.5)
        return SensorConditions(
            rain_mm_per_h=rain,
            river_rise=rise,
            fast_kinds=frozenset({"water", "rain"}),
            fast_interval_s=60,
        )


@dataclass(frozen=True)
class Ddos(Scenario):
    """A DDoS wave: critical/high ``ddos`` incidents, every target hit before any is hit twice."""

    targets: tuple[str, ...] = ()

    def incidents(self, t: dt.datetime) -> IncidentConditions:
        u = self.phase(t)
        if u is None or u >= 1.0:
            return IncidentConditions()
        return IncidentConditions(ddos_rate_per_s=self.peak_ddos_rate_per_s, ddos_targets=self.targets)


@dataclass(frozen=True)
class DossierSurge(Scenario):
    """Several times the usual intake: officials slow down, a backlog builds, more are late."""

    factor: float = 4.0

    def dossiers(self, t: dt.datetime) -> DossierConditions:
        u = self.phase(t)
        if u is None or u >= 1.0:
            return DossierConditions()
        ramp = _smoothstep(u / 0.1)  # the queue builds over the first tenth of the span
        return DossierConditions(
            rate_factor=1.0 + (self.factor - 1.0) * ramp,
            late_factor=1.0 + 3.0 * ramp,
            supplement_factor=1.0 + ramp,
            slowdown=1.0 + 0.6 * ramp,
        )


@dataclass(frozen=True)
class SensorOutage(Scenario):
    """A group of stations goes silent (a cut uplink), then comes back."""

    silent: frozenset[str] = field(default=frozenset())

    def sensors(self, t: dt.datetime) -> SensorConditions:
        u = self.phase(t)
        if u is None or u >= 1.0:
            return SensorConditions()
        return SensorConditions(silent=self.silent)


def outage_group(stations: Mapping[str, Station]) -> frozenset[str]:
    """The stations of the western highlands; the first five stations if there are none there."""
    west = frozenset(sid for sid, s in stations.items() if s.lon < OUTAGE_WEST_OF_LON)
    return west or frozenset(sorted(stations)[:5])


def ddos_targets(systems: Sequence[InformationSystem], count: int = DDOS_TARGETS) -> tuple[str, ...]:
    """Provincial systems first (the public-facing portals attract floods), then commune portals."""
    provincial = [s.system for s in systems if s.commune_code is None]
    communal = [s.system for s in systems if s.commune_code is not None]
    return tuple((provincial[: count * 2 // 3] + communal)[:count])


def build_scenario(
    name: str | None,
    begins: dt.datetime,
    *,
    span: dt.timedelta | None = None,
    stations: Mapping[str, Station] | None = None,
    systems: Sequence[InformationSystem] = (),
) -> Scenario:
    """The named scenario starting at ``begins``; ``None`` or ``"normal"`` is plain operation."""
    if name in (None, "", "normal", "none"):
        return Scenario()
    if name not in SCENARIOS:
        raise ConfigurationError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    span = span or DEFAULT_SPAN[name]
    if span <= dt.timedelta(0):
        raise ConfigurationError("scenario span must be positive")
    if name == "flood":
        return Flood(name, begins, span)
    if name == "ddos":
        targets = ddos_targets(systems)
        rate = 1.5 * len(targets) / span.total_seconds()
        return Ddos(name, begins, span, peak_ddos_rate_per_s=rate, targets=targets)
    if name == "dossier-surge":
        return DossierSurge(name, begins, span, peak_dossier_factor=4.0)
    if name in ("sensor-faults", "dossier-surge-anomaly", "incident-burst"):
        if name == "sensor-faults":
            plan, bands = faults.fault_plan(stations or {}, begins)
            return faults.SensorFaults(name, begins, span, faults=plan, bands=bands)
        if name == "dossier-surge-anomaly":
            return faults.DossierSurgeAnomaly(name, begins, span, extra=((begins, begins + span),))
        # A commune portal (few incidents of its own), Nam Đàn's when the registry has it.
        portals = [s.system for s in systems if s.commune_code is not None]
        system = next((s.system for s in systems if s.commune_code == "17935"), portals[0] if portals else None)
        return faults.IncidentBurst(
            name, begins, span, system=system or faults.IncidentBurst.system, extra=((begins, begins + span),)
        )
    return SensorOutage(name, begins, span, silent=outage_group(stations or {}))
