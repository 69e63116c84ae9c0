"""The KPI catalogue's machinery: counters per (series, scope), KPI specs, and how a value becomes a snapshot.

A KPI is computed from integer counters (see `streams.windows`), never from floating sums, so the
same events give the same value whatever their order. Each event kind's module declares its
counters' contributions and its `KpiSpec`s; `streams.engine` wires them together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ioc.registry import Registry, Target
from streams.windows import Series, local_day_of, local_month_of

#: A contribution of an entity to a counter: (series name, event time in µs).
Contribution = tuple[str, int]

US_PER_MIN = 60_000_000


class Counters:
    """All counters of one event kind: a `Series` per (series name, scope).

    Additions are gathered per (series, scope, minute) and folded into the series when they are
    next read or the clock moves: a batch of events touching the same minute costs one update.
    """

    def __init__(self, now_us: int) -> None:
        self.series: dict[tuple[str, str], Series] = {}
        self.now_m = now_us // US_PER_MIN
        self.pending: dict[tuple[str, tuple[str, ...], int], int] = {}

    def add(self, name: str, scopes: tuple[str, ...], ts_us: int, amount: int) -> None:
        """Add ``amount`` to series ``name`` of every scope in ``scopes`` at the minute of ``ts_us``."""
        key = (name, scopes, ts_us // US_PER_MIN)
        pending = self.pending
        pending[key] = pending.get(key, 0) + amount

    def flush(self) -> None:
        """Fold the gathered additions into their series."""
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        series_of, now_m = self.series, self.now_m
        for (name, scopes, minute), amount in pending.items():
            if amount:
                for scope in scopes:
                    series = series_of.get((name, scope))
                    if series is None:
                        series = series_of[(name, scope)] = Series()
                    series.add(minute, amount, now_m)

    def advance(self, now_us: int) -> bool:
        """Move the clock; True when the minute changed (windows may have moved)."""
        self.flush()
        new_m = now_us // US_PER_MIN
        if new_m <= self.now_m:
            return False
        for series in self.series.values():
            series.advance(self.now_m, new_m)
        self.now_m = new_m
        return True

    def prune(self) -> None:
        self.flush()
        for key, series in list(self.series.items()):
            series.prune(self.now_m)
            if series.is_empty():
                del self.series[key]

    def reader(self, as_of_us: int) -> Reader:
        self.flush()
        return Reader(self, as_of_us)


class Reader:
    """Read counters as of the clock: ``r(series, scope, window)``."""

    __slots__ = ("counters", "day", "month")

    def __init__(self, counters: Counters, as_of_us: int) -> None:
        self.counters = counters
        ts = as_of_us // 1_000_000
        self.day = local_day_of(ts)
        self.month = local_month_of(ts)

    def __call__(self, name: str, scope: str, window: str) -> int:
        series = self.counters.series.get((name, scope))
        if series is None:
            return 0
        return series.window(window, self.day, self.month)


#: What a KPI computes: (value, numerator, denominator, extra).
Value = tuple[float | None, float | None, float | None, dict[str, Any] | None]


@dataclass(frozen=True)
class KpiSpec:
    name: str
    unit: str
    windows: tuple[str, ...]
    #: Scope kinds this KPI is published for: "province", "commune", "agency", "station".
    scopes: tuple[str, ...]
    compute: Callable[[Reader, str, str], Value]
    definition: str = ""


def count(series: str) -> Callable[[Reader, str, str], Value]:
    def compute(r: Reader, scope: str, window: str) -> Value:
        n = r(series, scope, window)
        return float(n), None, None, None

    return compute


def percent(numerator: str, denominator: str) -> Callable[[Reader, str, str], Value]:
    def compute(r: Reader, scope: str, window: str) -> Value:
        return ratio(r(numerator, scope, window), r(denominator, scope, window), 100)

    return compute


def mean(total: str, n: str, divisor: float) -> Callable[[Reader, str, str], Value]:
    """Mean of ``total / divisor`` over ``n`` items (e.g. µs to hours)."""

    def compute(r: Reader, scope: str, window: str) -> Value:
        t, k = r(total, scope, window), r(n, scope, window)
        if k == 0:
            return None, float(t), 0.0, None
        return round(t / k / divisor, 2), float(t) / divisor, float(k), None

    return compute


def ratio(num: int, den: int, scale: float) -> Value:
    if den == 0:
        return None, float(num), 0.0, None
    return round(num * scale / den, 2), float(num), float(den), None


def status_of(value: float | None, target: Target | None, warn_band: float) -> str | None:
    """`ok`, `warn` (within ``warn_band`` points on the wrong side) or `breach`; None without a target or value."""
    if target is None or value is None:
        return None
    gap = value - target.value if target.direction == "at_least" else target.value - value
    if gap >= 0:
        return "ok"
    return "warn" if gap >= -warn_band else "breach"


def scope_kind(scope: str) -> str:
    return scope.split(":", 1)[0]


def entity_scopes(commune_code: str | None, agency_code: str | None) -> tuple[str, ...]:
    """The scopes an entity counts in: the province, its commune and its agency (each when known).

    The same tuple object for the same codes: built once per pair (a few thousand in a province), not
    per event."""
    scopes = _SCOPES.get((commune_code, agency_code))
    if scopes is None:
        built = ["province"]
        if commune_code:
            built.append(f"commune:{commune_code}")
        if agency_code:
            built.append(f"agency:{agency_code}")
        if len(_SCOPES) >= _SCOPES_MAX:  # agency codes are open-ended: keep the cache bounded
            _SCOPES.clear()
        scopes = _SCOPES[(commune_code, agency_code)] = tuple(built)
    return scopes


#: `entity_scopes` by (commune code, agency code).
_SCOPES: dict[tuple[str | None, str | None], tuple[str, ...]] = {}
_SCOPES_MAX = 100_000


def target_for(registry: Registry, kpi: str) -> Target | None:
    return registry.targets.get(kpi)


def published(specs: Iterable[KpiSpec], scope: str) -> Iterable[tuple[KpiSpec, str]]:
    kind = scope_kind(scope)
    for spec in specs:
        if kind in spec.scopes:
            for window in spec.windows:
                yield spec, window
