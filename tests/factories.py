"""Factories shared by the tests: one way to make a KPI snapshot."""

from __future__ import annotations

import datetime as dt

from ioc.snapshot import Snapshot

AS_OF = dt.datetime(2026, 11, 22, 8, 15, tzinfo=dt.timezone(dt.timedelta(hours=7)))


def snap(
    kpi: str = "dossier.received", scope: str = "province", window: str = "today", value: float = 1.0, seq: int = 1
) -> Snapshot:
    """A snapshot with only what the API looks at filled in."""
    return Snapshot(
        kpi=kpi, scope=scope, window=window, value=value, unit="", numerator=None, denominator=None,
        target=None, status=None, as_of=AS_OF, seq=seq,
    )  # fmt: skip
