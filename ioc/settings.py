"""The one settings class: every knob is an ``IOC_*`` environment variable (or a line in ``.env``)."""

from __future__ import annotations

import os
import secrets
from enum import StrEnum
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ioc.errors import ConfigurationError

#: The input and output topics of CONTRACT §1–2, before ``topic_prefix`` is applied.
TOPIC_DOSSIER = "ioc.dossier.events"
TOPIC_CYBER = "ioc.cyber.incidents"
TOPIC_SENSOR = "ioc.sensor.readings"
TOPIC_DEADLETTER = "ioc.deadletter"
TOPIC_KPI = "ioc.kpi.updates"
TOPIC_ALERTS = "ioc.alerts"
#: Several workers' partial counters for the merger (streams/shards.py; created by the worker, not in ALL_TOPICS).
TOPIC_PARTIALS = "ioc.kpi.partials"
INPUT_TOPICS = (TOPIC_DOSSIER, TOPIC_CYBER, TOPIC_SENSOR)

#: How long a consumer lets the broker hold a fetch that has nothing to return (aiokafka's default
#: is 500 ms), for the worker's input and the API's feed. Kafka answers a waiting fetch as soon as a
#: record arrives, yet a longer wait still delayed events in the whole pipeline; the likely reason:
#: aiokafka keeps one fetch in flight per broker and leaves out of it the partitions whose records
#: the application has not taken yet, so a busy partition just drained waits for a fetch held open
#: on idle ones (the worker reads one busy and two idle topics there; the API's feed the busy
#: `ioc.kpi.updates` and the mostly idle `ioc.alerts`). A lone consumer did not show it. Measured with `ioc bench --only latency` on the embedded Kafka,
#: event to screen at 5,000/s with a 0.1 s emission: 500 ms: p50 99 / p99 649 ms; 20 ms: 74 / 131 ms
#: (~2 % of a core per idle consumer). On the tansu fallback, which answers on its own schedule
#: within the wait, 500 ms delayed every event by ~130 ms at the median.
FETCH_MAX_WAIT_MS = 20
ALL_TOPICS = (*INPUT_TOPICS, TOPIC_DEADLETTER, TOPIC_KPI, TOPIC_ALERTS)
#: Topics created with a single partition whatever IOC_TOPIC_PARTITIONS says: every API process
#: reads all of them (no consumer group), so partitions would add no parallelism, and one keeps
#: each emission's updates in order. (On the tansu fallback it also spares a broker whose fetches
#: slowed as record batches piled up in a topic: with 6 partitions the feed's p99 went from 44 ms to 1.4 s in 7 minutes.)
SINGLE_PARTITION_TOPICS = (TOPIC_KPI, TOPIC_ALERTS)


