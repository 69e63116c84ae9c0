"""The anomaly detectors' parameters (`AnomalyConfig`): defaults, overridden by a YAML file of the same shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ioc.errors import ConfigurationError


@dataclass(frozen=True)
class StuckConfig:
    """Persistence test (WMO/TD-No. 1186 §6.3) scaled by the station's own chance of an unchanged step."""

    #: Chance of a false "stuck" per reading the run length is chosen for.
    alpha: float = 1e-5
    min_run: int = 6
    min_minutes: int = 45
    #: Differences of a quantity seen before the test applies (the warm-up).
    warmup: int = 24
    #: Exponential forgetting of the flat-step statistics per reading (~200 readings of memory).
    decay: float = 0.995
    #: Two readings closer than this are "unchanged" (about the instrument's resolution).
    tolerance: Mapping[str, float] = field(
        default_factory=lambda: {"water_level_m": 0.005, "pm25": 0.05, "temp_c": 0.05, "humidity_pct": 0.05}
    )


@dataclass(frozen=True)
class SpikeConfig:
    """Hampel-style test (Hampel 1974; Pearson 2002): a reading far from the median of the ones before it
    that the next reading takes back, beyond what the quantity can physically do in one interval."""

    history: int = 5
    n_sigma: float = 8.0
    #: Smallest jump counted as implausible within one reporting interval, per quantity.
    min_jump: Mapping[str, float] = field(
        default_factory=lambda: {"water_level_m": 0.3, "pm25": 60.0, "temp_c": 5.0, "humidity_pct": 25.0}
    )
    #: The next reading must take back at least this share of the jump (a real event does not).
    revert: float = 0.5
    warmup: int = 12
    #: How long a spike keeps the station's KPIs suspect and its finding active.
    hold_minutes: int = 60


@dataclass(frozen=True)
class DriftConfig:
    """Two-sided CUSUM (Page 1954) of the hourly residual against the median of the nearest same-kind stations."""

    neighbours: int = 6
    #: Quantities compared, by station kind; pm25 in log space (pollution is multiplicative).
    quantities: Mapping[str, str] = field(default_factory=lambda: {"air": "pm25", "weather": "temp_c"})
    k: float = 1.5
    h: float = 15.0
    #: Hours of residuals learnt before the CUSUM runs (a day: the residual has a daily cycle).
    warmup_h: int = 24
    #: Forgetting of the residual's mean and variance per hour (~50 hours of memory).
    decay: float = 0.98
    #: Hours in a row within ±k that clear a drift.
    clear_h: int = 2


@dataclass(frozen=True)
class UnresponsiveConfig:
    """A gauge whose level does not move while the nearest rain gauges report heavy rain."""

    rain_neighbours: int = 3
    max_km: float = 40.0
    window_h: float = 2.0
    #: The river answers rain this much later: the rain window ends this long before the evaluation.
    lag_h: float = 1.0
    min_rain_mm: float = 20.0
    min_response_m: float = 0.05
    every_minutes: int = 10


@dataclass(frozen=True)
class SurgeConfig:
    """Receipts per commune in sliding windows against the commune's share of the province's same hour of
    the week; negative-binomial upper tail with the commune's own dispersion (Farrington et al. 1996;
    Noufaily et al. 2013)."""

    #: Weeks of hourly history kept (the baseline) and needed before a commune-hour is judged (warm-up).
    weeks: int = 4
    min_weeks: int = 2
    alpha: float = 1e-6
    min_count: int = 8
    #: The window must hold at least this many times the expected receipts.
    ratio: float = 2.0
    #: Sliding windows judged (minutes): a short one finds a sharp surge early, a long one a steady one.
    windows_min: tuple[int, ...] = (60, 180)
    every_minutes: int = 15
    #: The dispersion (variance / mean) is estimated from the commune's history, within [1, this].
    max_dispersion: float = 10.0
    #: A surge closes when every window's tail probability is back above this.
    clear_alpha: float = 1e-2


@dataclass(frozen=True)
class BurstConfig:
    """Incidents per category and per system in a sliding hour against an exponentially weighted rate."""

    window_minutes: int = 60
    alpha: float = 1e-6
    min_count: int = 5
    ratio: float = 3.0
    warmup_h: int = 24
    half_life_h: float = 72.0
    #: Rate assumed for a key never seen (per hour): a system that never had an incident.
    floor_per_h: float = 0.2
    #: The burst clears when the window's tail probability rises above this.
    clear_alpha: float = 1e-2


@dataclass(frozen=True)
class AnomalyConfig:
    enabled: bool = True
    grace_s: int = 120
    #: The event-time watermark is this quantile of the stations' latest reading times...
    watermark_quantile: float = 0.1
    #: ...but never more than this far behind the newest one (a regional outage must not stall it).
    max_lag_s: int = 6 * 3600
    #: A finding that opened more than this long before the clock, and closed before the worker
    #: caught up (a back-fill, a backlog after an outage), is history, not an alert (`streams.catch_up`).
    history_after_h: float = 3.0
    stuck: StuckConfig = field(default_factory=StuckConfig)
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    unresponsive: UnresponsiveConfig = field(default_factory=UnresponsiveConfig)
    surge: SurgeConfig = field(default_factory=SurgeConfig)
    burst: BurstConfig = field(default_factory=BurstConfig)
    #: Quantities the single-station detectors watch, by station kind (rain is mostly zero: no).
    watched: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"air": ("pm25",), "water": ("water_level_m",), "weather": ("temp_c",)}
    )


def load_config(path: str | Path | None) -> AnomalyConfig:
    """Defaults, overridden by a YAML file of the same shape (``spike: {n_sigma: 6}``); errors name the key."""
    if path is None or str(path) == "":
        return AnomalyConfig()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigurationError(f"anomaly config {path}: {e}") from None
    config: AnomalyConfig = _override(AnomalyConfig(), raw, str(path))
    return config


def _override(obj: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where}: must be a mapping")
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigurationError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _override(current, value, f"{where}.{key}")
        elif isinstance(current, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigurationError(f"{where}.{key}: must be a mapping")
            changes[key] = {**current, **value}
        elif isinstance(current, tuple):
            if not isinstance(value, list) or not value or not all(isinstance(v, int) and v > 0 for v in value):
                raise ConfigurationError(f"{where}.{key}: must be a list of positive whole numbers, not {value!r}")
            changes[key] = tuple(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where}.{key}: must be true or false")
            changes[key] = value
        elif isinstance(current, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigurationError(f"{where}.{key}: must be a number, not {value!r}")
            changes[key] = type(current)(value)
        else:
            changes[key] = value
    return dataclasses.replace(obj, **changes)
