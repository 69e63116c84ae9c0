"""The worker's alerting: feeds the alert engine, persists the audit trail, publishes `ioc.alerts`.

The engine (`alerts.engine.AlertEngine`) is pure; this module is its wiring. Events the engine makes
("system") are written to `alert_event` (the audit trail) and `alert_current` in one transaction,
then published to `ioc.alerts`. Operator steps (acknowledge, resolve) arrive on `ioc.alerts` from
the API and are applied to the engine, which stops escalations and reminders. Silences live in
`alert_silence` and are mirrored into the engine on every tick.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg.types.json import Jsonb

from alerts import Alert, AlertEvent
from alerts.engine import AlertEngine
from alerts.rule_files import RuleWatcher, default_rules
from alerts.webhook import WebhookDispatcher, WebhookFailure
from ioc import settings as cfg
from ioc.contract import US
from ioc.registry import Registry
from ioc.settings import Settings
from ioc.snapshot import Snapshot
from streams.anomaly import Finding
from streams.catch_up import FindingGate
from streams.cyber import IncidentState

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_decode_event = msgspec.json.Decoder(AlertEvent).decode
_decode_alert = msgspec.json.Decoder(Alert).decode
#: The dead-letter rate is judged over this many seconds of input.
DEADLETTER_WINDOW_S = 3600

INSERT_EVENT = """
INSERT INTO alert_event (alert_id, fingerprint, state, at, by, event) VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (alert_id, state, at, by) DO NOTHING
"""
UPSERT_CURRENT = """
INSERT INTO alert_current (alert_id, fingerprint, rule, scope, severity, state, domain, commune_code, started_at,
                           updated_at, alert)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (alert_id) DO UPDATE
