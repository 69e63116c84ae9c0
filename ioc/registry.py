"""Registries (CONTRACT §3): administrative units, stations and KPI targets, loaded from files."""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ioc.errors import ConfigurationError

UNIT_KINDS = frozenset({"xa", "phuong"})
STATION_KINDS = frozenset({"air", "water", "rain", "weather"})


@dataclass(frozen=True, slots=True)
class Unit:
    code: str
    name: str
    kind: str


@dataclass(frozen=True, slots=True)
class Station:
    station_id: str
    kind: str
    commune_code: str
    lat: float
    lon: float
    interval_s: int
    name: str = ""
    river: str = ""
    #: Flood alarm levels BĐ I, II, III in metres (water gauges); None where not known.
    alarm_levels_m: tuple[float | None, float | None, float | None] = (None, None, None)


@dataclass(frozen=True, slots=True)
class Target:
    kpi: str
    value: float
    direction: str  # "at_least" | "at_most"
    plan_no: int | None
    milestone_year: int


@dataclass(frozen=True)
class Registry:
    """Everything the stream worker and the API need to know about the province."""

    units: Mapping[str, Unit]
    stations: Mapping[str, Station]
    targets: Mapping[str, Target]
    warn_band: float = 5.0
    targets_source: str = ""
    _stations_by_commune: dict[str, tuple[Station, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        by_commune: dict[str, list[Station]] = {}
        for s in self.stations.values():
            by_commune.setdefault(s.commune_code, []).append(s)
        self._stations_by_commune.update({k: tuple(v) for k, v in by_commune.items()})

    def stations_in(self, commune_code: str) -> tuple[Station, ...]:
        return self._stations_by_commune.get(commune_code, ())


def _read_text(path: Path | None, packaged: str) -> str:
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    return resources.files("ioc.data").joinpath(packaged).read_text(encoding="utf-8")


def _rows(text: str, source: str, required: Iterable[str]) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = set(required) - set(reader.fieldnames or ())
    if missing:
        raise ConfigurationError(f"{source}: missing columns {sorted(missing)}")
    return list(reader)


def load_units(path: Path | None = None) -> dict[str, Unit]:
    units: dict[str, Unit] = {}
    for n, row in enumerate(
        _rows(_read_text(path, "units.csv"), str(path or "units.csv"), ("code", "name", "kind")), 2
    ):
        code = row["code"].strip()
        if not (code.isdigit() and len(code) == 5) or row["kind"] not in UNIT_KINDS:
            raise ConfigurationError(f"units line {n}: bad code or kind {row!r}")
        if code in units:
            raise ConfigurationError(f"units line {n}: duplicate code {code}")
        units[code] = Unit(code, row["name"].strip(), row["kind"])
    return units


def _level(text: str | None) -> float | None:
    text = (text or "").strip()
    return float(text) if text else None


def load_stations(path: Path | None = None, units: Mapping[str, Unit] | None = None) -> dict[str, Station]:
    stations: dict[str, Station] = {}
    required = ("station_id", "kind", "commune_code", "lat", "lon", "interval_s")
    for n, row in enumerate(_rows(_read_text(path, "stations.csv"), str(path or "stations.csv"), required), 2):
        try:
            station = Station(
                station_id=row["station_id"].strip(),
                kind=row["kind"].strip(),
                commune_code=row["commune_code"].strip(),
                lat=float(row["lat"]),
                lon=float(row["lon"]),
                interval_s=int(row["interval_s"]),
                name=(row.get("name") or "").strip(),
                river=(row.get("river") or "").strip(),
                alarm_levels_m=(_level(row.get("bd1_m")), _level(row.get("bd2_m")), _level(row.get("bd3_m"))),
            )
        except ValueError as exc:
            raise ConfigurationError(f"stations line {n}: {exc}") from exc
        if station.kind not in STATION_KINDS or station.interval_s <= 0:
            raise ConfigurationError(f"stations line {n}: bad kind or interval {row!r}")
        if units is not None and station.commune_code not in units:
            raise ConfigurationError(f"stations line {n}: unknown commune {station.commune_code}")
        if station.station_id in stations:
            raise ConfigurationError(f"stations line {n}: duplicate station {station.station_id}")
        stations[station.station_id] = station
    return stations


def load_targets(path: Path | None = None, today: dt.date | None = None) -> tuple[dict[str, Target], float, str]:
    """Targets in force on ``today``: the latest milestone already due, else the next one."""
    try:
        doc: Any = yaml.safe_load(_read_text(path, "targets.yaml"))
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"targets: {exc}") from exc
    year = (today or dt.date.today()).year
    targets: dict[str, Target] = {}
    for kpi, spec in (doc.get("targets") or {}).items():
        milestones = {int(y): float(v) for y, v in (spec.get("milestones") or {}).items()}
        if not milestones:
            raise ConfigurationError(f"targets: {kpi} has no milestones")
        due = [y for y in milestones if y <= year]
        chosen = max(due) if due else min(milestones)
        direction = spec.get("direction", "at_least")
        if direction not in ("at_least", "at_most"):
            raise ConfigurationError(f"targets: {kpi} direction must be at_least or at_most")
        targets[kpi] = Target(kpi, milestones[chosen], direction, spec.get("plan_no"), chosen)
    return targets, float(doc.get("warn_band", 5.0)), str(doc.get("source", ""))


def load_registry(
    units_file: Path | None = None,
    stations_file: Path | None = None,
    targets_file: Path | None = None,
    today: dt.date | None = None,
) -> Registry:
    units = load_units(units_file)
    stations = load_stations(stations_file, units)
    targets, warn_band, source = load_targets(targets_file, today)
    return Registry(units=units, stations=stations, targets=targets, warn_band=warn_band, targets_source=source)
