"""Anomaly detectors: stuck and spiking sensors, drift against neighbours, gauges deaf to rain, dossier surges, incident bursts.

Pure and deterministic, like the rest of `streams`: no clock but the event-time watermark the
`streams.engine.Engine` passes in (a low quantile of the stations' latest reading times). Every detector works on closed minute buckets: bucket ``m`` is
evaluated once the watermark (the newest event time seen, never ahead of the engine's clock) is
``grace_s`` past its end, from what has arrived by then; a record later than that is left out of
the detectors (it still counts in the KPIs; a late dossier receipt still counts in the surge windows
judged after it arrives). So the worker and `ioc replay` find the same anomalies
at the same event times. Per event the cost is O(1): readings are consumed once, in time order,
into incremental statistics; per minute every station is looked at once. Methods and references:
docs/anomaly.md.

Over 600 lines: the six detectors share one pass over the minute buckets and one station state
(`Detectors`), so they stay together; their configuration is `streams.anomaly_config`.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from ioc.contract import US, UTC_OFFSET_S
from ioc.registry import Registry, Station
from streams.anomaly_config import AnomalyConfig

MIN_US = 60 * US
HOUR_US = 3600 * US
WEEK_H = 7 * 24
#: Detectors and the alert domain of their findings.
DETECTORS = ("stuck", "spike", "drift", "unresponsive", "dossier_surge", "incident_burst")
#: The hour-of-week baseline is in local time (Asia/Ho_Chi_Minh, UTC+07:00).
UTC_OFFSET_H = UTC_OFFSET_S // 3600
#: Receipts per commune in minutes [from, to): the engine's reading of its dossier counters.
ReceiptSource = Callable[[int, int], Mapping[str, int]]


# --- findings ---------------------------------------------------------------------------------


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    """A detector's verdict on one subject: opened (``active``) or closed, with its evidence."""

    detector: str
    #: ``station:<id>``, ``commune:<code>``, ``category:<name>`` or ``system:<name>``.
    scope: str
    active: bool
    #: Event time the verdict was reached (the end of the evaluated bucket).
    at: dt.datetime
    domain: str
    quantity: str
    observed: float | None = None
    expected_low: float | None = None
    expected_high: float | None = None
    window_from: dt.datetime | None = None
    window_to: dt.datetime | None = None
    station: str | None = None
    commune: str | None = None
    #: How the verdict was reached, in a line (statistic and parameters).
    method: str = ""

    def explanation(self) -> dict[str, Any]:
        """The evidence as the alert carries it."""
        return {
            "detector": self.detector,
            "quantity": self.quantity,
            "observed": self.observed,
            "expected_low": self.expected_low,
            "expected_high": self.expected_high,
            "window_from": self.window_from.isoformat() if self.window_from else None,
            "window_to": self.window_to.isoformat() if self.window_to else None,
            "method": self.method,
        }


def _dt(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / US, dt.timezone(dt.timedelta(hours=UTC_OFFSET_H)))


def _r(x: float, digits: int = 3) -> float:
    return round(x, digits)


# --- statistics -------------------------------------------------------------------------------


def poisson_sf(n: int, lam: float) -> float:
    """P(X ≥ n) for X ~ Poisson(lam), summed from n upwards (accurate far into the tail)."""
    if n <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    term = math.exp(-lam + n * math.log(lam) - math.lgamma(n + 1))
    total, i = 0.0, n
    while term > 1e-300:
        total += term
        i += 1
        term *= lam / i
        if i > n + 10_000 or (i > lam and term < total * 1e-16):
            break
    return min(1.0, total)


def flat_run_needed(p_flat: float, alpha: float, min_run: int) -> int:
    """Run of unchanged steps whose chance under the station's own flat-step probability is below alpha."""
    if p_flat <= 0:
        return min_run
    if p_flat >= 1:
        return 1 << 30
    return max(min_run, math.ceil(math.log(alpha) / math.log(p_flat)))