SET severity = EXCLUDED.severity, state = EXCLUDED.state, updated_at = EXCLUDED.updated_at, alert = EXCLUDED.alert
WHERE alert_current.updated_at <= EXCLUDED.updated_at
"""


class Alerting:
    """One worker's alert engine and its inputs and outputs."""

    def __init__(self, settings: Settings, registry: Registry, history_after_h: float = 3.0) -> None:
        self.settings = settings
        self.history_after_us = int(history_after_h * 3600 * US)
        self.gate = FindingGate(self.history_after_us)
        #: The latest snapshot of each series published while catching up, for the rules afterwards.
        self.held_snapshots: dict[str, Snapshot] = {}
        #: The latest state of each incident changed while catching up, for the rules afterwards.
        self.held_incidents: dict[str, IncidentState] = {}
        self.registry = registry
        self.watcher = RuleWatcher(settings.alert_rules) if settings.alert_rules else None
        rules = self.watcher.rules if self.watcher else default_rules()
        self.engine = AlertEngine.for_registry(rules, registry)
        self.webhooks: WebhookDispatcher | None = None
        self.pending: list[AlertEvent] = []
        self.silences_seen: dict[str, bool] = {}
        self.consumer: AIOKafkaConsumer | None = None
        #: (monotonic time, dead letters, records) per batch within the dead-letter window.
        self._recent: collections.deque[tuple[float, int, int]] = collections.deque()
        self.published = 0

    def reset(self) -> None:
        """Forget every alert and silence held (a worker becoming the merger restores them afresh)."""
        rules = self.watcher.rules if self.watcher else default_rules()
        self.engine = AlertEngine.for_registry(rules, self.registry)
        self.pending = []
        self.silences_seen = {}
        self._recent.clear()
        self.gate = FindingGate(self.history_after_us)
        self.held_snapshots = {}
        self.held_incidents = {}

    # --- inputs -------------------------------------------------------------------------------

    def on_incidents(self, states: Sequence[IncidentState], now: dt.datetime, catching_up: bool = False) -> None:
        """Incidents to the rules; while the worker is catching up their states are held (an incident
        detected hours ago whose resolution is a batch away is no incident to page anyone about), and
        the latest of each goes to the rules after."""
        if catching_up:
            self.held_incidents.update((s.incident_id, s) for s in states)
            return
        self._release_incidents(now)
        for state in states:
            self.pending.extend(self.engine.on_incident(state, now))

    def _release_incidents(self, now: dt.datetime) -> None:
        held, self.held_incidents = self.held_incidents, {}
        for state in held.values():
            self.pending.extend(self.engine.on_incident(state, now))

    def on_findings(self, findings: Sequence[Finding], now: dt.datetime, detectors_us: int | None = None) -> None:
        """Anomaly findings (`streams.anomaly`) to the ``anomaly`` rules, but not the past's
        (`streams.catch_up.FindingGate`; ``detectors_us``: how far the detectors have judged)."""
        for finding in self.gate.admit(findings, detectors_us, int(now.timestamp() * US)):
            self.pending.extend(self.engine.on_finding(finding, now))

    def on_batch(self, dead: int, total: int, at: float) -> None:
        self._recent.append((at, dead, total))
        while self._recent and self._recent[0][0] < at - DEADLETTER_WINDOW_S:
            self._recent.popleft()

    def on_snapshots(self, snapshots: Sequence[Snapshot], now: dt.datetime, catching_up: bool = False) -> None:
        """Snapshots to the rules; while the worker is catching up they are held (a state still
        loading is no change to judge), and the latest of each series goes to the rules after."""
        if catching_up:
            self.held_snapshots.update((s.key, s) for s in snapshots)
            return
        self._release_incidents(now)
        if self.held_snapshots:
            held, self.held_snapshots = self.held_snapshots, {}
            held.update((s.key, s) for s in snapshots)
            snapshots = list(held.values())
        for snapshot in snapshots:
            self.pending.extend(self.engine.on_snapshot(snapshot, now))

    def tick(self, now: dt.datetime) -> None:
        if self.watcher is not None:
            reloaded = self.watcher.check()
            if reloaded is not None:
                log.info("alert rules reloaded from %s", self.settings.alert_rules)
                self.pending.extend(self.engine.set_rules(reloaded, now))
            elif self.watcher.error:
                log.warning("alert rules file invalid, keeping the previous rules: %s", self.watcher.error)
        if self._recent:
            dead = sum(d for _, d, _ in self._recent)
            total = sum(t for _, _, t in self._recent)
            self.pending.extend(self.engine.on_deadletters(dead, total, now))
        self.pending.extend(self.engine.tick(now))

    async def restore(self, conn: psycopg.AsyncConnection[Any], now: dt.datetime) -> int:
        """Adopt the alerts still open in `alert_current` (a restart must not fire them again)."""
        cur = await conn.execute("SELECT alert::text FROM alert_current WHERE state <> 'resolved'")
        alerts = [_decode_alert(row[0]) for row in await cur.fetchall()]
        adopted = self.engine.restore(alerts, now)
        self.pending.extend(self.engine.tick(now))
        return adopted

    # --- silences -----------------------------------------------------------------------------

    async def sync_silences(self, conn: psycopg.AsyncConnection[Any], now: dt.datetime) -> None:
        """Mirror `alert_silence` into the engine: new silences added, expired ones expired."""
        cur = await conn.execute(
            "SELECT id, matchers, starts_at, ends_at, created_by, reason, expired_at, expired_by FROM alert_silence"
            " WHERE ends_at > now() - interval '1 day'"
        )
        for sid, matchers, starts, ends, by, reason, expired_at, expired_by in await cur.fetchall():
            if sid not in self.silences_seen:
                try:
                    self.engine.add_silence(matchers, starts, ends, by, reason)
                except ValueError as exc:
                    log.warning("silence %s ignored: %s", sid, exc)
                self.silences_seen[sid] = False
            if expired_at is not None and not self.silences_seen[sid]:
                self.pending.extend(self.engine.expire_silence(sid, expired_by or "?", now))
                self.silences_seen[sid] = True

    # --- outputs ------------------------------------------------------------------------------

    def take(self) -> list[AlertEvent]:
        events, self.pending = self.pending, []
        return events

    async def persist(self, conn: psycopg.AsyncConnection[Any], events: Sequence[AlertEvent]) -> None:
        """The audit trail and current state, in one transaction (idempotent: a replay writes nothing new)."""
        if not events:
            return
        current: dict[str, Alert] = {}
        for e in events:
            alert = self.engine.get(e.alert_id)
            if alert is not None:
                current[e.alert_id] = alert
        async with conn.transaction(), conn.cursor() as cur:
            await cur.executemany(
                INSERT_EVENT,
                [(e.alert_id, e.fingerprint, e.state.value, e.at, e.by, Jsonb(e, dumps=_encode)) for e in events],
            )
            await cur.executemany(
                UPSERT_CURRENT,
                [
                    (
                        a.alert_id,
                        a.fingerprint,
                        a.rule,
                        a.scope,
                        a.severity.value,
                        a.state.value,
                        a.domain,
                        a.commune_code,
                        a.started_at,
                        a.updated_at,
                        Jsonb(a, dumps=_encode),
                    )
                    for a in current.values()
                ],
            )

    async def publish(self, producer: AIOKafkaProducer, events: Sequence[AlertEvent]) -> None:
        topic = self.settings.topic(cfg.TOPIC_ALERTS)
        futures = [await producer.send(topic, value=_encode(e), key=e.fingerprint.encode()) for e in events]
        if futures:
            await asyncio.gather(*futures)
        self.published += len(events)
        self.notify(events)

    def notify(self, events: Sequence[AlertEvent]) -> None:
        """Hand events to the configured webhooks (never blocks; each target has its own queue)."""
        if self.webhooks is not None:
            for event in events:
                self.webhooks.submit(event)

    async def start_webhooks(self, producer: AIOKafkaProducer) -> None:
        """Start delivery to `IOC_ALERT_WEBHOOKS`; what cannot be delivered goes to `ioc.deadletter`."""

        async def dead_letter(failure: WebhookFailure) -> None:
            headers = [
                ("ioc.error.stage", b"webhook"),
                ("ioc.error.reason", f"{failure.target}: {failure.reason} after {failure.attempts} attempts".encode()),
                ("ioc.source.topic", self.settings.topic(cfg.TOPIC_ALERTS).encode()),
                ("ioc.source.partition", b"-1"),
                ("ioc.source.offset", b"-1"),
            ]
            await producer.send_and_wait(
                self.settings.topic(cfg.TOPIC_DEADLETTER), value=failure.body, key=failure.key, headers=headers
            )

        self.webhooks = WebhookDispatcher.from_settings(self.settings, on_dead_letter=dead_letter)
        await self.webhooks.start()

    # --- operator steps from the API ----------------------------------------------------------

    async def start_listening(self) -> None:
        """Read `ioc.alerts` from its end (no group: every worker sees every operator step)."""
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap, enable_auto_commit=False)
        await self.consumer.start()
        topic = self.settings.topic(cfg.TOPIC_ALERTS)
        partitions = self.consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await self.consumer._client.force_metadata_update()  # the topic exists (ensure_topics); load it
            partitions = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)

    async def listen(self) -> None:
        assert self.consumer is not None
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for rec in records:
                    try:
                        event = _decode_event(rec.value)
                    except (msgspec.DecodeError, TypeError):
                        log.warning("unreadable alert event at %s[%d]@%d", rec.topic, rec.partition, rec.offset)
                        continue
                    if event.by != "system" and self.engine.apply_external(event):
                        log.info("alert %s %s by %s", event.alert_id, event.state.value, event.by)
                        self.notify([event])

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.consumer is not None:
            await self.consumer.stop()
