"""The normal scenario (`Scenario`): the conditions every other scenario bends, and the hooks it may use."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from simulators.dossiers import DossierConditions
from simulators.envelope import Event
from simulators.incidents import IncidentConditions
from simulators.sensors import SensorConditions


@dataclass(frozen=True)
class Scenario:
    """Normal operation; subclasses bend the conditions between ``begins`` and ``begins + span``."""

    name: str = "normal"
    begins: dt.datetime | None = None
    span: dt.timedelta = dt.timedelta(minutes=20)
    #: Upper bounds of the rate factors this scenario ever applies (for Poisson thinning).
    peak_dossier_factor: float = 1.0
    peak_incident_factor: float = 1.0
    peak_ddos_rate_per_s: float = 0.0

    @property
    def ends(self) -> dt.datetime | None:
        """When the span is over (effects such as a receding river may linger)."""
        return self.begins + self.span if self.begins is not None else None

    def phase(self, t: dt.datetime) -> float | None:
        """Progress: 0 at the scenario's start, 1 at the end of its span; None before it."""
        if self.begins is None or t < self.begins:
            return None
        return (t - self.begins) / self.span

    def dossiers(self, t: dt.datetime) -> DossierConditions:
        return DossierConditions()

    def incidents(self, t: dt.datetime) -> IncidentConditions:
        return IncidentConditions()

    def sensors(self, t: dt.datetime) -> SensorConditions:
        return SensorConditions()

    # Hooks of the labelled-anomaly scenarios (simulators/faults.py): events bent or added.
    #: Hours of warm-start sensor history the scenario needs at least.
    history_h: float = 0.0

    @property
    def labels(self) -> list[Any]:
        """The injected anomalies (`simulators.faults.Label`), for the benchmark."""
        return []

    def bend_sensors(self, events: Iterator[Event]) -> Iterator[Event]:
        return events

    def bend_dossiers(self, events: Iterator[Event]) -> Iterator[Event]:
        return events

    def extra_incidents(self, rng: random.Random) -> Iterator[Event]:
        return iter(())