class Mode(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


def state_dir() -> Path:
    """This machine's per-user state folder for ``ioc`` (the development signing key lives here)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ioc"


def development_signing_key() -> str:
    """The development key of this machine, made on first use and shared by ``ioc dev`` and ``ioc token``."""
    path = state_dir() / "dev-signing-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(secrets.token_urlsafe(48))
        tmp.chmod(0o600)
        tmp.replace(path)
    return path.read_text().strip()


DEV_KEY_MARKER = "dev:"


class AlertWebhook(BaseModel):
    """One entry of ``IOC_ALERT_WEBHOOKS``: where alert notifications are POSTed, signed with ``secret``.

    The filters are optional and all must pass: ``domains`` (alert domains), ``min_severity``,
    ``audience`` (roles the alert is addressed to; any of), ``communes`` (alerts of these communes).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(repr=False)  # a webhook URL often carries a token in its path or query
    secret: SecretStr
    name: str | None = None
    domains: tuple[str, ...] = ()
    min_severity: Literal["info", "warning", "high", "critical"] | None = None
    audience: tuple[Literal["operator", "security", "commune"], ...] = ()
    communes: tuple[str, ...] = ()

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a webhook url must be an http(s) URL with a host")
        return url

    @field_validator("secret")
    @classmethod
    def _secret_given(cls, secret: SecretStr) -> SecretStr:
        if not secret.get_secret_value():
            raise ValueError("a webhook needs a non-empty secret")
        return secret

    @property
    def label(self) -> str:
        """How logs name this webhook: its ``name``, else the URL's host (never the path, which may hold a token)."""
        return self.name or urlsplit(self.url).hostname or "webhook"


class IngestLimits(BaseModel):
    """One source's entry of ``IOC_INGEST_SOURCE_LIMITS``: what it may send, overriding the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)
    max_body_bytes: int | None = Field(None, ge=1024)


class Settings(BaseSettings):
    """Configuration of every ``ioc`` component. Field docs feed the configuration reference."""

    # hide_input_in_errors: a refused setting's error must not echo the secrets it was given
    model_config = SettingsConfigDict(
        env_prefix="IOC_", env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    mode: Mode = Field(
        Mode.DEVELOPMENT, description="`development` or `production`; production refuses development secrets."
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated HOST:PORT.")
    embedded_broker: Literal["auto", "kafka", "tansu"] = Field(
        "auto",
        description=(
            "Broker `ioc dev`, `ioc bench` and the tests start when `IOC_KAFKA_BOOTSTRAP` is not set: `kafka` (Apache "
            "Kafka from the jars scripts/setup fetches; needs Java 17+), `tansu` (the limited fallback), or `auto` "
            "(Kafka where it can run, else tansu with a warning)."
        ),
    )
    kafka_data_dir: Path | None = Field(
        None,
        description=(
            "Where the embedded Kafka keeps its log, kept across restarts (`ioc dev --kafka-data DIR`); "
            "empty = a temp dir removed on exit."
        ),
    )
    database_url: str = Field(
        "postgresql://ioc@127.0.0.1:5432/ioc", description="PostgreSQL/TimescaleDB URL (psycopg conninfo)."
    )
    topic_prefix: str = Field(
        "", description="Prefix added to every topic name (isolates tests and tenants on one cluster)."
    )
    topic_partitions: int = Field(
        6,
        ge=1,
        description="Partitions for the input and dead-letter topics the system creates (`ioc.kpi.updates` and `ioc.alerts` get one).",
    )
    topic_replication: int = Field(
        1, ge=1, description="Replication factor for topics the system creates (3 on a real cluster)."
    )
    consumer_group: str = Field("ioc-worker", description="Consumer group of the stream workers.")
    worker_batch_max: int = Field(
        20000, ge=1, description="Most records the worker takes from the broker in one batch."
    )
    worker_flush_interval_s: float = Field(
        0.25, gt=0, description="Longest time a batch is held before its effects are written and committed."
    )
    worker_db_writers: int = Field(
        2,
        ge=1,
        le=8,
        description="Database connections a large batch of state changes is split over and written by concurrently.",
    )
    worker_session_timeout_ms: int = Field(
        6000,
        ge=1000,
        description="After this long without a heartbeat a worker is declared dead and its partitions move to the "
        "others (the broker's `group.min.session.timeout.ms`, 6000 by default, is the floor).",
    )
    worker_metrics_port: int = Field(
        9108, ge=0, le=65535, description="Port of the worker's Prometheus `/metrics` (0 = a free port, logged)."
    )
    emit_interval_s: float = Field(
        0.1, gt=0, description="How often changed KPIs (and clock-driven windows) are published and stored as latest."
    )
    kpi_history_interval_s: float = Field(
        10.0,
        ge=0,
        description=(
            "Per KPI series, at most one `kpi_history` row this often (the newest value; a value that stands is "
            "written within this interval); 0 = every emission."
        ),
    )
    api_host: str = Field("127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port the API listens on.")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Browser Origins allowed on the WebSocket (JSON list); the API's own origin is always allowed.",
    )
    signing_key: SecretStr = Field(
        SecretStr(""),
        description="HMAC key that signs access tokens; empty = this machine's development key (refused in production).",
    )
    signing_key_id: str = Field("k1", description="Key id (`kid`) put into new tokens.")
    signing_keys_previous: dict[str, SecretStr] = Field(
        default_factory=dict,
        description=(
            'Retired keys that still verify tokens until they expire, as a JSON object `{"kid": "key"}`; '
            "never used to sign."
        ),
    )
    stations_file: Path | None = Field(
        None, description="Station registry CSV; default: the one shipped with the package."
    )
    units_file: Path | None = Field(None, description="Administrative units CSV; default: Nghệ An's 130 communes.")
    targets_file: Path | None = Field(None, description="KPI targets YAML; default: Plan 348/KH-UBND.")
    log_level: str = Field("INFO", description="Logging level.")
    log_json: bool = Field(False, description="Structured JSON logs (one object a line).")
    kpi_history_days: int = Field(30, ge=1, description="Days of raw KPI history kept.")
    kpi_rollup_days: int = Field(3650, ge=1, description="Days of hourly KPI rollups kept (`kpi_hourly`).")
    alert_webhooks: list[AlertWebhook] = Field(
        default_factory=list,
        description=(
            "Where alert notifications are POSTed, as a JSON list of "
            '`{"url", "secret", "name"?, "domains"?, "min_severity"?, "audience"?, "communes"?}`; '
            "each body is signed (`X-IOC-Signature`) with its secret (docs/api.md)."
        ),
    )
    alert_rules: Path | None = Field(
        None, description="Alert rules YAML, reloaded when it changes; default: the rules shipped with the package."
    )
    anomaly_config: Path | None = Field(
        None,
        description="Anomaly detector parameters YAML (docs/anomaly.md), read at start by the worker and "
        "`ioc replay`; default: the documented defaults.",
    )
    alert_webhook_timeout_s: float = Field(5.0, gt=0, description="Timeout of one webhook delivery attempt.")
    alert_webhook_max_attempts: int = Field(
        5, ge=1, description="Delivery attempts per webhook notification before it goes to `ioc.deadletter`."
    )
    alert_webhook_queue: int = Field(
        1000, ge=1, description="Notifications held per webhook while it is slow; beyond that they are dead-lettered."
    )
    ingest_max_body_bytes: int = Field(
        4 << 20, ge=1024, description="Largest body `POST /api/ingest/...` reads (413 beyond), per request."
    )
    ingest_max_records: int = Field(5000, ge=1, description="Most records in one NDJSON ingest batch (413 beyond).")
    ingest_rate: float = Field(
        1000.0, gt=0, description="Records per second each ingest source may send on average (a token bucket; 429)."
    )
    ingest_burst: int = Field(10000, ge=1, description="Records an ingest source may send at once above its rate.")
    ingest_source_limits: dict[str, IngestLimits] = Field(
        default_factory=dict,
        description='Per-source overrides, a JSON object `{"SOURCE": {"rate"?, "burst"?, "max_body_bytes"?}}`.',
    )
    ingest_max_in_flight: int = Field(
        20000, ge=1, description="Records an API process holds unacknowledged by the broker; beyond, 429."
    )
    ingest_recent_ids: int = Field(
        200000, ge=0, description="event_ids an ingest door remembers (per process) to answer re-sent ones duplicate."
    )
    mqtt_url: SecretStr = Field(
        SecretStr(""),
        description="`mqtt://USER:PASSWORD@HOST:PORT` of the MQTT broker the bridge reads; empty: `ioc dev` starts one.",
    )
    mqtt_client_id: str = Field("ioc-mqtt-bridge", description="MQTT client id (and persistent session) of the bridge.")
    mqtt_bridge_metrics_port: int = Field(
        9109, ge=0, le=65535, description="Port of the MQTT bridge's Prometheus `/metrics` (0 = a free port, logged)."
    )

    @model_validator(mode="after")
    def _refuse_development_secrets_in_production(self) -> Settings:
        key = self.signing_key.get_secret_value()
        if self.mode is Mode.PRODUCTION and (not key or key.startswith(DEV_KEY_MARKER) or len(key) < 32):
            raise ConfigurationError("IOC_SIGNING_KEY must be set to a secret of at least 32 characters in production")
        return self

    @model_validator(mode="after")
    def _refuse_weak_webhooks_in_production(self) -> Settings:
        if self.mode is Mode.PRODUCTION:
            for hook in self.alert_webhooks:
                if not hook.url.startswith("https://"):
                    raise ConfigurationError(f"IOC_ALERT_WEBHOOKS[{hook.label!r}] must use https in production")
                if len(hook.secret.get_secret_value()) < 32:
                    raise ConfigurationError(
                        f"IOC_ALERT_WEBHOOKS[{hook.label!r}] needs a secret of at least 32 characters in production"
                    )
        return self

    @model_validator(mode="after")
    def _check_previous_signing_keys(self) -> Settings:
        if self.signing_key_id in self.signing_keys_previous:
            raise ConfigurationError(
                f"IOC_SIGNING_KEYS_PREVIOUS must not hold the current key id {self.signing_key_id!r}"
            )
        for kid, secret in self.signing_keys_previous.items():
            key = secret.get_secret_value()
            if not kid or not key:
                raise ConfigurationError("IOC_SIGNING_KEYS_PREVIOUS needs a non-empty key id and key for each entry")
            if self.mode is Mode.PRODUCTION and (key.startswith(DEV_KEY_MARKER) or len(key) < 32):
                raise ConfigurationError(
                    f"IOC_SIGNING_KEYS_PREVIOUS[{kid!r}] must be a secret of at least 32 characters in production"
                )
        return self

    def topic(self, name: str) -> str:
        """The topic name as it exists on the cluster."""
        return f"{self.topic_prefix}{name}"

    def effective_signing_key(self) -> str:
        """The key that signs and verifies tokens (the machine's development key when none is set)."""
        key = self.signing_key.get_secret_value()
        return key if key else DEV_KEY_MARKER + development_signing_key()


def settings_reference() -> str:
    """The configuration table of the README, generated from `Settings` (a test keeps them equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        if info.default_factory is not None:
            default: object = info.default_factory()  # type: ignore[call-arg]
        else:
            default = info.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        shown = "" if default in (None, "") else f"`{default.value if isinstance(default, StrEnum) else default}`"
        rows.append(f"| `IOC_{name.upper()}` | {shown} | {info.description or ''} |")
    return "\n".join(rows)
