"""What the REST routes answer, for the OpenAPI document: response models, examples, error bodies.

The routes return plain dicts (a KPI list can hold thousands of snapshots; validating each on
the way out would cost more than serialising it), so these models document the shapes rather
than enforce them; ``tests/wiring/test_api_openapi.py`` checks real responses against them.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Query and path values that reach the database: PostgreSQL text cannot hold a NUL character, so one is a
#: 422 like any other malformed parameter (percent-decoding never yields unpaired surrogates).
NO_NUL: Final = r"^[^\x00]*$"


def storable_text(value: str) -> str:
    """Text PostgreSQL can store: no NUL character and no unpaired surrogate (JSON's ``\\ud800`` escapes
    allow both); raised as a 422 by the body models."""
    if "\x00" in value:
        raise ValueError("text may not contain NUL characters")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise ValueError("text may not contain unpaired surrogates") from exc
    return value


StoredText = Annotated[str, AfterValidator(storable_text)]

#: CONTRACT §4, verbatim.
KPI_SNAPSHOT_EXAMPLE: Final[dict[str, Any]] = {
    "kpi": "dossier.online_rate",
    "scope": "commune:16681",
    "window": "24h",
    "value": 83.2,
    "unit": "%",
    "numerator": 832,
    "denominator": 1000,
    "target": 70.0,
    "status": "ok",
    "as_of": "2026-11-22T08:15:00+07:00",
    "seq": 123456,
}


class KpiSnapshot(BaseModel):
    """One value of one KPI for one scope and window (CONTRACT §4)."""

    kpi: str = Field(description="KPI name from the catalogue, e.g. `dossier.online_rate`.")
    scope: str = Field(description="`province`, `commune:<code>`, `agency:<code>` or `station:<id>`.")
    window: str = Field(description="`1h`, `24h`, `today`, `mtd`, or `now` (a state).")
    value: float | None = Field(description="Null where the denominator is 0.")
    unit: str
    numerator: float | None
    denominator: float | None
    target: float | None = Field(description="Plan target the value is judged against; null if none.")
    status: Literal["ok", "warn", "breach"] | None = Field(description="Null where no target applies.")
    as_of: str = Field(description="ISO 8601 with offset (Asia/Ho_Chi_Minh).")
    seq: int = Field(description="Increases per (kpi, scope, window).")
    extra: dict[str, Any] | None = Field(
        None, description="KPI-specific detail (AQI band and colour, worst station ...)."
    )
    quality: Literal["suspect"] | None = Field(
        None,
        description="`suspect` while an anomaly detector holds a finding on the station behind the value "
        "(docs/anomaly.md); null otherwise. An extension of CONTRACT §4.",
    )


class KpiList(BaseModel):
    items: list[KpiSnapshot]
    count: int


class HistoryPoint(BaseModel):
    """One bucket: its last value, with min, max and mean over the bucket."""

    t: str = Field(description="Bucket start, ISO 8601 (buckets align on local midnight).")
    value: float | None
    min: float | None
    max: float | None
    avg: float | None
    numerator: float | None
    denominator: float | None
    status: str | None
    as_of: str
    seq: int
    samples: int


class KpiHistory(BaseModel):
    kpi: str
    scope: str
    window: str
    from_: str = Field(alias="from")
    to: str
    bucket: str
    storage: str = Field(description="`timescaledb` or `postgresql`.")
    points: list[HistoryPoint]


class Unit(BaseModel):
    code: str
    name: str
    kind: Literal["xa", "phuong"]


class UnitList(BaseModel):
    items: list[Unit]
    count: int


class Station(BaseModel):
    station_id: str
    name: str
    kind: Literal["air", "water", "rain", "weather"]
    commune_code: str
    lat: float
    lon: float
    interval_s: int
    river: str | None
    bd1_m: float | None = Field(description="Flood alarm level I (water gauges).")
    bd2_m: float | None
    bd3_m: float | None


class StationList(BaseModel):
    items: list[Station]
    count: int


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    database: str
    broker: str
    feed: dict[str, Any]
    clients: int
    #: The stream workers' group (api.workers): members, their partitions and lag, the merger.
    workers: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the API (FastAPI's ``HTTPException`` body)."""

    detail: str


