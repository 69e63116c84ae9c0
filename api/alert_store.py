"""Where the API reads alerts and records what operators do to them (tables ``alert_current``,
``alert_event``, ``alert_silence``), and how it tells the stream worker (topic ``ioc.alerts``).

`AlertStore` is what the routes need. `PostgresAlertStore` is the real one; `MemoryAlertStore`
keeps the same in memory, for tests and for an API started without a database. Every operator
step goes through `AlertStore.record`: in one transaction the alert is locked, the step built
(a forbidden one raises `TransitionError`), the audit row written, the current state updated and
the event published; the commit comes last, so an event the broker did not take is not recorded
either and the caller can simply retry (the worker ignores an event it has already applied).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
from aiokafka import AIOKafkaProducer
from psycopg_pool import AsyncConnectionPool

from alerts.engine import Silence, UnknownAlert
from alerts.model import Alert, AlertEvent, AlertState, Severity
from ioc.produce import stop_within
from ioc.settings import TOPIC_ALERTS, Settings

log = logging.getLogger(__name__)

#: Rows read per round while filtering a list by the caller's rights.
PAGE: Final = 500
Step = Callable[[Alert], AlertEvent]
Publish = Callable[[AlertEvent], Awaitable[None]]


@dataclass(frozen=True)
class AlertQuery:
    """Filters of ``GET /api/alerts``; an empty set means "any"."""

    states: frozenset[AlertState] = frozenset()
    severities: frozenset[Severity] = frozenset()
    scopes: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()

    def matches(self, alert: Alert) -> bool:
        return (
            (not self.states or alert.state in self.states)
            and (not self.severities or alert.severity in self.severities)
            and (not self.scopes or alert.scope in self.scopes)
            and (not self.domains or alert.domain in self.domains)
        )


class AlertStore(Protocol):
    async def list_alerts(self, query: AlertQuery, accept: Callable[[Alert], bool], limit: int) -> list[Alert]:
        """Alerts matching ``query`` and ``accept``, newest (``started_at``) first, at most ``limit``."""

    async def get(self, alert_id: str) -> Alert | None: ...

    async def events(self, alert_id: str) -> list[AlertEvent]:
        """The audit trail of one alert, oldest first."""

    async def record(self, alert_id: str, step: Step, publish: Publish) -> tuple[Alert, AlertEvent]:
        """Apply ``step(alert)`` atomically (see the module docstring); UnknownAlert when there is no such alert."""

    async def add_silence(self, silence: Silence) -> tuple[Silence, bool]:
        """Store a silence; returns the stored one and whether it is new (the same content is one silence)."""

    async def silences(self, since: dt.datetime) -> list[Silence]:
        """Silences not over before ``since`` (active, future and recent), newest start first."""

    async def get_silence(self, silence_id: str) -> Silence | None: ...

    async def expire_silence(self, silence_id: str, by: str, at: dt.datetime) -> Silence | None:
        """End a silence now (the first expiry counts); None when there is no such silence."""


class AlertPublisher(Protocol):
    async def publish(self, event: AlertEvent) -> None:
        """Put ``event`` on ``ioc.alerts`` and wait until the broker has it; raises if it cannot."""


def silence_over(silence: Silence, at: dt.datetime) -> bool:
    """Whether a silence no longer applies at ``at`` (ended, or expired by hand)."""
    return silence.ends_at <= at or (silence.expired_at is not None and silence.expired_at <= at)


# --- PostgreSQL ---------------------------------------------------------------------------------

_LIST = """
SELECT alert::text FROM alert_current
WHERE (%(states)s::text[] IS NULL OR state = ANY(%(states)s))
  AND (%(severities)s::text[] IS NULL OR severity = ANY(%(severities)s))
  AND (%(scopes)s::text[] IS NULL OR scope = ANY(%(scopes)s))
  AND (%(domains)s::text[] IS NULL OR domain = ANY(%(domains)s))
