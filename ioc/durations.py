"""Durations as people write them in rule files, tokens and options: ``45s``, ``15m``, ``1h30m``, ``2d``."""

from __future__ import annotations

import datetime as dt
import re

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> dt.timedelta:
    """``"15m"``, ``"1h30m"``, ``"2d"``, ``"45s"``, ``"0"`` → timedelta; ValueError otherwise."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if text == "0":
        return dt.timedelta(0)
    if not m or not any(m.groups()):
        raise ValueError(f"not a duration like '15m', '1h30m' or '2d': {text!r}")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return dt.timedelta(days=d, hours=h, minutes=mi, seconds=s)


def format_duration(td: dt.timedelta) -> str:
    """The inverse of `parse_duration` (``15m``, ``1h30m``) for messages and reports."""
    total = int(td.total_seconds())
    if total == 0:
        return "0"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if total >= size:
            out += f"{total // size}{unit}"
            total %= size
    return out