class ValidationIssue(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None


class ValidationErrorBody(BaseModel):
    """A 422: a parameter that does not have the declared type."""

    detail: list[ValidationIssue]


class AlertModel(BaseModel):
    """The current state of one alert (`alerts.model.Alert`, as kept in ``alert_current``)."""

    alert_id: str
    fingerprint: str = Field(description="Rule + scope: the same condition is one alert until it resolves.")
    rule: str
    scope: str
    severity: Literal["info", "warning", "high", "critical"]
    state: Literal["firing", "acknowledged", "escalated", "silenced", "resolved"]
    domain: str = Field(description="`cyber`, `env`, `water`, `dossier`, `platform` or `anomaly`.")
    audience: list[Literal["operator", "security", "commune"]]
    commune_code: str | None
    message_vi: str
    message_en: str
    started_at: str
    updated_at: str
    acknowledged_by: str | None = None
    triggered_by: list[str] = []
    labels: dict[str, str] | None = None
    explanation: dict[str, Any] | None = Field(
        None,
        description="An anomaly alert's evidence (docs/anomaly.md): detector, quantity, observed, expected_low, "
        "expected_high, window_from, window_to, method.",
    )


class AlertEventModel(BaseModel):
    """One lifecycle event of an alert: the ``ioc.alerts`` payload and one row of the audit trail."""

    schema_: str = Field(alias="schema", description="`ioc.alert.v1`.")
    alert_id: str
    fingerprint: str
    rule: str
    scope: str
    severity: Literal["info", "warning", "high", "critical"]
    state: Literal["firing", "acknowledged", "escalated", "silenced", "resolved"]
    domain: str
    audience: list[Literal["operator", "security", "commune"]]
    commune_code: str | None = None
    message_vi: str
    message_en: str
    at: str
    by: str = Field(description='"system" for the engine, else the token subject of who did it.')
    reason: str | None = None
    triggered_by: list[str] = []
    value: float | None = None
    extra: dict[str, Any] | None = None
    notify: bool = True
    group: str | None = None
    repeat: int = 0
    labels: dict[str, str] | None = None


class AlertList(BaseModel):
    items: list[AlertModel]
    count: int


class AlertDetail(BaseModel):
    alert: AlertModel
    events: list[AlertEventModel] = Field(description="The audit trail, oldest first.")


class AlertActionResult(BaseModel):
    alert: AlertModel = Field(description="The alert after the step.")
    event: AlertEventModel = Field(description="The event recorded and published on `ioc.alerts`.")


class AlertAction(BaseModel):
    """The body of an acknowledgement or resolution (optional)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "Đã cử đội ứng trực"}]})

    reason: StoredText | None = Field(None, max_length=1000, description="Why; kept in the audit trail.")


class SilenceRequest(BaseModel):
    """A new silence: mute notifications of matching alerts for a while (their state keeps running)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "matchers": {"rule": "env.*", "scope": "commune:17935"},
                    "duration": "2h",
                    "reason": "Bảo trì trạm quan trắc Nam Đàn",
                }
            ]
        },
    )

    matchers: dict[StoredText, StoredText | list[StoredText]] = Field(
        description="Label → glob or list of globs, all must match: `rule`, `scope`, `severity`, `domain`, "
        "`commune_code`, `state`, `kpi`, `window`, `station`, `incident`, `category`, `system`, `agency_code`."
    )
    starts_at: dt.datetime | None = Field(None, description="Default now; without an offset it is local time.")
    ends_at: dt.datetime | None = Field(None, description="Give `ends_at` or `duration`, not both.")
    duration: str | None = Field(None, description="`15m`, `2h`, `1h30m`, `1d`; at most 31 days.")
    reason: StoredText = Field(min_length=1, max_length=1000)