def haversine_km(a: Station, b: Station) -> float:
    la1, lo1, la2, lo2 = map(math.radians, (a.lat, a.lon, b.lat, b.lon))
    h = math.sin((la2 - la1) / 2) ** 2 + math.cos(la1) * math.cos(la2) * math.sin((lo2 - lo1) / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# --- single-station series --------------------------------------------------------------------


class _Series:
    """One quantity of one station: flat-step statistics, the recent readings, hourly sums."""

    __slots__ = ("flat_n", "hours", "last_t", "last_x", "longest", "mad", "n", "recent", "run", "run_start",
                 "spike_until", "stuck", "zeros")  # fmt: skip

    def __init__(self, history: int) -> None:
        self.last_t: int | None = None
        self.last_x = 0.0
        self.n = 0.0  # EW count of differences
        self.flat_n = 0  # differences seen (warm-up)
        self.zeros = 0.0  # EW count of unchanged steps
        self.mad = 0.0  # EW mean absolute difference
        self.run = 0
        self.run_start = 0
        self.longest = 0.0  # the longest ordinary flat run lately (slowly forgotten)
        self.stuck = False
        self.recent: deque[tuple[int, float]] = deque(maxlen=history + 1)
        self.spike_until: int | None = None
        self.hours: dict[int, list[float]] = {}


class _Drift:
    __slots__ = ("active", "calm", "mean", "n", "s_hi", "s_lo", "var")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.var = 0.0
        self.s_hi = self.s_lo = 0.0
        self.active = False
        self.calm = 0


class Detectors:
    """Every detector of the province, fed by the engine; `take()` hands out the findings made."""

    def __init__(self, registry: Registry, config: AnomalyConfig | None = None) -> None:
        self.registry = registry
        self.config = config or AnomalyConfig()
        cfg = self.config
        self.stations = dict(sorted(registry.stations.items()))
        self.series: dict[tuple[str, str], _Series] = {
            (sid, q): _Series(cfg.spike.history)
            for sid, st in self.stations.items()
            for q in cfg.watched.get(st.kind, ())
        }
        self.done: dict[str, int] = {}  # station → last reading time consumed
        #: Next minute bucket (index, µs // 60 s) to evaluate; None until the first evaluation.
        self.next_minute: int | None = None
        #: The minute of the first receipt taken in (after a start or restart): earlier hours are no
        #: part of the history (what the counters reloaded for them may be incomplete).
        self.receipts_from: int | None = None
        self.findings: list[Finding] = []
        #: Station → detectors holding a finding open on it (its KPIs are suspect).
        self.suspect: dict[str, set[str]] = {}
        #: Stations whose suspect state changed since the engine last took them.
        self.changed_stations: set[str] = set()
        self.neighbours = {
            sid: self._nearest(st, st.kind, cfg.drift.neighbours, None)
            for sid, st in self.stations.items()
            if st.kind in cfg.drift.quantities
        }
        self.drift: dict[str, _Drift] = {sid: _Drift() for sid in self.neighbours}
        self.drift_done: dict[str, int] = {}  # station → last hour judged
        self.rain_near = {
            sid: self._nearest(st, "rain", cfg.unresponsive.rain_neighbours, cfg.unresponsive.max_km)
            for sid, st in self.stations.items()
            if st.kind == "water"
        }
        self.deaf: set[str] = set()
        # Dossier receipts: minute → commune → n, as `on_dossier` tells them (recent minutes only), plus
        # those of partitions other workers fold, read from their partials (`receipts_source`).
        self.receipts: dict[int, dict[str, int]] = {}
        #: Every minute bucket before this one is dropped (None: none yet).
        self.receipts_pruned: int | None = None
        self.receipts_source: ReceiptSource | None = None
        self.communes: set[str] = set(registry.units)
        # Hourly history by hour of the week, aligned week by week: each commune's and the province's.
        self.receipt_history: dict[tuple[str, int], deque[int]] = {}
        self.province_history: dict[int, deque[int]] = {}
        self.commune_total: dict[str, int] = {}
        self.province_total = 0
        self.dispersion: dict[str, float] = {}
        self.surging: set[str] = set()
        #: (commune, hour) of a surge (open at a judgement in that hour, or in the window that found it):
        #: it enters the history at its expected count.
        self.surged: set[tuple[str, int]] = set()
        # Incidents: minute → key → n; sliding window per key; EW hourly rate per key.
        self.incidents: dict[int, dict[str, int]] = {}
        self.window: dict[str, deque[tuple[int, int]]] = {}
        self.window_n: dict[str, int] = {}
        self.hour_incidents: dict[str, int] = {}
        self.rate: dict[str, float] = {}
        self.burst_hours = 0
        self.bursting: set[str] = set()
        self.max_event_us = 0

    def _nearest(self, st: Station, kind: str, k: int, max_km: float | None) -> tuple[str, ...]:
        others = [
            (haversine_km(st, o), o.station_id)
            for o in self.stations.values()
            if o.kind == kind and o.station_id != st.station_id
        ]
        others.sort()
        return tuple(sid for d, sid in others[:k] if max_km is None or d <= max_km)

    # --- inputs -------------------------------------------------------------------------------

    def on_dossier(self, t: int, commune: str | None) -> None:
        """A new ``received`` event at ``t`` (µs) in ``commune``."""
        self.max_event_us = max(self.max_event_us, t)
        if commune is None:
            return  # provincial level: no commune's counter
        m = t // MIN_US
        if self.receipts_from is None:
            self.receipts_from = m
        # A receipt later than the grace still counts in the windows judged after it arrives (as one
        # in a late partial does), but not in an hour that has already joined the history.
        if self.receipts_pruned is not None and m < self.receipts_pruned:
            return  # out of every window already
        bucket = self.receipts.setdefault(m, {})
        bucket[commune] = bucket.get(commune, 0) + 1
        self.communes.add(commune)

    def on_incident(self, t: int, category: str | None, system: str | None) -> None:
        """A new ``detected`` incident at ``t`` (µs)."""
        self.max_event_us = max(self.max_event_us, t)
        m = t // MIN_US
        if self.next_minute is not None and m < self.next_minute:
            return
        bucket = self.incidents.setdefault(m, {})
        for key in (f"category:{category}" if category else None, f"system:{system}" if system else None):
            if key is not None:
                bucket[key] = bucket.get(key, 0) + 1

    def take(self) -> list[Finding]:
        out, self.findings = self.findings, []
        return out

    def take_changed_stations(self) -> set[str]:
        out, self.changed_stations = self.changed_stations, set()
        return out

    def quality(self, station_id: str) -> str | None:
        return "suspect" if self.suspect.get(station_id) else None

    # --- the clock ----------------------------------------------------------------------------

    def advance(self, watermark_us: int, readings: Mapping[str, Any]) -> None:
        """Evaluate every minute bucket that ended ``grace_s`` before ``watermark_us``.

        ``readings`` maps station id → `streams.sensor.StationState` (readings by time).
        """
        if not self.config.enabled:
            return
        last = (watermark_us - self.config.grace_s * US) // MIN_US - 1  # the newest closed bucket
        if self.next_minute is None:
            starts = [s.times()[0] // MIN_US for s in readings.values() if s.readings]
            starts += [
                *self.receipts,
                *self.incidents,
                *([self.receipts_from] if self.receipts_from is not None else []),
            ]
            if not starts:
                return  # nothing seen yet: the first data, however old, starts the buckets
            self.next_minute = min(*starts, last + 1)
        while self.next_minute <= last:
            self._minute(self.next_minute, readings)
            self.next_minute += 1

    def _minute(self, m: int, readings: Mapping[str, Any]) -> None:
        end = (m + 1) * MIN_US  # readings with t < end belong to this bucket or before
        for sid, state in readings.items():
            kind = self.stations[sid].kind if sid in self.stations else None
            quantities = self.config.watched.get(kind or "", ())
            if not quantities or not state.readings:
                continue
            times = state.times()
            lo = bisect.bisect_right(times, self.done.get(sid, -1))
            hi = bisect.bisect_left(times, end)
            for t in times[lo:hi]:
                values = state.readings[t].values
                for q in quantities:
                    x = values.get(q)
                    if x is not None:
                        self._reading(sid, q, t, float(x))
            if hi > lo:
                self.done[sid] = times[hi - 1]
        for (sid, q), s in self.series.items():
            if s.spike_until is not None and s.spike_until < end:
                s.spike_until = None
                self._close(sid, "spike", q, end)
        minute_of_hour = (m + 1) % 60
        if minute_of_hour == 0:
            self._drift_hour(m // 60)
        if (m + 1) % self.config.unresponsive.every_minutes == 0:
            self._unresponsive(end, readings)
        self._receipts_minute(m)
        self._incidents_minute(m)

    # --- stuck and spike ----------------------------------------------------------------------

    def _reading(self, sid: str, q: str, t: int, x: float) -> None:
        s = self.series[(sid, q)]
        cfg = self.config
        if s.last_t is not None:
            self._spike(sid, q, s, t, x)  # judged against the statistics before this step
            d = abs(x - s.last_x)
            tol = cfg.stuck.tolerance.get(q, 0.0)
            if d <= tol:
                if s.run == 0:
                    s.run_start = s.last_t
                s.run += 1
                if not s.stuck and s.flat_n >= cfg.stuck.warmup:
                    p_flat = (s.zeros + 1) / (s.n + 2)
                    # Flat steps cluster (a tide at slack water): never less than twice the longest
                    # ordinary run this sensor has had lately.
                    need = max(flat_run_needed(p_flat, cfg.stuck.alpha, cfg.stuck.min_run), math.ceil(2 * s.longest))
                    if s.run >= need and t - s.run_start >= cfg.stuck.min_minutes * MIN_US:
                        s.stuck = True
                        spread = max(s.mad * 1.25, tol)
                        self._open(
                            "stuck", sid, q, t, x, x - 3 * spread, x + 3 * spread, s.run_start, t,
                            f"persistence: {s.run} unchanged readings (|Δ| ≤ {tol:g}); at this station's "
                            f"flat-step rate {p_flat:.3f}, {need} in a row happen with p < {cfg.stuck.alpha:g}",
                        )  # fmt: skip
            else:
                s.longest *= cfg.stuck.decay
                if s.run and not s.stuck:
                    s.longest = max(s.longest, float(s.run))
                    for _ in range(s.run):  # an ordinary flat stretch joins the station's statistics
                        s.n = s.n * cfg.stuck.decay + 1
                        s.zeros = s.zeros * cfg.stuck.decay + 1
                    s.flat_n += s.run
                if s.stuck:
                    s.stuck = False
                    self._close(sid, "stuck", q, t)
                s.run = 0
                s.n = s.n * cfg.stuck.decay + 1
                s.zeros *= cfg.stuck.decay
                s.flat_n += 1
                weight = max(1.0 - cfg.stuck.decay, 1.0 / s.flat_n)
                # Winsorised at 5 × the current scale, so a spike does not widen what counts as normal.
                s.mad += ((min(d, 5 * s.mad) if s.flat_n > cfg.spike.warmup else d) - s.mad) * weight
        s.last_t, s.last_x = t, x
        s.recent.append((t, x))
        if q == self.config.drift.quantities.get(self.stations[sid].kind):
            h = t // HOUR_US
            acc = s.hours.setdefault(h, [0.0, 0.0])
            acc[0] += math.log1p(x) if q == "pm25" else x
            acc[1] += 1

    def _spike(self, sid: str, q: str, s: _Series, t: int, x: float) -> None:
        """Judge the previous reading (``s.recent[-1]``) now that the next one (``x``) is known."""
        cfg = self.config.spike
        if s.flat_n < cfg.warmup or len(s.recent) < 4:
            return
        ct, cx = s.recent[-1]
        prior = [v for _, v in list(s.recent)[:-1]]
        med = _median(prior)
        jump = cx - med
        back = cx - x
        thr = max(cfg.n_sigma * 1.25 * s.mad, cfg.min_jump.get(q, math.inf))
        if abs(jump) > thr and abs(back) > cfg.revert * abs(jump) and (jump > 0) == (back > 0):
            s.recent.pop()  # the outlier must not bend the median of what follows, nor the hourly mean
            acc = s.hours.get(ct // HOUR_US)
            if acc is not None and acc[1] > 1:
                acc[0] -= math.log1p(cx) if q == "pm25" else cx
                acc[1] -= 1
            if s.spike_until is None:
                low = med - thr if q == "temp_c" else max(0.0, med - thr)
                self._open(
                    "spike", sid, q, ct, cx, low, med + thr, s.recent[0][0], t,
                    f"Hampel-style: |{_r(cx)} − median {_r(med)}| > {_r(thr)} (max({cfg.n_sigma:g}·σ, "
                    f"{cfg.min_jump.get(q, 0):g})) and the next reading returned to {_r(x)}",
                )  # fmt: skip
            s.spike_until = ct + cfg.hold_minutes * MIN_US

    # --- drift against neighbours -------------------------------------------------------------

    def _drift_hour(self, now_h: int) -> None:
        """Judge, for each station, every hour it has complete data for and has not been judged for.

        An hour is complete for a station once a later reading of it has been consumed (so an hour is
        judged an hour after it ends); a station whose readings come late (a partition read behind
        the others) is judged when they come, against the neighbours' means kept for 48 hours."""
        cfg = self.config.drift
        for sid in self.neighbours:
            s = self.series.get((sid, cfg.quantities[self.stations[sid].kind]))
            if s is None or s.last_t is None or not s.hours:
                continue
            complete = s.last_t // HOUR_US - 1
            first = self.drift_done.get(sid, min(s.hours) - 1) + 1
            for h in range(first, min(complete, now_h) + 1):
                self._drift_step(sid, h)
                self.drift_done[sid] = h
            for old in [k for k in s.hours if k < now_h - 48]:
                del s.hours[old]

    def _hour_mean(self, sid: str, h: int) -> float | None:
        s = self.series.get((sid, self.config.drift.quantities[self.stations[sid].kind]))
        if s is None or s.last_t is None or s.last_t < (h + 1) * HOUR_US or s.stuck or s.spike_until is not None:
            return None
        acc = s.hours.get(h)
        return acc[0] / acc[1] if acc and acc[1] else None

    def _drift_step(self, sid: str, h: int) -> None:
        cfg = self.config.drift
        mine = self._hour_mean(sid, h)
        if mine is None:
            return
        # A station already found drifting is no reference for the others.
        others = [
            m for n in self.neighbours[sid] if not self.drift[n].active and (m := self._hour_mean(n, h)) is not None
        ]
        if len(others) < 2:
            return
        ref = _median(others)
        r = mine - ref
        d = self.drift[sid]
        q = cfg.quantities[self.stations[sid].kind]
        if d.n >= cfg.warmup_h and d.var > 0:
            sd = math.sqrt(d.var)
            z = (r - d.mean) / sd
            d.s_hi = min(2 * cfg.h, max(0.0, d.s_hi + z - cfg.k))
            d.s_lo = min(2 * cfg.h, max(0.0, d.s_lo - z - cfg.k))
            at = (h + 1) * HOUR_US
            if not d.active and max(d.s_hi, d.s_lo) > cfg.h:
                d.active, d.calm = True, 0
                lo, hi, observed = ref + d.mean - 2 * sd, ref + d.mean + 2 * sd, mine
                if q == "pm25":
                    lo, hi, observed = max(0.0, math.expm1(lo)), math.expm1(hi), math.expm1(observed)
                self._open(
                    "drift", sid, q, at, observed, lo, hi,
                    at - max(1, int(max(d.s_hi, d.s_lo) / max(cfg.k, 0.1))) * HOUR_US, at,
                    f"CUSUM (Page 1954) of the hourly residual against the median of {len(others)} nearest "
                    f"{self.stations[sid].kind} stations: S = {_r(max(d.s_hi, d.s_lo), 1)} > h = {cfg.h:g} (k = {cfg.k:g})",
                )  # fmt: skip
            elif d.active:
                d.calm = d.calm + 1 if abs(z) <= cfg.k else 0
                if d.calm >= cfg.clear_h:
                    d.active, d.s_hi, d.s_lo = False, 0.0, 0.0
                    self._close(sid, "drift", q, at)
            if d.active or max(d.s_hi, d.s_lo) > cfg.h / 2:
                return  # a suspicious residual must not teach the baseline
        d.n += 1
        w = max(1.0 - cfg.decay, 1.0 / d.n)
        delta = r - d.mean
        d.mean += w * delta
        d.var = (1 - w) * (d.var + w * delta * delta)

    # --- a gauge deaf to rain -----------------------------------------------------------------

    def _unresponsive(self, end: int, readings: Mapping[str, Any]) -> None:
        cfg = self.config.unresponsive
        rain_to = end - int(cfg.lag_h * HOUR_US)
        since = rain_to - int(cfg.window_h * HOUR_US)
        for sid, gauges in self.rain_near.items():
            sums = []
            for g in gauges:
                state = readings.get(g)
                if state is None or not state.readings:
                    continue
                times = state.times()
                window = times[bisect.bisect_right(times, since) : bisect.bisect_left(times, rain_to)]
                if window:
                    sums.append(sum(state.readings[t].values.get("rain_mm", 0.0) for t in window))
            state = readings.get(sid)
            deaf = False
            levels: list[float] = []
            if len(sums) >= 2 and state is not None and state.readings:
                times = state.times()
                window = times[bisect.bisect_right(times, since) : bisect.bisect_left(times, end)]
                levels = [state.readings[t].values["water_level_m"] for t in window
                          if "water_level_m" in state.readings[t].values]  # fmt: skip
                rain = _median(sums)
                deaf = rain >= cfg.min_rain_mm and len(levels) >= 3 and max(levels) - min(levels) < cfg.min_response_m
            if deaf and sid not in self.deaf:
                self.deaf.add(sid)
                rain = _median(sums)
                self._open(
                    "unresponsive", sid, "water_level_m", end, _r(max(levels) - min(levels)), cfg.min_response_m,
                    None, since, end,
                    f"level moved {_r(max(levels) - min(levels))} m while the median of {len(sums)} nearby rain "
                    f"gauges had {_r(rain, 1)} mm (≥ {cfg.min_rain_mm:g}) in {cfg.window_h:g} h, lag {cfg.lag_h:g} h",
                )  # fmt: skip
            elif not deaf and sid in self.deaf:
                self.deaf.discard(sid)
                self._close(sid, "unresponsive", "water_level_m", end)

    # --- dossier receipts ---------------------------------------------------------------------

    def _receipt_counts(self, m_from: int, m_to: int) -> dict[str, int]:
        """Receipts per commune in minutes [m_from, m_to), as known now."""
        out: dict[str, int] = dict(self.receipts_source(m_from, m_to)) if self.receipts_source is not None else {}
        for m in range(m_from, m_to):
            for commune, n in self.receipts.get(m, {}).items():
                out[commune] = out.get(commune, 0) + n
        return out

    def surge_expected(self, commune: str, how: int) -> float | None:
        """Receipts expected in ``commune`` in one hour of hour-of-week ``how``: its share of the province's
        receipts over the history times the province's mean for that hour; None during the warm-up."""
        prov = self.province_history.get(how)
        if prov is None or len(prov) < self.config.surge.min_weeks:
            return None
        return self._share(commune) * sum(prov) / len(prov)

    def _share(self, commune: str) -> float:
        # At least one receipt's worth: a commune without a single one in weeks still expects a little.
        return max(self.commune_total.get(commune, 0), 1) / max(self.province_total, 1)

    def _window_expected(self, commune: str, m_from: int, m_to: int) -> float | None:
        total = 0.0
        h = m_from // 60
        while h * 60 < m_to:
            mu = self.surge_expected(commune, (h + UTC_OFFSET_H) % WEEK_H)
            if mu is None:
                return None
            total += mu * (min(m_to, (h + 1) * 60) - max(m_from, h * 60)) / 60
            h += 1
        return total

    def _receipts_minute(self, m: int) -> None:
        cfg = self.config.surge
        end_m = m + 1
        closing = end_m % 60 == 0
        if end_m % cfg.every_minutes == 0 or closing:
            self._judge_receipts(end_m)
        if closing:
            # An hour joins the baseline once it has left the longest window, so that no window is
            # judged against a baseline holding its own receipts.
            self._close_receipt_hour(m // 60 - math.ceil(max(cfg.windows_min) / 60))
        # Minutes are judged in order, so the ones gone out of every window are dropped in order: a
        # scan of every bucket held each minute cost a month's replay minutes (60,000² comparisons).
        keep_from = end_m - 60 * math.ceil(max(cfg.windows_min) / 60) - 60
        if self.receipts_pruned is None:
            self.receipts_pruned = min(self.receipts, default=keep_from)
        while self.receipts_pruned < keep_from:
            self.receipts.pop(self.receipts_pruned, None)
            self.receipts_pruned += 1

    def _judge_receipts(self, end_m: int) -> None:
        cfg = self.config.surge
        end = end_m * MIN_US
        windows = sorted(cfg.windows_min)
        counts = {w: self._receipt_counts(end_m - w, end_m) for w in windows}
        if self.receipts_from is None and counts[windows[-1]]:
            self.receipts_from = end_m  # a merger owning no dossier partition: its history starts now
        widest = counts[windows[-1]]
        for commune in sorted(self.communes | set(widest)):
            if widest.get(commune, 0) < cfg.min_count and commune not in self.surging:
                continue  # too few in the widest window, so in every window: no surge to open or close
            phi = self.dispersion.get(commune, 1.0)
            best: tuple[float, int, int, float] | None = None  # (p, window, n, expected)
            calm = True  # every window back within its ordinary range
            for w in windows:
                mu = self._window_expected(commune, end_m - w, end_m)
                if mu is None:
                    break
                n = counts[w].get(commune, 0)
                candidate = n >= cfg.min_count and n >= cfg.ratio * mu
                if not candidate and commune not in self.surging:
                    continue  # the tail is wanted only for a candidate, or to see a surge calm down
                p = nbinom_sf(n, mu, phi)
                calm = calm and p > cfg.clear_alpha
                if candidate and p < cfg.alpha and (best is None or p < best[0]):
                    best = (p, w, n, mu)
            if best is not None and commune not in self.surging:
                self.surging.add(commune)
                p, w, n, mu = best
                # The hours of the window that found it are the surge's too (none has joined the history).
                self.surged.update((commune, h) for h in range((end_m - w) // 60, (end_m - 1) // 60 + 1))
                lo, hi = _nb_range(mu, phi)
                self._open_scope(
                    "dossier_surge", f"commune:{commune}", "dossier", "dossier.received", end, float(n), lo, hi,
                    end - w * MIN_US, end, commune,
                    f"{n} receipts in {w} min vs {_r(mu, 1)} expected (the commune's share of the province's "
                    f"receipts × the province's same hours of the week); negative binomial, dispersion "
                    f"{_r(phi, 2)}: P(X ≥ {n}) = {p:.1e} < {cfg.alpha:g}",
                )  # fmt: skip
            elif calm and commune in self.surging:
                self.surging.discard(commune)
                self._close_scope("dossier_surge", f"commune:{commune}", "dossier", "dossier.received", end, commune)
            if commune in self.surging:
                self.surged.add((commune, (end_m - 1) // 60))

    def _close_receipt_hour(self, hour: int) -> None:
        """The hour's receipts join the history (a surging commune's at their expected count: a surge
        must not become the baseline); each commune's dispersion is estimated again daily."""
        cfg = self.config.surge
        if self.receipts_from is None or hour * 60 < self.receipts_from:
            return  # before the first receipt taken in: unknown, not empty
        how = (hour + UTC_OFFSET_H) % WEEK_H
        counts = self._receipt_counts(hour * 60, hour * 60 + 60)
        self.communes.update(counts)
        kept: dict[str, int] = {}
        for commune in sorted(self.communes):
            n = counts.get(commune, 0)
            mu = self.surge_expected(commune, how)
            if (commune, hour) in self.surged and mu is not None:
                n = min(n, round(mu))
            kept[commune] = n
        self.surged = {(c, h) for c, h in self.surged if h > hour}
        prov = self.province_history.setdefault(how, deque(maxlen=cfg.weeks))
        if len(prov) == cfg.weeks:
            self.province_total -= prov[0]
        prov.append(sum(kept.values()))
        self.province_total += prov[-1]
        for commune, n in kept.items():
            hist = self.receipt_history.setdefault((commune, how), deque(maxlen=cfg.weeks))
            if len(hist) == cfg.weeks:
                self.commune_total[commune] -= hist[0]
            hist.append(n)
            self.commune_total[commune] = self.commune_total.get(commune, 0) + n
        if how % 24 == 0:  # once a day, at local midnight: it changes slowly, and costs weeks × 168 per commune
            self._estimate_dispersion()

    def _estimate_dispersion(self) -> None:
        """Pearson's χ² over the commune's history divided by its degrees of freedom (the quasi-Poisson
        dispersion of Farrington et al. 1996), within [1, max_dispersion]."""
        cfg = self.config.surge
        for commune in sorted(self.communes):
            if not self.commune_total.get(commune):
                self.dispersion[commune] = 1.0  # nothing in weeks: nothing to measure
                continue
            share = self._share(commune)
            chi2, k = 0.0, 0
            for how, prov in self.province_history.items():
                hist = self.receipt_history.get((commune, how))
                if not hist:
                    continue
                # Aligned from the newest week back (a commune first seen later has a shorter history).
                for x, p in zip(reversed(hist), reversed(prov), strict=False):
                    mu = share * p
                    if mu > 0:
                        chi2 += (x - mu) ** 2 / mu
                        k += 1
            self.dispersion[commune] = min(cfg.max_dispersion, max(1.0, chi2 / (k - 1))) if k > 1 else 1.0

    # --- incident bursts ----------------------------------------------------------------------

    def burst_expected(self, key: str) -> float:
        """Incidents expected for ``key`` in one window: the EW hourly rate (bias-corrected: it
        started at 0 and has gathered ``1 − a^hours`` of its weight), at least the floor."""
        cfg = self.config.burst
        learnt = 1 - 0.5 ** (self.burst_hours / cfg.half_life_h) if self.burst_hours else 1.0
        return max(self.rate.get(key, 0.0) / learnt, cfg.floor_per_h) * cfg.window_minutes / 60

    def _incidents_minute(self, m: int) -> None:
        cfg = self.config.burst
        for key, n in self.incidents.pop(m, {}).items():
            self.window.setdefault(key, deque()).append((m, n))
            self.window_n[key] = self.window_n.get(key, 0) + n
            self.hour_incidents[key] = self.hour_incidents.get(key, 0) + n
        end = (m + 1) * MIN_US
        for key in sorted(self.window):
            w = self.window[key]
            while w and w[0][0] <= m - cfg.window_minutes:
                self.window_n[key] -= w.popleft()[1]
            n = self.window_n[key]
            lam = self.burst_expected(key)
            p = poisson_sf(n, lam)
            warm = self.burst_hours >= cfg.warmup_h
            if warm and key not in self.bursting and n >= cfg.min_count and n >= cfg.ratio * lam and p < cfg.alpha:
                self.bursting.add(key)
                lo, hi = _poisson_range(lam)
                self._open_scope(
                    "incident_burst", key, "cyber", "cyber.incidents", end, float(n), lo, hi,
                    end - cfg.window_minutes * MIN_US, end, None,
                    f"{n} incidents in {cfg.window_minutes} min vs {_r(lam, 2)} expected (EW rate, half-life "
                    f"{cfg.half_life_h:g} h); Poisson P(X ≥ {n}) = {p:.1e} < {cfg.alpha:g}",
                )  # fmt: skip
            elif key in self.bursting and p > cfg.clear_alpha:
                self.bursting.discard(key)
                self._close_scope("incident_burst", key, "cyber", "cyber.incidents", end, None)
            if not w and key not in self.bursting:
                del self.window[key], self.window_n[key]
        if (m + 1) % 60 == 0:
            a = 0.5 ** (1 / cfg.half_life_h)
            for key in sorted(set(self.rate) | set(self.hour_incidents)):
                n = self.hour_incidents.get(key, 0)
                if key in self.bursting:
                    continue  # a burst must not become the baseline
                self.rate[key] = a * self.rate.get(key, 0.0) + (1 - a) * n
            self.hour_incidents = {}
            self.burst_hours += 1

    # --- output -------------------------------------------------------------------------------

    def _open(
        self, detector: str, sid: str, q: str, t: int, observed: float | None, lo: float | None, hi: float | None,
        since: int, until: int, method: str,
    ) -> None:  # fmt: skip
        st = self.stations[sid]
        domain = "water" if st.kind in ("water", "rain") else "env"
        self.suspect.setdefault(sid, set()).add(detector)
        self.changed_stations.add(sid)
        self.findings.append(
            Finding(
                detector=detector, scope=f"station:{sid}", active=True, at=_dt(t), domain=domain, quantity=q,
                observed=None if observed is None else _r(observed), expected_low=None if lo is None else _r(lo),
                expected_high=None if hi is None else _r(hi), window_from=_dt(since), window_to=_dt(until),
                station=sid, commune=st.commune_code, method=method,
            )
        )  # fmt: skip

    def _close(self, sid: str, detector: str, q: str, t: int) -> None:
        st = self.stations[sid]
        held = self.suspect.get(sid)
        if held is not None:
            held.discard(detector)
            if not held:
                del self.suspect[sid]
        self.changed_stations.add(sid)
        domain = "water" if st.kind in ("water", "rain") else "env"
        self.findings.append(
            Finding(detector=detector, scope=f"station:{sid}", active=False, at=_dt(t), domain=domain, quantity=q,
                    station=sid, commune=st.commune_code)
        )  # fmt: skip

    def _open_scope(
        self, detector: str, scope: str, domain: str, q: str, t: int, observed: float, lo: float, hi: float,
        since: int, until: int, commune: str | None, method: str,
    ) -> None:  # fmt: skip
        self.findings.append(
            Finding(
                detector=detector, scope=scope, active=True, at=_dt(t), domain=domain, quantity=q, observed=observed,
                expected_low=_r(lo, 1), expected_high=_r(hi, 1), window_from=_dt(since), window_to=_dt(until),
                commune=commune, method=method,
            )
        )  # fmt: skip

    def _close_scope(self, detector: str, scope: str, domain: str, q: str, t: int, commune: str | None) -> None:
        self.findings.append(
            Finding(detector=detector, scope=scope, active=False, at=_dt(t), domain=domain, quantity=q, commune=commune)
        )


def nbinom_sf(n: int, mean: float, dispersion: float) -> float:
    """P(X ≥ n) for X negative binomial with ``mean`` and variance ``dispersion`` × mean (Poisson when
    the dispersion is 1), summed from n upwards or, below the mean, as 1 − P(X < n)."""
    if dispersion <= 1.0 + 1e-9:
        return poisson_sf(n, mean)
    if n <= 0:
        return 1.0
    if mean <= 0:
        return 0.0
    r = mean / (dispersion - 1)  # size; success probability 1 / dispersion
    q = 1 - 1 / dispersion

    def pmf(k: int) -> float:
        return math.exp(math.lgamma(k + r) - math.lgamma(r) - math.lgamma(k + 1) - r * math.log(dispersion)
                        + k * math.log(q))  # fmt: skip

    if n <= mean:
        below, term = 0.0, pmf(0)
        for k in range(n):
            below += term
            term *= (k + r) / (k + 1) * q
        return max(0.0, 1.0 - below)
    total, term, k = 0.0, pmf(n), n
    while term > 1e-300 and k < n + 100_000:
        total += term
        term *= (k + r) / (k + 1) * q
        k += 1
        if term < total * 1e-16:
            break
    return min(1.0, total)


def _nb_range(mean: float, dispersion: float, p: float = 0.001) -> tuple[float, float]:
    """The central (1 − 2p) range of the negative binomial: what "expected" means in a surge finding."""
    lo = 0
    while lo < mean and nbinom_sf(lo + 1, mean, dispersion) > 1 - p:
        lo += 1
    hi = max(0, math.floor(mean))
    while nbinom_sf(hi + 1, mean, dispersion) > p:
        hi += 1
    return float(lo), float(hi)


def _poisson_range(lam: float, p: float = 0.001) -> tuple[float, float]:
    """The central (1 − 2p) range of Poisson(lam): what "expected" means in a finding."""
    lo = 0
    while lo < lam and poisson_sf(lo + 1, lam) > 1 - p:
        lo += 1
    hi = max(0, math.floor(lam))
    while poisson_sf(hi + 1, lam) > p:
        hi += 1
    return float(lo), float(hi)


def open_findings(findings: Iterable[Finding]) -> dict[tuple[str, str], Finding]:
    """The findings still open after a sequence of opens and closes, by (detector, scope)."""
    out: dict[tuple[str, str], Finding] = {}
    for f in findings:
        if f.active:
            out[(f.detector, f.scope)] = f
        else:
            out.pop((f.detector, f.scope), None)
    return out
