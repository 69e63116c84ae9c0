"""Percentiles without numpy (nearest rank), and a process's CPU time from ``/proc``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50": ..., "p95": ..., "p99": ..., "max": ...}`` by nearest rank; NaN for no values."""
    if not values:
        return {**{f"p{p}": math.nan for p in points}, "max": math.nan}
    ordered = sorted(values)
    n = len(ordered)
    out = {f"p{p}": round(ordered[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))], 2) for p in points}
    out["max"] = round(ordered[-1], 2)
    return out


def process_cpu(pid: int | str) -> tuple[str, float]:
    """The command name and the user + system CPU seconds so far of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as f:
        head, _, rest = f.read().rpartition(")")
    fields = rest.split()
    return head.partition("(")[2], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
