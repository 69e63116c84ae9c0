"""`HistorySampler`: at most one history row per series per interval, and a value that stands is written."""

from __future__ import annotations

import datetime as dt

from ioc.snapshot import HistorySampler, Snapshot

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.UTC)


def snap(value: float, at_s: float, seq: int, kpi: str = "dossier.received") -> Snapshot:
    return Snapshot(kpi=kpi, scope="province", window="today", value=value, unit="hồ sơ", numerator=None,
                    denominator=None, target=None, status=None, as_of=T0 + dt.timedelta(seconds=at_s), seq=seq)  # fmt: skip


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def test_a_series_first_snapshot_is_written_then_at_most_one_per_interval() -> None:
    sampler = HistorySampler(10.0)
    first = snap(1, 0, 1)
    assert sampler.take([first], at(0)) == [first]
    assert sampler.take([snap(2, 0.1, 2)], at(0.1)) == []
    assert sampler.take([snap(3, 5, 3)], at(5)) == []
    newest = snap(4, 9.9, 4)
    assert sampler.take([newest], at(9.9)) == []
    # The interval has passed: the newest value goes in, the ones it replaced never do.
    later = snap(5, 10, 5)
    assert sampler.take([later], at(10)) == [later]


def test_a_value_that_stands_is_written_once_the_interval_has_passed_without_new_snapshots() -> None:
    sampler = HistorySampler(10.0)
    sampler.take([snap(1, 0, 1)], at(0))
    standing = snap(7, 3, 2)
    assert sampler.take([standing], at(3)) == []
    assert sampler.take([], at(9.99)) == []
    assert sampler.take([], at(10)) == [standing]
    assert sampler.take([], at(30)) == []  # written once


def test_series_are_sampled_independently() -> None:
    sampler = HistorySampler(10.0)
    a, b = snap(1, 0, 1, "a"), snap(1, 4, 1, "b")
    assert sampler.take([a], at(0)) == [a]
    assert sampler.take([b], at(4)) == [b]  # b's first snapshot, though a was written 4 s ago
    a2, b2 = snap(2, 10, 2, "a"), snap(2, 10, 2, "b")
    assert sampler.take([a2, b2], at(10)) == [a2]
    assert sampler.take([], at(14)) == [b2]


def test_interval_zero_keeps_every_snapshot() -> None:
    sampler = HistorySampler(0)
    snaps = [snap(i, i * 0.1, i + 1) for i in range(5)]
    assert [sampler.take([s], at(i * 0.1)) for i, s in enumerate(snaps)] == [[s] for s in snaps]