ORDER BY started_at DESC, alert_id DESC
LIMIT %(page)s OFFSET %(offset)s
"""
_INSERT_EVENT = """
INSERT INTO alert_event (alert_id, fingerprint, state, at, by, event)
VALUES (%s, %s, %s, %s, %s, %s::jsonb)
ON CONFLICT (alert_id, state, at, by) DO NOTHING
"""
_UPDATE_CURRENT = """
UPDATE alert_current SET state = %s, severity = %s, updated_at = %s, alert = %s::jsonb WHERE alert_id = %s
"""
_SILENCE_COLUMNS = "id, matchers, starts_at, ends_at, created_by, reason, expired_at, expired_by"


def _or_none(values: Iterable[str]) -> list[str] | None:
    out = sorted(values)
    return out or None


def _silence(row: tuple[Any, ...]) -> Silence:
    sid, matchers, starts, ends, created_by, reason, expired_at, expired_by = row
    return Silence(
        id=sid,
        matchers={k: tuple(v) if isinstance(v, list) else (v,) for k, v in matchers.items()},
        starts_at=starts,
        ends_at=ends,
        created_by=created_by,
        reason=reason,
        expired_at=expired_at,
        expired_by=expired_by,
    )


class PostgresAlertStore:
    """The alert tables of the IOC database, through the API's connection pool (autocommit)."""

    def __init__(self, pool: AsyncConnectionPool, *, timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    async def list_alerts(self, query: AlertQuery, accept: Callable[[Alert], bool], limit: int) -> list[Alert]:
        params: dict[str, Any] = {
            "states": _or_none(s.value for s in query.states),
            "severities": _or_none(s.value for s in query.severities),
            "scopes": _or_none(query.scopes),
            "domains": _or_none(query.domains),
            "page": PAGE,
            "offset": 0,
        }
        found: list[Alert] = []
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            while len(found) < limit:
                cur = await conn.execute(_LIST, params)
                rows = await cur.fetchall()
                for (text,) in rows:
                    alert = msgspec.json.decode(text, type=Alert)
                    if accept(alert):
                        found.append(alert)
                if len(rows) < PAGE:
                    break
                params["offset"] += PAGE
        return found[:limit]

    async def get(self, alert_id: str) -> Alert | None:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            cur = await conn.execute("SELECT alert::text FROM alert_current WHERE alert_id = %s", (alert_id,))
            row = await cur.fetchone()
        return msgspec.json.decode(row[0], type=Alert) if row else None

    async def events(self, alert_id: str) -> list[AlertEvent]:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            cur = await conn.execute(
                "SELECT event::text FROM alert_event WHERE alert_id = %s ORDER BY at, id", (alert_id,)
            )
            rows = await cur.fetchall()
        return [msgspec.json.decode(text, type=AlertEvent) for (text,) in rows]

    async def record(self, alert_id: str, step: Step, publish: Publish) -> tuple[Alert, AlertEvent]:
        async with self.pool.connection(timeout=self.timeout_s) as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT alert::text FROM alert_current WHERE alert_id = %s FOR UPDATE", (alert_id,)
            )
            row = await cur.fetchone()
            if row is None:
                raise UnknownAlert(f"no alert {alert_id!r}")
            alert = msgspec.json.decode(row[0], type=Alert)
            event = step(alert)
            alert.apply(event)
            await conn.execute(
                _INSERT_EVENT,
                (event.alert_id, event.fingerprint, event.state.value, event.at, event.by,
                 msgspec.json.encode(event).decode()),
            )  # fmt: skip
            await conn.execute(
                _UPDATE_CURRENT,
                (alert.state.value, alert.severity.value, alert.updated_at, msgspec.json.encode(alert).decode(),
                 alert_id),
            )  # fmt: skip
            await publish(event)
        return alert, event

    async def add_silence(self, silence: Silence) -> tuple[Silence, bool]:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            cur = await conn.execute(
                f"INSERT INTO alert_silence ({_SILENCE_COLUMNS}) VALUES (%s, %s::jsonb, %s, %s, %s, %s, NULL, NULL)"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_SILENCE_COLUMNS}",
                (silence.id, msgspec.json.encode(silence.matchers).decode(), silence.starts_at, silence.ends_at,
                 silence.created_by, silence.reason),
            )  # fmt: skip
            row = await cur.fetchone()
            if row is not None:
                return _silence(row), True
            cur = await conn.execute(f"SELECT {_SILENCE_COLUMNS} FROM alert_silence WHERE id = %s", (silence.id,))
            existing = await cur.fetchone()
        assert existing is not None
        return _silence(existing), False

    async def silences(self, since: dt.datetime) -> list[Silence]:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            cur = await conn.execute(
                f"SELECT {_SILENCE_COLUMNS} FROM alert_silence"
                " WHERE ends_at > %s AND (expired_at IS NULL OR expired_at > %s) ORDER BY starts_at DESC, id",
                (since, since),
            )
            rows = await cur.fetchall()
        return [_silence(r) for r in rows]

    async def get_silence(self, silence_id: str) -> Silence | None:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            cur = await conn.execute(f"SELECT {_SILENCE_COLUMNS} FROM alert_silence WHERE id = %s", (silence_id,))
            row = await cur.fetchone()
        return _silence(row) if row else None

    async def expire_silence(self, silence_id: str, by: str, at: dt.datetime) -> Silence | None:
        async with self.pool.connection(timeout=self.timeout_s) as conn:
            await conn.execute(
                "UPDATE alert_silence SET expired_at = %s, expired_by = %s WHERE id = %s AND expired_at IS NULL",
                (at, by, silence_id),
            )
            cur = await conn.execute(f"SELECT {_SILENCE_COLUMNS} FROM alert_silence WHERE id = %s", (silence_id,))
            row = await cur.fetchone()
        return _silence(row) if row else None


