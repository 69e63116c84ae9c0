"""The caching partitioner chooses exactly what Kafka's default partitioner chooses, and stays bounded."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner, murmur2

from ioc.produce import CachingPartitioner


def test_same_partition_as_the_default_for_every_key_and_partition_count() -> None:
    cached, default = CachingPartitioner(max_keys=50), DefaultPartitioner()
    keys = [f"dossier.received|commune:{c}|today".encode() for c in range(200)] + ["Nghệ An|ø".encode()]
    for n in (1, 3, 6, 12):
        parts = list(range(n))
        for key in keys * 2:  # the second pass is answered from memory
            assert cached(key, parts, parts) == default(key, parts, parts) == (murmur2(key) & 0x7FFFFFFF) % n
    assert len(cached._known) <= 50


def test_no_key_goes_to_an_available_partition() -> None:
    assert CachingPartitioner()(None, [0, 1, 2], [2]) == 2


def test_a_single_partition_is_chosen_without_hashing_or_remembering() -> None:
    cached = CachingPartitioner()
    assert {cached(f"k{i}".encode(), [4], [4]) for i in range(100)} == {4}
    assert cached(None, [4], [4]) == 4
    assert not cached._known
