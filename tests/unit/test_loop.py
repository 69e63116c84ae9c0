"""`ioc.loop.settle_heap`: what exists at startup leaves the collector's passes; what comes later does not."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from ioc.loop import GcTimes, settle_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test session collects as before


@pytest.mark.usefixtures("unfrozen")
def test_settle_heap_freezes_what_exists_and_still_collects_later_cycles() -> None:
    before = Node()
    assert settle_heap() > 0
    assert gc.is_tracked(before)
    assert gc.get_freeze_count() >= 1
    frozen = gc.get_freeze_count()

    # A reference cycle made afterwards is garbage the collector still finds.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
    assert gc.get_freeze_count() == frozen


def test_gc_times_counts_collections_until_closed() -> None:
    times = GcTimes()
    gc.collect(0)
    gc.collect(2)
    figures = times.figures()
    assert figures["gen0"]["runs"] >= 1 and figures["gen2"]["runs"] >= 1
    assert figures["gen2"]["ms"] >= 0 and figures["gen2"]["longest_ms"] <= figures["gen2"]["ms"] + 0.1
    times.close()
    runs = list(times.runs)
    gc.collect(2)
    assert times.runs == runs
    times.close()  # twice is harmless
