"""Stored reports (table ``report``): the scheduled run writes each scope's document, the API lists and renders them.

The document (the numbers) is stored, not the files: every API replica and the CronJob share the
database and no volume, a document is a few hundred kilobytes at most, and each format is rendered
from it on request, so a PDF, an XLSX and a CSV of one stored report always show the same figures.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from ioc.registry import Registry
from reports.document import make_documents
from reports.period import Period, due_period
from reports.source import describe, engine_from_database

log = logging.getLogger(__name__)

UPSERT = """
INSERT INTO report (period, scope, made_at, source, document) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (period, scope) DO UPDATE SET made_at = EXCLUDED.made_at, source = EXCLUDED.source,
    document = EXCLUDED.document
"""


def scheduled_scopes(registry: Registry) -> list[str]:
    """What the scheduled run makes: the province and each commune."""
    return ["province", *(f"commune:{code}" for code in sorted(registry.units))]


def from_database(
    conn: psycopg.Connection[Any], registry: Registry, period: Period, scopes: Sequence[str]
) -> list[dict[str, Any]]:
    """Reports of ``scopes`` for ``period`` read from the database."""
    started = time.monotonic()
    engine, counts = engine_from_database(conn, registry, period, since=period.previous())
    log.info("report %s: loaded %s in %.1f s", period.label, describe(counts), time.monotonic() - started)
    return make_documents(engine, registry, period, scopes, "database")


def store(conn: psycopg.Connection[Any], docs: Sequence[dict[str, Any]], made_at: dt.datetime) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            UPSERT,
            [(d["period"], d["scope"], made_at, d["source"], json.dumps(d, ensure_ascii=False)) for d in docs],
        )


def run_scheduled(
    conn: psycopg.Connection[Any], registry: Registry, now: dt.datetime, period: Period | None = None
) -> list[dict[str, Any]]:
    """Make and store the province's and every commune's report of the month due at ``now`` (or ``period``).

    Run again for the same period, it writes the same documents (the numbers depend only on the stored
    states, whose facts before the period's end do not change once the period is over)."""
    period = period or due_period(now)
    docs = from_database(conn, registry, period, scheduled_scopes(registry))
    store(conn, docs, now)
    log.info("report %s: stored %d reports", period.label, len(docs))
    return docs


def listing(conn: psycopg.Connection[Any], commune: str | None = None) -> list[dict[str, Any]]:
    where, params = ("WHERE scope = %s", [f"commune:{commune}"]) if commune else ("", [])
    with conn.cursor() as cur:
        cur.execute(f"SELECT period, scope, made_at, source FROM report {where} ORDER BY period DESC, scope", params)
        return [{"period": p, "scope": s, "made_at": m.isoformat(), "source": src} for p, s, m, src in cur.fetchall()]


def stored(conn: psycopg.Connection[Any], period: str, scope: str) -> dict[str, Any] | None:
    with conn.cursor() as cur:
        cur.execute("SELECT document FROM report WHERE period = %s AND scope = %s", (period, scope))
        row = cur.fetchone()
    return dict(row[0]) if row else None