# --- in memory ----------------------------------------------------------------------------------


class MemoryAlertStore:
    """The same tables as plain dicts: what the worker writes goes in through `put`."""

    def __init__(self) -> None:
        self.current: dict[str, Alert] = {}
        self.trail: dict[str, list[AlertEvent]] = {}
        self.silence_rows: dict[str, Silence] = {}
        self._lock = asyncio.Lock()

    def put(self, event: AlertEvent) -> None:
        """Record an engine event as the worker does (audit row once, current state folded)."""
        trail = self.trail.setdefault(event.alert_id, [])
        if any((e.state, e.at, e.by) == (event.state, event.at, event.by) for e in trail):
            return
        trail.append(event)
        held = self.current.get(event.alert_id)
        if held is None:
            self.current[event.alert_id] = Alert.open(event)
        else:
            held.apply(event)

    async def list_alerts(self, query: AlertQuery, accept: Callable[[Alert], bool], limit: int) -> list[Alert]:
        ordered = sorted(self.current.values(), key=lambda a: (a.started_at, a.alert_id), reverse=True)
        return [msgspec.structs.replace(a) for a in ordered if query.matches(a) and accept(a)][:limit]

    async def get(self, alert_id: str) -> Alert | None:
        alert = self.current.get(alert_id)
        return msgspec.structs.replace(alert) if alert else None

    async def events(self, alert_id: str) -> list[AlertEvent]:
        return sorted(self.trail.get(alert_id, []), key=lambda e: e.at)

    async def record(self, alert_id: str, step: Step, publish: Publish) -> tuple[Alert, AlertEvent]:
        async with self._lock:
            held = self.current.get(alert_id)
            if held is None:
                raise UnknownAlert(f"no alert {alert_id!r}")
            alert = msgspec.structs.replace(held)
            event = step(alert)
            alert.apply(event)
            await publish(event)  # before anything is kept, as the database commits last
            self.current[alert_id] = alert
            self.trail.setdefault(alert_id, []).append(event)
        return msgspec.structs.replace(alert), event

    async def add_silence(self, silence: Silence) -> tuple[Silence, bool]:
        if silence.id in self.silence_rows:
            return self.silence_rows[silence.id], False
        self.silence_rows[silence.id] = silence
        return silence, True

    async def silences(self, since: dt.datetime) -> list[Silence]:
        kept = [s for s in self.silence_rows.values() if not silence_over(s, since)]
        return sorted(kept, key=lambda s: (-s.starts_at.timestamp(), s.id))

    async def get_silence(self, silence_id: str) -> Silence | None:
        return self.silence_rows.get(silence_id)

    async def expire_silence(self, silence_id: str, by: str, at: dt.datetime) -> Silence | None:
        silence = self.silence_rows.get(silence_id)
        if silence is not None and silence.expired_at is None:
            silence = self.silence_rows[silence_id] = msgspec.structs.replace(silence, expired_at=at, expired_by=by)
        return silence


# --- publishing -----------------------------------------------------------------------------------


class KafkaAlertPublisher:
    """Produces operator events to ``ioc.alerts`` (key: the fingerprint), starting its producer on first use."""

    def __init__(self, settings: Settings, *, timeout_s: float = 5.0) -> None:
        self.settings = settings
        self.topic = settings.topic(TOPIC_ALERTS)
        self.timeout_ms = int(timeout_s * 1000)
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.kafka_bootstrap,
                    client_id="ioc-api-alerts",
                    acks="all",
                    request_timeout_ms=self.timeout_ms,
                )
                try:
                    await producer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def publish(self, event: AlertEvent) -> None:
        producer = await self._started()
        await asyncio.wait_for(
            producer.send_and_wait(self.topic, value=msgspec.json.encode(event), key=event.fingerprint.encode()),
            self.timeout_ms / 1000 * 2,
        )

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await stop_within(producer, "the alert publisher's producer")


class CollectingPublisher:
    """Keeps what would be published (tests; an API without a broker); ``fail`` makes it refuse."""

    def __init__(self) -> None:
        self.events: list[AlertEvent] = []
        self.fail: Exception | None = None

    async def publish(self, event: AlertEvent) -> None:
        if self.fail is not None:
            raise self.fail
        self.events.append(event)

    async def close(self) -> None:
        return None
