"""Consumer records without the per-record `ConsumerRecord`: what the worker's hot path reads.

aiokafka decodes each fetched record batch in C, then builds a `ConsumerRecord` per record in
Python (`PartitionRecords._consumer_record`): eleven fields, a tuple of headers and two `len`
calls. The worker reads three of those fields (value, timestamp, offset) and knows the topic and
partition from the batch's keys. In a py-spy profile of the worker that construction took 15 % of
the main thread's samples (with the garbage collection its allocations set off); a plain consumer
read 315,000–365,000 records/s with it and 424,000–451,000/s without (docs/performance.md,
"Fifth round").

A consumer made with ``value_deserializer=RAW`` gets aiokafka's own C record objects instead:
`LeanRecord` says what they carry. Everything else is aiokafka's unchanged: fetching, positions,
CRC checks, control batches, commits. Other consumers in the process (Faust's) are not affected;
`install` only changes the records of consumers that ask for it, and with an aiokafka whose
internals differ from what it expects, it does nothing and the records stay `ConsumerRecord`s
(with the same fields).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiokafka import ConsumerRecord, TopicPartition

log = logging.getLogger(__name__)


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


def RAW(value: bytes | None) -> bytes | None:
    """The value deserializer that marks a consumer as wanting lean records (the value is unchanged)."""
    return value


_installed: bool | None = None


def install() -> bool:
    """Let ``RAW`` consumers get lean records; True when aiokafka's internals allowed it (idempotent)."""
    global _installed
    if _installed is None:
        _installed = _patch()
    return _installed


def _patch() -> bool:
    try:
        from aiokafka.consumer import fetcher
    except ImportError:  # pragma: no cover (a layout this module does not know)
        return False
    base = getattr(fetcher, "PartitionRecords", None)
    needed = ("_records_iterator", "_value_deserializer", "_isolation_level", "_check_crcs", "next_fetch_offset")
    if (
        base is None
        or not hasattr(fetcher, "READ_UNCOMMITTED")
        or not all(name in base.__init__.__code__.co_names for name in needed)
    ):  # pragma: no cover
        log.warning("aiokafka %s: lean consumer records unavailable; using ConsumerRecord", _version())
        return False

    class PartitionRecords(base):  # type: ignore[misc, valid-type]
        """aiokafka's, yielding its C records as they are for ``RAW`` consumers."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if self._value_deserializer is RAW and self._isolation_level == fetcher.READ_UNCOMMITTED:
                self._records_iterator = self._lean_records()

        def _lean_records(self) -> Any:
            """`_unpack_records` without building a `ConsumerRecord` per record (and without the
            transaction bookkeeping, which only READ_COMMITTED consumers need)."""
            records, check_crcs = self._records, self._check_crcs
            while records.has_next():
                batch = records.next_batch()
                if check_crcs and not batch.validate_crc():
                    raise fetcher.Errors.CorruptRecordException(f"Invalid CRC - {self._tp}")
                if batch.is_control_batch:
                    self.next_fetch_offset = batch.next_offset
                    continue
                start = self.next_fetch_offset
                for record in batch:
                    offset = record.offset
                    if offset < start:  # the start of a batch fetched again from mid-way
                        continue
                    self.next_fetch_offset = offset + 1
                    yield record
                self.next_fetch_offset = batch.next_offset

    fetcher.PartitionRecords = PartitionRecords
    return True


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


def _version() -> str:
    import aiokafka

    return str(getattr(aiokafka, "__version__", "?"))
