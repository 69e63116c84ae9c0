"""The alert and silence routes through TestClient, on the in-memory store: rights, isolation, lifecycle, audit."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alerts.engine import alert_id_for, silence_id
from alerts.model import AlertEvent, AlertState, Audience, Severity, fingerprint
from api import schemas
from api.alert_store import CollectingPublisher, MemoryAlertStore
from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster
from api.context import ApiContext
from ioc.settings import Settings

VN = dt.timezone(dt.timedelta(hours=7))
NOW = dt.datetime(2026, 11, 22, 9, 0, tzinfo=VN)
COMMUNE = "16681"
OTHER = "16690"
NAM_DAN = "17935"  # the commune of station WL-NAMDAN


def fired(
    rule: str,
    scope: str,
    *,
    domain: str,
    minutes_ago: int,
    severity: Severity = Severity.HIGH,
    commune: str | None = None,
    audience: tuple[Audience, ...] = (Audience.OPERATOR,),
) -> AlertEvent:
    at = NOW - dt.timedelta(minutes=minutes_ago)
    fp = fingerprint(rule, scope)
    return AlertEvent(
        alert_id=alert_id_for(fp, at),
        fingerprint=fp,
        rule=rule,
        scope=scope,
        severity=severity,
        state=AlertState.FIRING,
        domain=domain,
        audience=audience,
        commune_code=commune,
        message_vi=f"{rule} tại {scope}",
        message_en=f"{rule} at {scope}",
        at=at,
        labels={"kpi": rule},
    )


FLOOD = fired("water.alarm_2", "station:WL-NAMDAN", domain="water", minutes_ago=10, commune=NAM_DAN,
              audience=(Audience.OPERATOR, Audience.COMMUNE))  # fmt: skip
AQI_OWN = fired("env.aqi_bad", f"commune:{COMMUNE}", domain="env", minutes_ago=20, severity=Severity.WARNING,
                commune=COMMUNE, audience=(Audience.OPERATOR, Audience.COMMUNE))  # fmt: skip
AQI_OTHER = fired("env.aqi_bad", f"commune:{OTHER}", domain="env", minutes_ago=30, severity=Severity.WARNING,
                  commune=OTHER, audience=(Audience.OPERATOR, Audience.COMMUNE))  # fmt: skip
CYBER = fired("cyber.incident_critical", "agency:STTTT", domain="cyber", minutes_ago=40, severity=Severity.CRITICAL,
              audience=(Audience.SECURITY, Audience.OPERATOR))  # fmt: skip
# Not cyber, but addressed to security too: visible to security, not theirs to act on.
PLATFORM = fired("platform.deadletter_rate", "province", domain="platform", minutes_ago=50,
                 audience=(Audience.OPERATOR, Audience.SECURITY))  # fmt: skip
OLD = fired("dossier.overdue_rising", "province", domain="dossier", minutes_ago=600, severity=Severity.INFO)
ALL = (FLOOD, AQI_OWN, AQI_OTHER, CYBER, PLATFORM, OLD)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://nobody@127.0.0.1:1/none")


@pytest.fixture
def store() -> MemoryAlertStore:
    s = MemoryAlertStore()
    for event in ALL:
        s.put(event)
    s.put(AlertEvent(**{**_fields(OLD), "state": AlertState.RESOLVED, "at": NOW - dt.timedelta(minutes=500)}))
    return s


def _fields(event: AlertEvent) -> dict[str, Any]:
    return {f: getattr(event, f) for f in event.__struct_fields__}


@pytest.fixture
def publisher() -> CollectingPublisher:
    return CollectingPublisher()


@pytest.fixture
def app(settings: Settings, store: MemoryAlertStore, publisher: CollectingPublisher) -> FastAPI:
    return create_app(
        settings,
        connect=False,
        broadcaster=Broadcaster(seq_origin=0),
        alert_store=store,
        alert_publisher=publisher,
        clock=lambda: NOW,
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def bearer(settings: Settings, role: str = "operator", commune: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(settings, role, commune=commune)}"}


def ids(body: dict[str, Any]) -> list[str]:
    return [a["alert_id"] for a in body["items"]]


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/alerts"),
        ("GET", f"/api/alerts/{FLOOD.alert_id}"),
        ("POST", f"/api/alerts/{FLOOD.alert_id}/ack"),
        ("POST", f"/api/alerts/{FLOOD.alert_id}/resolve"),
        ("GET", "/api/silences"),
        ("POST", "/api/silences"),
        ("DELETE", "/api/silences/sil-000000000000"),
    ],
)
def test_alert_routes_without_a_token_are_401(client: TestClient, publisher: CollectingPublisher, method: str,
                                              path: str) -> None:  # fmt: skip
    response = client.request(method, path, json={"reason": "x"} if method == "POST" else None)
    assert response.status_code == 401
    assert publisher.events == []


# --- listing and reading ------------------------------------------------------------------------


def test_operator_lists_every_alert_newest_first(client: TestClient, settings: Settings) -> None:
    body = client.get("/api/alerts", headers=bearer(settings)).json()
    assert ids(body) == [e.alert_id for e in ALL]
    assert body["count"] == 6
    schemas.AlertList.model_validate(body)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("state=active", [FLOOD, AQI_OWN, AQI_OTHER, CYBER, PLATFORM]),
        ("state=resolved", [OLD]),
        ("severity=warning", [AQI_OWN, AQI_OTHER]),
        ("severity=critical,info", [CYBER, OLD]),
        ("domain=cyber", [CYBER]),
        (f"scope=commune:{OTHER}", [AQI_OTHER]),
        ("state=active&domain=env&limit=1", [AQI_OWN]),
    ],
)
def test_alert_list_filters(client: TestClient, settings: Settings, query: str, expected: list[AlertEvent]) -> None:
    body = client.get(f"/api/alerts?{query}", headers=bearer(settings)).json()
    assert ids(body) == [e.alert_id for e in expected]


@pytest.mark.parametrize("query", ["state=fired", "severity=urgent"])
def test_unknown_filter_values_are_400_with_the_valid_ones(client: TestClient, settings: Settings, query: str) -> None:
    response = client.get(f"/api/alerts?{query}", headers=bearer(settings))
    assert response.status_code == 400
    assert "use" in response.json()["detail"]


def test_security_lists_cyber_alerts_and_those_addressed_to_it(client: TestClient, settings: Settings) -> None:
    body = client.get("/api/alerts", headers=bearer(settings, "security")).json()
    assert ids(body) == [CYBER.alert_id, PLATFORM.alert_id]


def test_commune_lists_only_its_own_alerts_including_its_stations(client: TestClient, settings: Settings) -> None:
    assert ids(client.get("/api/alerts", headers=bearer(settings, "commune", COMMUNE)).json()) == [AQI_OWN.alert_id]
    assert ids(client.get("/api/alerts", headers=bearer(settings, "commune", NAM_DAN)).json()) == [FLOOD.alert_id]
    own_station = client.get("/api/alerts?scope=station:WL-NAMDAN", headers=bearer(settings, "commune", NAM_DAN))
    assert ids(own_station.json()) == [FLOOD.alert_id]


@pytest.mark.parametrize("scope", [f"commune:{OTHER}", "province", "station:WL-NAMDAN"])
def test_commune_naming_a_scope_outside_its_commune_is_403(client: TestClient, settings: Settings, scope: str) -> None:
    response = client.get(f"/api/alerts?scope={scope}", headers=bearer(settings, "commune", COMMUNE))
    assert response.status_code == 403
    assert scope in response.json()["detail"]


def test_alert_detail_carries_its_audit_trail(client: TestClient, settings: Settings) -> None:
    body = client.get(f"/api/alerts/{OLD.alert_id}", headers=bearer(settings)).json()
    schemas.AlertDetail.model_validate(body)
    assert body["alert"]["state"] == "resolved"
    assert [(e["state"], e["by"]) for e in body["events"]] == [("firing", "system"), ("resolved", "system")]


@pytest.mark.parametrize(
    ("role", "commune", "alert"),
    [
        ("commune", COMMUNE, AQI_OTHER),
        ("commune", COMMUNE, FLOOD),
        ("commune", COMMUNE, CYBER),
        ("security", None, AQI_OWN),
        ("operator", None, None),
    ],
)
def test_an_alert_outside_the_callers_rights_is_404_like_a_missing_one(
    client: TestClient, settings: Settings, role: str, commune: str | None, alert: AlertEvent | None
) -> None:
    alert_id = alert.alert_id if alert else "0000000000000000"
    response = client.get(f"/api/alerts/{alert_id}", headers=bearer(settings, role, commune))
    assert response.status_code == 404
    assert response.json() == {"detail": f"no alert {alert_id!r}"}


# --- acknowledge and resolve ----------------------------------------------------------------------


def test_operator_acknowledges_and_the_step_is_audited_and_published(
    client: TestClient, settings: Settings, store: MemoryAlertStore, publisher: CollectingPublisher
) -> None:
    response = client.post(
        f"/api/alerts/{FLOOD.alert_id}/ack", json={"reason": " Đã cử đội ứng trực "}, headers=bearer(settings)
    )
    assert response.status_code == 200
    body = response.json()
    schemas.AlertActionResult.model_validate(body)
    assert body["alert"]["state"] == "acknowledged" and body["alert"]["acknowledged_by"] == "operator"
    assert body["event"]["by"] == "operator" and body["event"]["reason"] == "Đã cử đội ứng trực"
    (event,) = publisher.events
    assert (event.alert_id, event.state, event.by, event.at) == (
        FLOOD.alert_id,
        AlertState.ACKNOWLEDGED,
        "operator",
        NOW,
    )
    trail = client.get(f"/api/alerts/{FLOOD.alert_id}", headers=bearer(settings)).json()["events"]
    assert [(e["state"], e["by"], e["at"]) for e in trail] == [
        ("firing", "system", FLOOD.at.isoformat()),
        ("acknowledged", "operator", NOW.isoformat()),
    ]
    assert store.current[FLOOD.alert_id].state is AlertState.ACKNOWLEDGED


def test_acknowledging_twice_is_409_and_records_nothing(
    client: TestClient, settings: Settings, store: MemoryAlertStore, publisher: CollectingPublisher
) -> None:
    assert client.post(f"/api/alerts/{FLOOD.alert_id}/ack", headers=bearer(settings)).status_code == 200
    response = client.post(f"/api/alerts/{FLOOD.alert_id}/ack", headers=bearer(settings))
    assert response.status_code == 409
    assert "acknowledged → acknowledged is not allowed" in response.json()["detail"]
    assert len(publisher.events) == 1 and len(store.trail[FLOOD.alert_id]) == 2


def test_resolve_after_acknowledge_then_nothing_more(
    client: TestClient, settings: Settings, publisher: CollectingPublisher
) -> None:
    h = bearer(settings)
    assert client.post(f"/api/alerts/{CYBER.alert_id}/ack", headers=h).status_code == 200
    resolved = client.post(f"/api/alerts/{CYBER.alert_id}/resolve", json={"reason": "contained"}, headers=h)
    assert resolved.status_code == 200 and resolved.json()["alert"]["state"] == "resolved"
    for step in ("ack", "resolve"):
        response = client.post(f"/api/alerts/{CYBER.alert_id}/{step}", headers=h)
        assert response.status_code == 409, step
    assert [e.state for e in publisher.events] == [AlertState.ACKNOWLEDGED, AlertState.RESOLVED]
    assert publisher.events[1].notify is True and publisher.events[0].notify is False


def test_an_already_resolved_alert_cannot_be_acknowledged(client: TestClient, settings: Settings) -> None:
    response = client.post(f"/api/alerts/{OLD.alert_id}/ack", headers=bearer(settings, "admin"))
    assert response.status_code == 409
    assert response.json()["detail"].startswith(f"cannot acknowledge alert {OLD.alert_id}")


def test_commune_acknowledges_an_alert_of_its_own_station(
    client: TestClient, settings: Settings, publisher: CollectingPublisher
) -> None:
    token = create_token(settings, "commune", commune=NAM_DAN)
    response = client.post(f"/api/alerts/{FLOOD.alert_id}/ack", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert publisher.events[0].by == f"commune:{NAM_DAN}"


@pytest.mark.parametrize("step", ["ack", "resolve"])
@pytest.mark.parametrize("alert", [AQI_OTHER, FLOOD, CYBER, PLATFORM])
def test_commune_never_acts_on_another_communes_alert(
    client: TestClient,
    settings: Settings,
    store: MemoryAlertStore,
    publisher: CollectingPublisher,
    alert: AlertEvent,
    step: str,
) -> None:
    response = client.post(f"/api/alerts/{alert.alert_id}/{step}", headers=bearer(settings, "commune", COMMUNE))
    assert response.status_code == 404
    assert publisher.events == [] and len(store.trail[alert.alert_id]) == 1


def test_security_acts_on_cyber_alerts_only(
    client: TestClient, settings: Settings, publisher: CollectingPublisher
) -> None:
    h = bearer(settings, "security")
    assert client.post(f"/api/alerts/{CYBER.alert_id}/ack", headers=h).status_code == 200
    visible_not_cyber = client.post(f"/api/alerts/{PLATFORM.alert_id}/ack", headers=h)
    assert visible_not_cyber.status_code == 403
    assert "cyber" in visible_not_cyber.json()["detail"]
    assert client.post(f"/api/alerts/{FLOOD.alert_id}/resolve", headers=h).status_code == 404
    assert [e.alert_id for e in publisher.events] == [CYBER.alert_id]


def test_a_publish_failure_records_nothing_and_is_503(
    client: TestClient, settings: Settings, store: MemoryAlertStore, publisher: CollectingPublisher
) -> None:
    publisher.fail = TimeoutError()
    response = client.post(f"/api/alerts/{FLOOD.alert_id}/ack", headers=bearer(settings))
    assert response.status_code == 503 and "nothing was recorded" in response.json()["detail"]
    assert store.current[FLOOD.alert_id].state is AlertState.FIRING and len(store.trail[FLOOD.alert_id]) == 1


def test_an_unknown_body_field_is_422(client: TestClient, settings: Settings) -> None:
    response = client.post(f"/api/alerts/{FLOOD.alert_id}/ack", json={"why": "x"}, headers=bearer(settings))
    assert response.status_code == 422


def test_without_a_database_the_alert_routes_are_503(settings: Settings) -> None:
    app = create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0))
    with TestClient(app) as client:
        for method, path in (("GET", "/api/alerts"), ("POST", f"/api/alerts/{FLOOD.alert_id}/ack"),
                             ("GET", "/api/silences")):  # fmt: skip
            assert client.request(method, path, headers=bearer(settings)).status_code == 503, path


# --- silences --------------------------------------------------------------------------------------

ENV_IN_NAM_DAN = {"matchers": {"rule": "env.*", "scope": f"commune:{NAM_DAN}"}, "duration": "2h", "reason": "bảo trì"}
CYBER_ONLY = {"matchers": {"domain": "cyber", "category": ["ddos", "brute_force"]}, "duration": "30m",
              "reason": "diễn tập"}  # fmt: skip


def test_operator_creates_a_silence_whose_id_is_derived_from_its_content(
    client: TestClient, settings: Settings, store: MemoryAlertStore
) -> None:
    response = client.post("/api/silences", json=ENV_IN_NAM_DAN, headers=bearer(settings))
    assert response.status_code == 201
    body = response.json()
    schemas.SilenceModel.model_validate(body)
    expected = silence_id(ENV_IN_NAM_DAN["matchers"], NOW, NOW + dt.timedelta(hours=2), "operator", "bảo trì")
    assert body["id"] == expected and body["status"] == "active" and body["created_by"] == "operator"
    assert body["matchers"] == {"rule": ["env.*"], "scope": [f"commune:{NAM_DAN}"]}
    assert body["ends_at"] == (NOW + dt.timedelta(hours=2)).isoformat()
    again = client.post("/api/silences", json=ENV_IN_NAM_DAN, headers=bearer(settings))
    assert again.status_code == 200 and again.json()["id"] == expected
    assert list(store.silence_rows) == [expected]


def test_a_silence_with_local_times_and_a_future_start_is_pending(client: TestClient, settings: Settings) -> None:
    body = {**ENV_IN_NAM_DAN, "duration": None, "starts_at": "2026-11-22T10:00:00", "ends_at": "2026-11-22T12:00"}
    response = client.post("/api/silences", json=body, headers=bearer(settings))
    assert response.status_code == 201, response.text
    assert response.json()["starts_at"] == "2026-11-22T10:00:00+07:00" and response.json()["status"] == "pending"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matchers": {"colour": "red"}}, "unknown label 'colour'"),
        ({"matchers": {}}, "non-empty"),
        ({"matchers": {"rule": []}}, "non-empty list"),
        ({"ends_at": "2026-11-22T12:00:00+07:00"}, "either ends_at or duration"),
        ({"duration": None}, "either ends_at or duration"),
        ({"duration": "2 hours"}, "not a duration"),
        ({"duration": "40d"}, "at most 31 days"),
        ({"duration": None, "ends_at": "2026-11-22T08:00:00+07:00"}, "end after it starts"),
        ({"duration": "1h", "starts_at": "2026-11-22T06:00:00+07:00"}, "already be over"),
        ({"reason": "   "}, "needs a reason"),
    ],
)
def test_a_silence_that_cannot_be_made_is_400_with_the_reason(
    client: TestClient, settings: Settings, change: dict[str, Any], message: str
) -> None:
    response = client.post("/api/silences", json={**ENV_IN_NAM_DAN, **change}, headers=bearer(settings))
    assert response.status_code == 400, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("body", [{"matchers": {"rule": "x"}, "duration": "1h"}, {**ENV_IN_NAM_DAN, "reason": ""},
                                  {**ENV_IN_NAM_DAN, "extra": 1}])  # fmt: skip
def test_a_malformed_silence_is_422(client: TestClient, settings: Settings, body: dict[str, Any]) -> None:
    assert client.post("/api/silences", json=body, headers=bearer(settings)).status_code == 422


def test_security_silences_only_with_domain_pinned_to_cyber(
    client: TestClient, settings: Settings, store: MemoryAlertStore
) -> None:
    h = bearer(settings, "security")
    refused = client.post("/api/silences", json=ENV_IN_NAM_DAN, headers=h)
    assert refused.status_code == 403 and '"domain": "cyber"' in refused.json()["detail"]
    glob = {**CYBER_ONLY, "matchers": {"domain": "cyb*"}}
    assert client.post("/api/silences", json=glob, headers=h).status_code == 403
    assert client.post("/api/silences", json=CYBER_ONLY, headers=h).status_code == 201
    assert [s.created_by for s in store.silence_rows.values()] == ["security"]


@pytest.mark.parametrize("body", [ENV_IN_NAM_DAN, {**ENV_IN_NAM_DAN, "matchers": {"scope": f"commune:{COMMUNE}"}}])
def test_commune_cannot_create_silences(
    client: TestClient, settings: Settings, store: MemoryAlertStore, body: dict[str, Any]
) -> None:
    response = client.post("/api/silences", json=body, headers=bearer(settings, "commune", COMMUNE))
    assert response.status_code == 403
    assert store.silence_rows == {}


def test_silence_list_is_filtered_by_role(client: TestClient, settings: Settings) -> None:
    own = {**ENV_IN_NAM_DAN, "matchers": {"scope": f"commune:{COMMUNE}"}}
    for body in (ENV_IN_NAM_DAN, CYBER_ONLY, own):
        assert client.post("/api/silences", json=body, headers=bearer(settings)).status_code == 201

    def listed(role: str, commune: str | None = None) -> list[dict[str, list[str]]]:
        body = client.get("/api/silences", headers=bearer(settings, role, commune)).json()
        schemas.SilenceList.model_validate(body)
        return [s["matchers"] for s in body["items"]]

    assert len(listed("operator")) == 3
    assert listed("security") == [{"domain": ["cyber"], "category": ["ddos", "brute_force"]}]
    assert listed("commune", COMMUNE) == [{"scope": [f"commune:{COMMUNE}"]}]
    assert listed("commune", OTHER) == []


def test_expiring_a_silence_keeps_who_and_when(client: TestClient, settings: Settings) -> None:
    created = client.post("/api/silences", json=ENV_IN_NAM_DAN, headers=bearer(settings)).json()
    response = client.delete(f"/api/silences/{created['id']}", headers=bearer(settings, "admin"))
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["expired_by"], body["expired_at"]) == ("expired", "admin", NOW.isoformat())
    again = client.delete(f"/api/silences/{created['id']}", headers=bearer(settings))
    assert again.status_code == 200 and again.json()["expired_by"] == "admin"
    listed = client.get("/api/silences", headers=bearer(settings)).json()["items"]
    assert [s["status"] for s in listed] == ["expired"]


def test_expiring_is_scoped_like_creating(client: TestClient, settings: Settings) -> None:
    env = client.post("/api/silences", json=ENV_IN_NAM_DAN, headers=bearer(settings)).json()["id"]
    cyber = client.post("/api/silences", json=CYBER_ONLY, headers=bearer(settings)).json()["id"]
    own = {**ENV_IN_NAM_DAN, "matchers": {"commune_code": COMMUNE}}
    commune_silence = client.post("/api/silences", json=own, headers=bearer(settings)).json()["id"]
    assert client.delete(f"/api/silences/{env}", headers=bearer(settings, "security")).status_code == 404
    assert client.delete(f"/api/silences/{cyber}", headers=bearer(settings, "security")).status_code == 200
    commune = bearer(settings, "commune", COMMUNE)
    assert client.delete(f"/api/silences/{commune_silence}", headers=commune).status_code == 403
    assert client.delete(f"/api/silences/{env}", headers=commune).status_code == 404
    assert client.delete("/api/silences/sil-000000000000", headers=bearer(settings)).status_code == 404


# --- the live channel -------------------------------------------------------------------------------


def test_alerts_channel_gives_a_commune_its_station_alerts(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    ctx: ApiContext = app.state.ioc
    assert client.portal is not None
    for event in (FLOOD, AQI_OTHER):
        client.portal.call(ctx.live.apply_alert, msgspec.to_builtins(event))
    token = create_token(settings, "commune", commune=NAM_DAN)
    with client.websocket_connect("/ws", subprotocols=["bearer", token]) as ws:
        assert ws.receive_json()["type"] == "auth_ok"
        ws.send_json({"type": "subscribe", "channels": ["alerts"]})
        snapshot = ws.receive_json()
        assert [a["alert_id"] for a in snapshot["items"]] == [FLOOD.alert_id]


@pytest.mark.parametrize(
    ("model", "example"),
    [
        (schemas.AlertList, schemas.ALERT_LIST_EXAMPLE),
        (schemas.AlertDetail, schemas.ALERT_DETAIL_EXAMPLE),
        (schemas.AlertActionResult, schemas.ALERT_ACTION_EXAMPLE),
        (schemas.SilenceList, schemas.SILENCE_LIST_EXAMPLE),
        (schemas.SilenceModel, schemas.EXPIRED_SILENCE_EXAMPLE),
    ],
)
def test_alert_examples_match_their_models(model: type[Any], example: Any) -> None:
    model.model_validate(example)


def test_wall_has_an_alert_ticker_that_acknowledges_with_the_token_in_the_header(client: TestClient) -> None:
    page = client.get("/wall").text
    assert 'id="alert-list"' in page and 'id="alert-count"' in page
    script = client.get("/static/wall.js").text
    assert '"alerts"' in script and 'case "alert":' in script
    assert '"/ack"' in script and 'Authorization: "Bearer " + state.token' in script
    assert "Xác nhận" in script and "Acknowledge" in script