class SilenceModel(BaseModel):
    id: str = Field(description="Derived from the content: the same request twice is one silence.")
    matchers: dict[str, list[str]]
    starts_at: str
    ends_at: str
    created_by: str
    reason: str
    expired_by: str | None = None
    expired_at: str | None = None
    status: Literal["pending", "active", "expired", "ended"]


class SilenceList(BaseModel):
    items: list[SilenceModel]
    count: int


ALERT_EXAMPLE: Final[dict[str, Any]] = {
    "alert_id": "9f2c4e1a7b3d5c60",
    "fingerprint": "4b1e0c2d9a8f7e61",
    "rule": "water.alarm_2",
    "scope": "station:WL-NAMDAN",
    "severity": "high",
    "state": "firing",
    "domain": "water",
    "audience": ["operator", "commune"],
    "commune_code": "17935",
    "message_vi": "Trạm thủy văn Nam Đàn: mực nước 7,1 m, vượt báo động II",
    "message_en": "Nam Dan gauge: water level 7.1 m, above alarm level II",
    "started_at": "2026-11-22T08:15:00+07:00",
    "updated_at": "2026-11-22T08:15:00+07:00",
    "acknowledged_by": None,
    "triggered_by": ["station:WL-NAMDAN"],
    "labels": {"kpi": "water.level_m", "window": "now", "station": "WL-NAMDAN"},
}
ALERT_EVENT_EXAMPLE: Final[dict[str, Any]] = {
    "schema": "ioc.alert.v1",
    **{k: v for k, v in ALERT_EXAMPLE.items() if k not in ("started_at", "updated_at", "acknowledged_by")},
    "at": "2026-11-22T08:15:00+07:00",
    "by": "system",
    "reason": None,
    "value": 7.1,
    "extra": None,
    "notify": True,
    "group": None,
    "repeat": 0,
}
ACKED_EXAMPLE: Final[dict[str, Any]] = {
    **ALERT_EXAMPLE,
    "state": "acknowledged",
    "updated_at": "2026-11-22T08:21:40+07:00",
    "acknowledged_by": "commune:17935",
}
ACK_EVENT_EXAMPLE: Final[dict[str, Any]] = {
    **ALERT_EVENT_EXAMPLE,
    "state": "acknowledged",
    "at": "2026-11-22T08:21:40+07:00",
    "by": "commune:17935",
    "reason": "Đã cử đội ứng trực",
    "value": None,
    "notify": False,
}
ALERT_LIST_EXAMPLE: Final = {"items": [ALERT_EXAMPLE], "count": 1}
ALERT_DETAIL_EXAMPLE: Final = {"alert": ACKED_EXAMPLE, "events": [ALERT_EVENT_EXAMPLE, ACK_EVENT_EXAMPLE]}
ALERT_ACTION_EXAMPLE: Final = {"alert": ACKED_EXAMPLE, "event": ACK_EVENT_EXAMPLE}
SILENCE_EXAMPLE: Final[dict[str, Any]] = {
    "id": "sil-3f9a2b7c1d0e",
    "matchers": {"rule": ["env.*"], "scope": ["commune:17935"]},
    "starts_at": "2026-11-22T08:30:00+07:00",
    "ends_at": "2026-11-22T10:30:00+07:00",
    "created_by": "operator",
    "reason": "Bảo trì trạm quan trắc Nam Đàn",
    "expired_by": None,
    "expired_at": None,
    "status": "active",
}
SILENCE_LIST_EXAMPLE: Final = {"items": [SILENCE_EXAMPLE], "count": 1}
EXPIRED_SILENCE_EXAMPLE: Final = {
    **SILENCE_EXAMPLE,
    "expired_by": "operator",
    "expired_at": "2026-11-22T09:05:12+07:00",
    "status": "expired",
}


