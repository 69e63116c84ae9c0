"""Prometheus metrics of the worker and the API: one place that names every family.

The worker serves them on ``IOC_WORKER_METRICS_PORT`` (``ioc dev`` picks a free port), the API on
``GET /metrics``. Names follow Prometheus conventions (``_total`` counters, ``_seconds``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Latency buckets from a millisecond to a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class WorkerMetrics:
    """Families the stream worker updates."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records_in = Counter("ioc_records_in_total", "Input records consumed, by topic", ["topic"], registry=r)
        self.deadlettered = Counter(
            "ioc_deadlettered_total", "Records sent to the dead-letter topic, by stage", ["topic", "stage"], registry=r
        )
        self.duplicates = Counter(
            "ioc_duplicate_events_total", "Valid events that changed nothing (re-sent)", ["topic"], registry=r
        )
        self.late_events = Counter(
            "ioc_late_events_total",
            "Events whose time is more than a day behind the worker's clock",
            ["topic"],
            registry=r,
        )
        self.event_lag = Gauge(
            "ioc_event_time_lag_seconds",
            "Worker clock minus the newest event time seen, by topic",
            ["topic"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "ioc_consumer_lag_records",
            "Records between the committed offset and the end of each partition",
            ["topic", "partition"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "ioc_batch_seconds",
            "Time to validate, apply, write and commit one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_write_seconds = Histogram(
            "ioc_db_write_seconds",
            "Database write latency, by what is written",
            ["what"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.db_retries = Counter(
            "ioc_db_retries_total", "Database operations retried after a transient error", registry=r
        )
        self.snapshots = Counter("ioc_kpi_snapshots_total", "KPI snapshots published", registry=r)
        self.emit_seconds = Histogram(
            "ioc_kpi_emit_seconds",
            "Time from the emit tick to the snapshots being published",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.entities = Gauge("ioc_entities_in_memory", "Dossiers and incidents held in memory", ["kind"], registry=r)
        self.partitions_owned = Gauge(
            "ioc_worker_partition_owned",
            "Input partitions this worker owns (1 each)",
            ["topic", "partition"],
            registry=r,
        )
        self.merger = Gauge(
            "ioc_worker_merger", "1 on the worker that merges the partials and publishes KPIs", registry=r
        )
        self.partials = Counter("ioc_partials_published_total", "Partial counters published, one per shard", registry=r)


class ApiMetrics:
    """Families the API updates."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ws_clients = Gauge("ioc_ws_clients", "Connected WebSocket clients, by role", ["role"], registry=r)
        self.ws_messages = Counter(
            "ioc_ws_messages_total", "Messages handed to WebSocket clients, by type", ["type"], registry=r
        )
        self.ws_coalesced = Counter(
            "ioc_ws_coalesced_total", "KPI updates replaced by a newer one before delivery", registry=r
        )
        self.ws_disconnected_slow = Counter(
            "ioc_ws_slow_disconnects_total", "Clients cut off for falling behind", registry=r
        )
        self.ws_refused = Counter(
            "ioc_ws_refused_total", "WebSocket connections or subscriptions refused, by reason", ["reason"], registry=r
        )
        self.feed_updates = Counter(
            "ioc_feed_updates_total", "Updates read from the KPI and alert topics, by topic", ["topic"], registry=r
        )
        self.http_requests = Counter(
            "ioc_http_requests_total", "HTTP requests, by route and status", ["route", "status"], registry=r
        )
        self.alert_transitions = Counter(
            "ioc_alert_transitions_total", "Alert lifecycle transitions, by state", ["state"], registry=r
        )
