"""`ioc report`: a period's report from the database or an events file, or the scheduled run of all of them."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ioc.errors import IocError
from ioc.settings import Settings
from reports.labels import LANGS
from reports.period import Period, PeriodError
from reports.render import FORMATS

log = logging.getLogger(__name__)


class ReportError(IocError):
    """A report that cannot be made as asked (bad period, scope or format)."""


def add_parser(sub: Any) -> None:
    rep = sub.add_parser(
        "report", help="monthly/quarterly report: Plan 348 targets, Decision 766 groups, cyber, environment"
    )
    when = rep.add_mutually_exclusive_group()
    when.add_argument("--month", help="YYYY-MM")
    when.add_argument("--quarter", help="YYYY-Qn")
    rep.add_argument(
        "--scheduled",
        action="store_true",
        help="the scheduled run: last month's (or --month's) province and commune reports, stored in the database",
    )
    rep.add_argument("--scope", default="province", help="province (default), commune:CODE or agency:CODE")
    rep.add_argument(
        "--format", choices=FORMATS, default=None, help="pdf, xlsx, csv or json (default: from --out, else pdf)"
    )
    rep.add_argument(
        "--out", type=Path, default=None, help="the file to write (- for stdout; default bao-cao-PERIOD-SCOPE.FORMAT)"
    )
    rep.add_argument(
        "--from-events", type=Path, default=None, help="read a JSON-lines events file instead of the database"
    )
    rep.add_argument("--lang", choices=LANGS, default="vi", help="vi (default) or en")
    rep.add_argument("--now", default=None, help=argparse.SUPPRESS)  # the scheduled run's clock, for tests


def run(args: argparse.Namespace, settings: Settings) -> int:
    from ioc.registry import load_registry

    registry = load_registry(settings.units_file, settings.stations_file, settings.targets_file)
    if args.scheduled:
        if args.quarter or args.from_events:
            raise ReportError("--scheduled makes monthly reports from the database (give at most --month)")
        return _scheduled(args, settings, registry)
    if not (args.month or args.quarter):
        raise ReportError("give --month YYYY-MM, --quarter YYYY-Qn or --scheduled")
    try:
        period = Period.parse(args.month or args.quarter)
    except PeriodError as exc:
        raise ReportError(str(exc)) from None
    if (args.month and period.kind != "month") or (args.quarter and period.kind != "quarter"):
        raise ReportError(f"{args.month or args.quarter!r} is not a {'month' if args.month else 'quarter'}")
    fmt = args.format or (args.out.suffix.lstrip(".").lower() if args.out else "pdf")
    if fmt not in FORMATS:
        raise ReportError(f"give --format ({', '.join(FORMATS)}) or an --out file ending in one of them")
    from reports.document import ScopeError, check_scope, make_documents
    from reports.render import render

    try:
        scope = check_scope(args.scope, registry)
    except ScopeError as exc:
        raise ReportError(str(exc)) from None
    started = time.monotonic()
    if args.from_events is not None:
        from reports.source import describe, engine_from_events

        engine, counts = engine_from_events(args.from_events, registry, period.as_of_us)
        log.info("report: %s from %s", describe(counts), args.from_events)
        doc = make_documents(engine, registry, period, [scope], f"events:{args.from_events.name}")[0]
    else:
        import psycopg

        from reports.store import from_database

        with psycopg.connect(settings.database_url) as conn:
            doc = from_database(conn, registry, period, [scope])[0]
    data = render(doc, fmt, args.lang)
    out = args.out or Path(f"bao-cao-{period.label}-{scope.replace(':', '-')}.{fmt}")
    if str(out) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        out.write_bytes(data)
        print(f"{out}: {period.label} {scope} ({fmt}, {len(data):,} bytes, {time.monotonic() - started:.1f} s)")
    return 0


def _scheduled(args: argparse.Namespace, settings: Settings, registry: Any) -> int:
    import psycopg

    from reports.store import run_scheduled
    from streams.windows import TZ

    now = dt.datetime.fromisoformat(args.now) if args.now else dt.datetime.now(TZ)
    try:
        period = Period.parse(args.month) if args.month else None
    except PeriodError as exc:
        raise ReportError(str(exc)) from None
    started = time.monotonic()
    with psycopg.connect(settings.database_url) as conn:
        docs = run_scheduled(conn, registry, now, period)
    print(f"stored {len(docs)} reports of {docs[0]['period']} in {time.monotonic() - started:.1f} s")
    return 0
