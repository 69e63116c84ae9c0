"""Consumer records without the per-record `ConsumerRecord`: what the worker's hot path reads.

A consumer made with ``value_deserializer=RAW`` gets aiokafka's own C records (`LeanRecord` says
what they carry) once `install` has run; how, and what it assumes of aiokafka: `ioc.compat.aiokafka`.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiokafka import ConsumerRecord, TopicPartition

from ioc.compat.aiokafka import RAW, install

__all__ = ["RAW", "LeanRecord", "full_record", "install"]


class LeanRecord(Protocol):
    """What a record of a ``RAW`` consumer has (aiokafka's C ``DefaultRecord``, or a `ConsumerRecord`)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def timestamp_type(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Any: ...


def full_record(tp: TopicPartition, record: LeanRecord) -> ConsumerRecord[Any, Any]:
    """A lean record as a `ConsumerRecord` (for the rare paths that keep or log one: dead letters)."""
    if isinstance(record, ConsumerRecord):
        return record
    key, value = record.key, record.value
    return ConsumerRecord(
        tp.topic,
        tp.partition,
        record.offset,
        record.timestamp,
        record.timestamp_type,
        key,
        value,
        getattr(record, "checksum", None),
        len(key) if key is not None else -1,
        len(value) if value is not None else -1,
        tuple(record.headers),
    )
