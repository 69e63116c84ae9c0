"""The sink's COPY path writes exactly what it was given: awkward text (backslashes, tabs, newlines,
quotes, Vietnamese), nulls, infinities and repeated writes (an upsert, newest seq wins)."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
from typing import Any

import msgspec
import psycopg
import pytest

from ioc.registry import load_registry
from ioc.snapshot import Snapshot
from streams import sink
from streams.cyber import IncidentState
from streams.dossier import DossierState
from streams.engine import Engine

pytestmark = pytest.mark.integration
AWKWARD = 'a\\b\tc\nd\re "q" \\n Nghệ An \u0001 end\\'
AS_OF = dt.datetime(2026, 11, 22, 9, 30, 0, 123456, tzinfo=dt.UTC)


def _snapshot(value: float | None, seq: int, extra: dict[str, Any] | None) -> Snapshot:
    return Snapshot(kpi="dossier.received", scope=f"agency:{AWKWARD}", window="today", value=value, unit="hồ sơ",
                    numerator=0.1 + 0.2, denominator=None, target=math.inf, status=None, as_of=AS_OF, seq=seq,
                    extra=extra)  # fmt: skip


async def _write(url: str, engine: Engine, snapshots: list[Snapshot]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        sink.write_changes(conn, sink.take_changes(engine))
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await sink.write_snapshots(conn, snapshots, snapshots)


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


def test_states_are_stored_as_arrays_and_rows_written_as_objects_by_earlier_builds_still_load(
    database_url: str,
) -> None:
    now = 1_795_000_000_000_000
    writer = Engine(load_registry(), now)
    state = DossierState(dossier_id="D-1", last_event=now - 5, agency_code="000.00.14.H40", scope_rank=(0, now - 9, "e1"),
                         received=(now - 9, "e1"), channel="online", full_online=True, due=now + 10**9)  # fmt: skip
    writer.dossiers.changed["D-1"] = state
    asyncio.run(_write(database_url, writer, []))
    legacy = (
        '{"dossier_id": "D-2", "commune_code": null, "agency_code": "000.00.14.H40", "procedure_code": "1.2",'
        f' "scope_rank": [0, {now - 7}, "e2"], "received": [{now - 7}, "e2"], "channel": "in_person",'
        f' "full_online": false, "due": {now + 10**9}, "outcome": null, "outcome_src": null,'
        f' "paid_online": null, "digitized": null, "result_digital": null, "last_event": {now - 7}}}'
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        stored = conn.execute("SELECT jsonb_typeof(state), state->>0 FROM dossier_state").fetchone()
        conn.execute(
            "INSERT INTO dossier_state (dossier_id, state, terminal, last_event_at) VALUES ('D-2', %s, false, now())",
            (legacy,),
        )
    assert stored == ("array", "D-1")

    async def load() -> Engine:
        engine = Engine(load_registry(), now)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await sink.load_state(conn, engine)
        return engine

    loaded = asyncio.run(load()).dossiers.states
    assert loaded["D-1"] == state
    assert loaded["D-2"] == DossierState(
        dossier_id="D-2", last_event=now - 7, agency_code="000.00.14.H40", procedure_code="1.2",
        scope_rank=(0, now - 7, "e2"), received=(now - 7, "e2"), channel="in_person", full_online=False,
        due=now + 10**9,
    )  # fmt: skip
    assert isinstance(loaded["D-2"].received, tuple)  # compared with tuples when events merge


def test_state_rows_take_id_terminal_and_last_event_from_the_states(database_url: str) -> None:
    """Besides the state itself, a row carries whether the entity is finished and when its last event
    happened: what the restart query selects by."""
    now = 1_795_000_000_123_456
    engine = Engine(load_registry(), now)
    engine.dossiers.changed = {
        "open": DossierState(dossier_id="open", last_event=now - 1),
        "done": DossierState(dossier_id="done", last_event=now - 2, outcome="on_time"),
    }
    engine.incidents.changed = {
        "inc": IncidentState(incident_id="inc", last_event=now - 3, resolved=(now - 3, "e")),
    }
    asyncio.run(_write(database_url, engine, []))
    with psycopg.connect(database_url) as conn:
        dossiers = conn.execute("SELECT dossier_id, terminal, last_event_at FROM dossier_state ORDER BY 1").fetchall()
        incidents = conn.execute("SELECT incident_id, terminal, last_event_at FROM incident_state").fetchall()
    at = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=now)
    us = dt.timedelta(microseconds=1)
    assert dossiers == [("done", True, at - 2 * us), ("open", False, at - us)]
    assert incidents == [("inc", True, at - 3 * us)]


def test_the_history_takes_only_the_sampled_snapshots_and_latest_keeps_the_newest(database_url: str) -> None:
    older, newer, other = _snapshot(1.0, 5, None), _snapshot(2.0, 6, None), _snapshot(3.0, 7, None)
    other = msgspec.structs.replace(other, window="mtd")
    newer = msgspec.structs.replace(newer, as_of=AS_OF + dt.timedelta(seconds=1))

    async def write() -> None:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            # `older` was left pending by an earlier emission and is due now; this emission's
            # `newer` (same series) and `other` are published and stored as latest, not sampled.
            await sink.write_snapshots(conn, [newer, other], [older])

    asyncio.run(write())
    with psycopg.connect(database_url) as conn:
        latest = conn.execute("SELECT win, value, seq FROM kpi_latest ORDER BY win").fetchall()
        history = conn.execute("SELECT win, value, seq, as_of FROM kpi_history").fetchall()
    assert latest == [("mtd", 3.0, 7), ("today", 2.0, 6)]
    assert history == [("today", 1.0, 5, AS_OF)]


def test_a_restart_loads_open_entities_and_recently_finished_ones_through_the_partial_indexes(
    database_url: str,
) -> None:
    """The restart query takes every open entity however old, and finished ones within the horizon;
    each row sits in exactly one of the two partial indexes on ``last_event_at``, and the query can be
    answered from them (no full scan of a table that only grows)."""
    now = 1_795_000_000_000_000
    old = now - 2 * sink.ENTITY_HORIZON_US
    engine = Engine(load_registry(), now)
    engine.dossiers.changed = {
        "open-old": DossierState(dossier_id="open-old", last_event=old),
        "done-old": DossierState(dossier_id="done-old", last_event=old, outcome="on_time"),
        "done-new": DossierState(dossier_id="done-new", last_event=now - 1, outcome="late"),
    }
    engine.incidents.changed = {
        "inc-old": IncidentState(incident_id="inc-old", last_event=old, resolved=(old, "e")),
        "inc-open": IncidentState(incident_id="inc-open", last_event=old),
    }
    asyncio.run(_write(database_url, engine, []))

    async def load() -> Engine:
        loaded = Engine(load_registry(), now)
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await sink.load_state(conn, loaded)
        return loaded

    loaded = asyncio.run(load())
    assert sorted(loaded.dossiers.states) == ["done-new", "open-old"]
    assert sorted(loaded.incidents.states) == ["inc-open"]

    with psycopg.connect(database_url, autocommit=True) as conn:
        indexes = {
            name: definition.partition(" USING ")[2]
            for name, definition in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'dossier_state'"
            ).fetchall()
        }
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN " + sink.RESTART_QUERY.format(table="dossier_state", key="dossier_id"),
                (dt.datetime.now(dt.UTC),),
            ).fetchall()
        )
    assert indexes == {
        "dossier_state_pkey": "btree (dossier_id)",
        "dossier_state_open": "btree (last_event_at) WHERE (NOT terminal)",
        "dossier_state_closed": "btree (last_event_at) WHERE terminal",
    }
    assert "Seq Scan" not in plan and "dossier_state_open" in plan and "dossier_state_closed" in plan, plan


def test_migrating_an_earlier_database_replaces_its_full_last_event_index(postgres_admin_url: str) -> None:
    """Databases made by earlier builds have a full index on ``last_event_at`` besides the open one:
    every row written paid for both. Migrating drops it for the finished-only one."""
    from entrypoints.embedded.postgres import create_database, drop_database
    from ioc.db.migrate import migrate

    name = f"sink_migrate_index_{os.getpid()}"
    url = create_database(postgres_admin_url, name)
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP INDEX dossier_state_closed")
            conn.execute("CREATE INDEX dossier_state_recent ON dossier_state (last_event_at)")
        migrate(url)
        with psycopg.connect(url) as conn:
            names = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'dossier_state'")}
        assert names == {"dossier_state_pkey", "dossier_state_open", "dossier_state_closed"}
    finally:
        drop_database(postgres_admin_url, name)
