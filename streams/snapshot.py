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


def scope_commune(code: str) -> str:
    return f"commune:{code}"


def commune_of(scope: str) -> str | None:
    """The commune code a scope belongs to, or None for province/agency/station scopes."""
    return scope[8:] if scope.startswith("commune:") else None
