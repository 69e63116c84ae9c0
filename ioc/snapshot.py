"""The KPI snapshot (CONTRACT §4): what the worker publishes, stores and the API serves."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

WINDOWS = ("1h", "24h", "today", "mtd", "now")


class Snapshot(msgspec.Struct, frozen=True, omit_defaults=False):
    """One value of one KPI, for one scope and window, as of a moment."""

    kpi: str
    scope: str
    window: str
    value: float | None
    unit: str
    numerator: float | None
    denominator: float | None
    target: float | None
    status: str | None
    as_of: dt.datetime
    seq: int
    #: KPI-specific detail (AQI band, colour, dominant pollutant, advice; the station that is worst...).
    extra: dict[str, Any] | None = None
    #: "suspect" while an anomaly detector holds a finding on the station behind the value
    #: (`streams.anomaly`); null otherwise. A backward-compatible extension of CONTRACT §4.
    quality: str | None = None

    @property
    def key(self) -> str:
        """The Kafka key and identity of the series: ``kpi|scope|window``."""
        return f"{self.kpi}|{self.scope}|{self.window}"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode(data: bytes) -> Snapshot:
    return _decoder.decode(data)


class HistorySampler:
    """Which snapshots go into ``kpi_history``: per series at most one row per interval, and never the
    last value lost.

    Every emission publishes and stores (``kpi_latest``) what changed; the history takes a series'
    newest snapshot when the series last went into the history at least ``interval`` ago, and
    keeps it pending otherwise, for a later emission to write once the interval has passed (even
    if the series does not change again). So the emission interval (how soon screens see a change)
    does not set how fast the history grows, and a value that stands is in the history within one
    interval. A value replaced within the interval is not; ``GET /api/kpis/history`` serves buckets
    of a minute or more, each with its last value. ``interval`` 0 keeps every snapshot.

    After a restart nothing is pending: the restarted worker publishes (and so samples) every series
    with its first emission.
    """

    __slots__ = ("interval", "pending", "written")

    def __init__(self, interval_s: float) -> None:
        self.interval = dt.timedelta(seconds=interval_s)
        #: When each series last went into the history (the emission's clock).
        self.written: dict[str, dt.datetime] = {}
        #: The newest snapshot of each series not yet in the history.
        self.pending: dict[str, Snapshot] = {}

    def take(self, snapshots: list[Snapshot], now: dt.datetime) -> list[Snapshot]:
        """This emission's history rows: of ``snapshots`` and of what earlier emissions left pending."""
        pending, written, interval = self.pending, self.written, self.interval
        for s in snapshots:
            pending[s.key] = s
        if not pending:
            return []
        due = [k for k in pending if (last := written.get(k)) is None or now - last >= interval]
        for k in due:
            written[k] = now
        return [pending.pop(k) for k in due]


def scope_commune(code: str) -> str:
    return f"commune:{code}"


def commune_of(scope: str) -> str | None:
    """The commune code a scope belongs to, or None for province/agency/station scopes."""
    return scope[8:] if scope.startswith("commune:") else None
