"""What every simulated event shares: +07:00 times, ids, Poisson arrivals, the event record."""

from __future__ import annotations

import datetime as dt
import math
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ioc.contract import UTC7

#: The province's offset, as the events are written (`ioc.contract.UTC7`; no daylight saving since 1975).
VN_TZ = UTC7


@dataclass(frozen=True, slots=True)
class Event:
    """One well-formed event of CONTRACT §1: logical topic, key, event time and the JSON object."""

    topic: str
    key: str
    at: dt.datetime
    value: dict[str, Any]


def iso(moment: dt.datetime) -> str:
    """ISO 8601 in the operating zone to the millisecond: ``2025-11-22T08:15:00.000+07:00``."""
    return moment.astimezone(VN_TZ).isoformat(timespec="milliseconds")


def to_millisecond(moment: dt.datetime) -> dt.datetime:
    """``moment`` truncated to the precision events carry on the wire."""
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


def event_id(rng: random.Random) -> str:
    """A version-4 UUID drawn from ``rng`` (so a seed reproduces the ids)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def poisson_arrivals(
    rng: random.Random,
    start: dt.datetime,
    peak_rate_per_s: float,
    rate_at: Callable[[dt.datetime], float],
    ends: dt.datetime | None = None,
) -> Iterator[dt.datetime]:
    """Arrival times of a Poisson process with a time-varying rate (thinning, Lewis–Shedler).

    ``rate_at(t)`` must never exceed ``peak_rate_per_s``; a peak of 0 yields nothing. Give
    ``ends`` when the rate drops to 0 for good, or the search for the next arrival never ends.
    """
    if peak_rate_per_s <= 0:
        return
    t = start
    while True:
        t += dt.timedelta(seconds=rng.expovariate(peak_rate_per_s))
        if ends is not None and t > ends:
            return
        if rng.random() * peak_rate_per_s < rate_at(t):
            yield t


def lognormal_minutes(rng: random.Random, median_min: float, spread: float) -> dt.timedelta:
    """A right-skewed duration around ``median_min`` minutes (``spread`` is the log-sd)."""
    return dt.timedelta(minutes=median_min * math.exp(rng.gauss(0.0, spread)))
