"""aiokafka internals: `PartitionRecords` yielding its C records as they are, for ``RAW`` consumers.

aiokafka decodes each fetched record batch in C, then builds a `ConsumerRecord` per record in
Python (`PartitionRecords._consumer_record`): eleven fields, a tuple of headers and two `len`
calls. The worker reads three of those fields (value, timestamp, offset). In a py-spy profile of
the worker that construction took 15 % of the main thread's samples; a plain consumer read
315,000–365,000 records/s with it and 424,000–451,000/s without (docs/performance.md). No public
API hands out the C records, so `install` replaces `aiokafka.consumer.fetcher.PartitionRecords`
process-wide with a subclass that, only for consumers made with ``value_deserializer=RAW``,
iterates the batches itself. Everything else stays aiokafka's: fetching, positions, CRC checks,
control batches, commits; other consumers (Faust's) get `ConsumerRecord` s as before. With an
aiokafka whose internals differ, `install` does nothing (a warning) and records stay
`ConsumerRecord` s with the same fields.
"""

from __future__ import annotations

import logging
from typing import Any, Final

log = logging.getLogger(__name__)

#: The aiokafka versions this module was checked against (pyproject.toml pins the same range).
SUPPORTED: Final = (">=0.11", "<0.15")

#: What `PartitionRecords.__init__` must set for the subclass below to work.
_INIT_NAMES: Final = ("_records_iterator", "_value_deserializer", "_isolation_level", "_check_crcs", "next_fetch_offset")


def RAW(value: bytes | None) -> bytes | None:
    """The value deserializer that marks a consumer as wanting lean records (the value is unchanged)."""
    return value


def problems() -> list[str]:
    """Each assumption of this module the installed aiokafka breaks, in words (empty: all hold)."""
    try:
        from aiokafka.consumer import fetcher
    except ImportError:
        return ["aiokafka.consumer.fetcher is gone: PartitionRecords cannot be replaced"]
    found: list[str] = []
    # After install() the module holds our subclass: the assumptions are about aiokafka's own class.
    base = _original or getattr(fetcher, "PartitionRecords", None)
    if base is None:
        return ["aiokafka.consumer.fetcher.PartitionRecords is gone: lean records need another way in"]
    init_names = base.__init__.__code__.co_names
    found += [
        f"PartitionRecords.__init__ no longer sets {name}: the lean iterator cannot replace its records iterator"
        for name in _INIT_NAMES
        if name not in init_names
    ]
    found += [
        f"aiokafka.consumer.fetcher.{name} is gone: the lean iterator uses it"
        for name in ("READ_UNCOMMITTED", "Errors")
        if not hasattr(fetcher, name)
    ]
    return found


_installed: bool | None = None
#: aiokafka's own PartitionRecords, kept once install() has replaced it.
_original: Any = None


def install() -> bool:
    """Let ``RAW`` consumers get lean records; True when aiokafka's internals allowed it (idempotent)."""
    global _installed
    if _installed is None:
        _installed = _patch()
    return _installed


def _patch() -> bool:
    found = problems()
    if found:
        log.warning("aiokafka %s: lean consumer records unavailable (%s); using ConsumerRecord", version(), "; ".join(found))
        return False
    from aiokafka.consumer import fetcher

    base: Any = fetcher.PartitionRecords

    class PartitionRecords(base):  # type: ignore[misc]
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

    global _original
    _original = base
    fetcher.PartitionRecords = PartitionRecords
    return True


def version() -> str:
    import aiokafka

    return str(getattr(aiokafka, "__version__", "?"))


def heartbeat_while_assigning(consumer: Any) -> bool:
    """Resume a group consumer's heartbeats now, from its ``on_partitions_assigned`` callback.

    aiokafka stops the heartbeat task for a rebalance and starts it again only after the assignment
    callback returned; the broker's session clock runs again from the SyncGroup answer. A callback
    longer than the session timeout (a worker rebuilding its new partitions, or becoming the merger,
    with a short session) would get the member thrown out and the group rebalanced again. The task
    started here is the one aiokafka would start (it starts no second one). False, and nothing
    done, when aiokafka's internals differ."""
    coordinator = getattr(consumer, "_coordinator", None)
    start = getattr(coordinator, "_start_heartbeat_task", None)
    if start is None or not hasattr(coordinator, "_heartbeat_task"):
        return False
    start()
    return True
