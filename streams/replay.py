"""`ioc replay`: run a JSON-lines file of events through the worker's own engine, offline.

Each line is ``{"topic": "...", "value": {...}}``, or ``{"topic": "...", "raw": "<text>"}`` for a
record given as its exact bytes (undecodable bytes as lone surrogates, Python's surrogateescape),
which is how malformed records are written. The output, JSON lines sorted by (kpi, scope, window), is the set of KPI snapshots as
of ``--until`` (default: the latest valid event time). Events after ``--until`` have not happened
yet and are left out. The result depends only on the set of distinct events in the file, not on
their order or on repetitions, because the engine's merges are order-independent.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec

from ioc.errors import InvalidEvent
from ioc.registry import Registry
from streams.engine import KINDS, Engine
from streams.snapshot import Snapshot

US = 1_000_000
_encoder = msgspec.json.Encoder(order="sorted")


def _records(path: Path) -> Iterator[tuple[int, str, bytes]]:
    opener = sys.stdin.buffer if str(path) == "-" else path.open("rb")
    with opener as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                topic = doc["topic"]
                raw = (
                    doc["raw"].encode("utf-8", "surrogateescape") if "raw" in doc else json.dumps(doc["value"]).encode()
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                yield n, "", line
                continue
            yield n, topic, raw


def replay(
    path: Path, registry: Registry, until: dt.datetime | None = None, *, progress: IO[str] | None = None
) -> tuple[list[Snapshot], dict[str, int]]:
    """Snapshots as of ``until`` for the events in ``path``, plus counts (events, invalid, duplicates, after_until)."""
    engine_for_parse = Engine(registry, 0)
    parsed: list[tuple[str, str, Any]] = []
    stats = {"lines": 0, "valid": 0, "invalid": 0, "duplicates": 0, "after_until": 0}
    started = last_report = time.monotonic()
    for n, topic, raw in _records(path):
        stats["lines"] += 1
        if progress is not None and time.monotonic() - last_report > 1.0:
            last_report = time.monotonic()
            progress.write(f"\rreplay: {n:,} lines read ({n / (last_report - started):,.0f}/s)")
            progress.flush()
        logical = topic[topic.index("ioc.") :] if "ioc." in topic else topic
        if logical not in KINDS:
            stats["invalid"] += 1
            continue
        try:
            key, p = engine_for_parse.parse(logical, raw)
        except InvalidEvent:
            stats["invalid"] += 1
            continue
        parsed.append((logical, key, p))
    stats["valid"] = len(parsed)
    if until is None:
        latest = max((p.t for _, _, p in parsed), default=0)
        until_us = latest
    else:
        until_us = int(until.timestamp() * US)
    engine = Engine(registry, until_us)
    for logical, key, p in parsed:
        if p.t > until_us:
            stats["after_until"] += 1
            continue
        if not engine.apply(logical, key, p, record=False):
            stats["duplicates"] += 1
    snapshots = engine.snapshots(changed_only=False)
    snapshots.sort(key=lambda s: (s.kpi, s.scope, s.window))
    if progress is not None:
        progress.write(f"\rreplay: {stats['lines']:,} lines, {stats['valid']:,} valid, {len(snapshots):,} snapshots\n")
    return snapshots, stats


def comparable(s: Snapshot) -> dict[str, Any]:
    """A snapshot without the fields that depend on when and how often it was published."""
    d: dict[str, Any] = msgspec.to_builtins(s)
    d.pop("seq", None)
    return d


def write(snapshots: list[Snapshot], out: IO[bytes]) -> None:
    for s in snapshots:
        doc = msgspec.to_builtins(s)
        doc["kind"] = "kpi"
        out.write(_encoder.encode(doc) + b"\n")