READY_EXAMPLE: Final = {
    "status": "ready",
    "database": "ok",
    "broker": "ok",
    "feed": {
        "loaded": True,
        "consuming": True,
        "records": 1532,
        "invalid": 0,
        "kpis": 8210,
        "last_record_at": "2026-11-22T01:15:02.114000+00:00",
    },
    "clients": 12,
}
NOT_READY_EXAMPLE: Final = {**READY_EXAMPLE, "status": "not ready", "broker": "unreachable"}

HISTORY_EXAMPLE: Final = {
    "kpi": "env.aqi",
    "scope": "province",
    "window": "now",
    "from": "2026-11-22T05:00:00+07:00",
    "to": "2026-11-22T08:00:00+07:00",
    "bucket": "1h",
    "storage": "timescaledb",
    "points": [
        {
            "t": "2026-11-22T05:00:00+07:00",
            "value": 72.0,
            "min": 61.0,
            "max": 80.0,
            "avg": 70.4,
            "numerator": None,
            "denominator": None,
            "status": None,
            "as_of": "2026-11-22T05:59:00+07:00",
            "seq": 4711,
            "samples": 60,
        }
    ],
}
UNITS_EXAMPLE: Final = {"items": [{"code": "16681", "name": "Phường Thành Vinh", "kind": "phuong"}], "count": 1}
STATIONS_EXAMPLE: Final = {
    "items": [
        {
            "station_id": "WL-NAMDAN",
            "name": "Trạm thủy văn Nam Đàn",
            "kind": "water",
            "commune_code": "17935",
            "lat": 18.697,
            "lon": 105.5,
            "interval_s": 600,
            "river": "Cả",
            "bd1_m": 5.4,
            "bd2_m": 6.9,
            "bd3_m": 7.9,
        }
    ],
    "count": 1,
}
METRICS_EXAMPLE: Final = """\
# HELP ioc_ws_clients Connected WebSocket clients, by role
# TYPE ioc_ws_clients gauge
ioc_ws_clients{role="operator"} 3.0
# HELP ioc_ws_refused_total WebSocket connections or subscriptions refused, by reason
# TYPE ioc_ws_refused_total counter
ioc_ws_refused_total{reason="forbidden"} 2.0
"""

ERROR_EXAMPLES: Final[dict[int, tuple[str, Any]]] = {
    400: (
        "The query cannot be answered as asked; the message says how to fix it.",
        {"detail": "bucket '5 minutes' is not understood: use whole minutes, hours or days, e.g. 5m, 1h, 1d"},
    ),
    401: (
        "No bearer token, or one that is malformed, expired, or signed with an unknown key.",
        {"detail": "token expired"},
    ),
    403: (
        "The token is valid but the data is outside its role or commune.",
        {"detail": "scope 'commune:16690' is outside your rights"},
    ),
    404: ("No such path.", {"detail": "Not Found"}),
    409: (
        "The alert's lifecycle does not allow this step from its current state.",
        {"detail": "cannot acknowledge alert 9f2c4e1a7b3d5c60: acknowledged → acknowledged is not allowed"},
    ),
    422: (
        "A parameter FastAPI could not read as declared (the generic shape; these routes take strings).",
        {
            "detail": [
                {"type": "string_type", "loc": ["query", "scope"], "msg": "Input should be a valid string", "input": 5}
            ]
        },
    ),
    503: ("The database is not connected or unreachable; retry later.", {"detail": "the database is unreachable"}),
}


def ok(model: type[BaseModel], example: Any, description: str = "Success.") -> dict[int | str, dict[str, Any]]:
    """The documented 200 answer of a route: its model and an example."""
    return {200: {"model": model, "description": description, "content": {"application/json": {"example": example}}}}


def errors(*codes: int, **specific: tuple[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route, each with its body model and an example;
    ``specific={"e404": (description, example)}`` replaces the generic text of a code."""
    documented: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        description, example = specific.get(f"e{code}", ERROR_EXAMPLES[code])
        documented[code] = {
            "model": ValidationErrorBody if code == 422 else ErrorBody,
            "description": description,
            "content": {"application/json": {"example": example}},
        }
    return documented
