"""A batch's state changes split over the writer connections: disjoint shares that cover every change."""

from __future__ import annotations

from typing import Any

from streams import sink


def test_shares_are_disjoint_cover_every_change_and_keep_incidents_and_readings_together() -> None:
    dossiers: dict[str, Any] = {f"D-{i}": i for i in range(10_000)}
    incidents: dict[str, Any] = {"I-1": 1}
    readings: dict[tuple[str, int], Any] = {("st-1", 5): ("air", None)}
    shares = sink.Changes(dossiers, incidents, readings).split(3)

    assert len(shares) == 3
    keys = [k for share in shares for k in share.dossiers]
    assert len(keys) == len(set(keys)) == len(dossiers)
    assert {k: v for share in shares for k, v in share.dossiers.items()} == dossiers
    assert (shares[0].incidents, shares[0].readings) == (incidents, readings)
    assert all(not share.incidents and not share.readings for share in shares[1:])
    assert sum(len(share) for share in shares) == len(dossiers) + 2


def test_small_batches_are_not_split() -> None:
    small = sink.Changes({f"D-{i}": i for i in range(2 * sink.SPLIT_MIN_ROWS - 1)}, {}, {})
    assert small.split(4) == [small]
    assert len(sink.Changes({f"D-{i}": i for i in range(2 * sink.SPLIT_MIN_ROWS)}, {}, {}).split(4)) == 2
