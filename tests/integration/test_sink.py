"""The sink's COPY path writes exactly what it was given: awkward text (backslashes, tabs, newlines,
quotes, Vietnamese), nulls, infinities and repeated writes (an upsert, newest seq wins)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from typing import Any

import psycopg
import pytest

from ioc.registry import load_registry
from streams import sink
from streams.dossier import DossierState
from streams.engine import Engine
from streams.snapshot import Snapshot

pytestmark = pytest.mark.integration
AWKWARD = 'a\\b\tc\nd\re "q" \\n Nghệ An \u0001 end\\'
AS_OF = dt.datetime(2026, 11, 22, 9, 30, 0, 123456, tzinfo=dt.UTC)


def _snapshot(value: float | None, seq: int, extra: dict[str, Any] | None) -> Snapshot:
    return Snapshot(kpi="dossier.received", scope=f"agency:{AWKWARD}", window="today", value=value, unit="hồ sơ",
                    numerator=0.1 + 0.2, denominator=None, target=math.inf, status=None, as_of=AS_OF, seq=seq,
                    extra=extra)  # fmt: skip


async def _write(url: str, engine: Engine, snapshots: list[Snapshot]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await sink.write_changes(conn, sink.take_changes(engine))
        await sink.write_snapshots(conn, snapshots)


def test_copy_round_trips_awkward_values_and_keeps_the_newest_seq(database_url: str) -> None:
    engine = Engine(load_registry(), 0)
    state = DossierState(dossier_id=AWKWARD, agency_code=AWKWARD, procedure_code="x\\y", last_event=42)
    engine.dossiers.changed[AWKWARD] = state
    extra = {"advice": AWKWARD, "nested": {"k": [1, 2.5, None]}}
    newer = _snapshot(1.5, 2, extra)
    asyncio.run(_write(database_url, engine, [newer]))
    asyncio.run(_write(database_url, engine, [_snapshot(99.0, 1, None)]))  # older seq: kpi_latest keeps seq 2

    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT dossier_id, state::text, terminal FROM dossier_state").fetchone()
        latest = conn.execute(
            "SELECT scope, value, unit, numerator, denominator, target, status, as_of, seq, extra FROM kpi_latest"
        ).fetchall()
        history = conn.execute("SELECT seq, value FROM kpi_history").fetchall()
    assert row is not None and row[0] == AWKWARD and row[2] is False
    assert sink._dossier_decoder.decode(row[1]) == state
    assert latest == [(f"agency:{AWKWARD}", 1.5, "hồ sơ", 0.1 + 0.2, None, math.inf, None, AS_OF, 2, extra)]
    assert history == [(1, 99.0)]  # history is per as_of: the later write of the same instant replaces it
