"""The OpenAPI document and ``GET /metrics``: complete, with examples, and true to the responses."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from starlette.websockets import WebSocketDisconnect

from api import schemas
from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster, frame_type
from api.context import ApiContext
from ioc.settings import Settings
from ioc.snapshot import Snapshot

PUBLIC = {"/healthz", "/readyz", "/metrics"}
#: Routes that check a scope or a role against the caller's rights (the registries are readable by every role;
#: an alert or silence outside them is a 404, as if it did not exist).
SCOPED = {
    ("/api/kpis", "get"),
    ("/api/kpis/history", "get"),
    ("/api/alerts", "get"),
    ("/api/alerts/{alert_id}/ack", "post"),
    ("/api/alerts/{alert_id}/resolve", "post"),
    ("/api/silences", "post"),
    ("/api/silences/{silence_id}", "delete"),
    ("/api/reports", "get"),
    ("/api/reports/{period}", "get"),
    ("/api/ingest/{topic}", "post"),
    ("/api/ingest/siem/wazuh", "post"),
}
ALERT_ROUTES = {"/api/alerts", "/api/alerts/{alert_id}", "/api/alerts/{alert_id}/ack", "/api/alerts/{alert_id}/resolve",
                "/api/silences", "/api/silences/{silence_id}"}  # fmt: skip


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(kafka_bootstrap="127.0.0.1:1", database_url="postgresql://nobody@127.0.0.1:1/none")


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    document: dict[str, Any] = client.get("/openapi.json").json()
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def test_every_route_is_documented_with_a_tag_and_a_description(spec: dict[str, Any]) -> None:
    assert {p for p, _, _ in operations(spec)} == PUBLIC | {p for p, _ in SCOPED} | ALERT_ROUTES | {
        "/api/units",
        "/api/stations",
    }
    declared = {t["name"] for t in spec["tags"]}
    for path, _, op in operations(spec):
        assert op.get("tags") and set(op["tags"]) <= declared, path
        assert op.get("description"), path


def test_every_200_response_has_an_example(spec: dict[str, Any]) -> None:
    for path, _, op in operations(spec):
        content = op["responses"]["200"]["content"]
        assert content and all("example" in media for media in content.values()), path


def test_protected_routes_document_401_and_scoped_ones_403(spec: dict[str, Any]) -> None:
    for path, method, op in operations(spec):
        if path in PUBLIC:
            assert "security" not in op and "401" not in op["responses"], path
            continue
        assert op["security"] == [{"HTTPBearer": []}], path
        assert "401" in op["responses"], path
        assert ("403" in op["responses"]) is ((path, method) in SCOPED), (path, method)
        for code, response in op["responses"].items():
            if int(code) >= 400:
                assert response["content"]["application/json"]["example"]["detail"], (path, code)


def test_kpi_example_is_the_contract_snapshot(spec: dict[str, Any]) -> None:
    example = spec["paths"]["/api/kpis"]["get"]["responses"]["200"]["content"]["application/json"]["example"]
    assert example["items"] == [schemas.KPI_SNAPSHOT_EXAMPLE]
    assert schemas.KPI_SNAPSHOT_EXAMPLE["scope"] == "commune:16681" and schemas.KPI_SNAPSHOT_EXAMPLE["seq"] == 123456


@pytest.mark.parametrize(
    ("model", "example"),
    [
        (schemas.KpiList, {"items": [schemas.KPI_SNAPSHOT_EXAMPLE], "count": 1}),
        (schemas.KpiHistory, schemas.HISTORY_EXAMPLE),
        (schemas.UnitList, schemas.UNITS_EXAMPLE),
        (schemas.StationList, schemas.STATIONS_EXAMPLE),
        (schemas.Readiness, schemas.READY_EXAMPLE),
        (schemas.Readiness, schemas.NOT_READY_EXAMPLE),
        *[
            (schemas.ValidationErrorBody if code == 422 else schemas.ErrorBody, example)
            for code, (_, example) in schemas.ERROR_EXAMPLES.items()
        ],
    ],
)
def test_examples_match_their_models(model: type[BaseModel], example: Any) -> None:
    model.model_validate(example)


def test_real_responses_match_the_documented_models(client: TestClient, app: FastAPI, settings: Settings) -> None:
    ctx: ApiContext = app.state.ioc
    assert client.portal is not None
    client.portal.call(
        ctx.live.apply_snapshot,
        Snapshot(
            kpi="env.aqi",
            scope="province",
            window="now",
            value=72.0,
            unit="",
            numerator=None,
            denominator=None,
            target=None,
            status=None,
            as_of=dt.datetime(2026, 11, 22, 8, tzinfo=dt.timezone(dt.timedelta(hours=7))),
            seq=1,
            extra={"band": "moderate"},
        ),
    )
    headers = {"Authorization": f"Bearer {create_token(settings, 'operator')}"}
    schemas.KpiList.model_validate(client.get("/api/kpis", headers=headers).json())
    schemas.UnitList.model_validate(client.get("/api/units", headers=headers).json())
    schemas.StationList.model_validate(client.get("/api/stations", headers=headers).json())
    schemas.Readiness.model_validate(client.get("/readyz").json())
    schemas.Health.model_validate(client.get("/healthz").json())
    for path in ("/api/kpis", "/nowhere"):
        schemas.ErrorBody.model_validate(client.get(path).json())


# --- /metrics ------------------------------------------------------------------------------------


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_need_no_token_and_count_http_requests_by_route_template(client: TestClient) -> None:
    client.get("/healthz")
    client.get("/api/kpis")
    client.get("/api/kpis/history?kpi=x")
    client.get("/no/such/path/123")
    got = samples(client)
    assert got[("ioc_http_requests_total", (("route", "/healthz"), ("status", "200")))] == 1
    assert got[("ioc_http_requests_total", (("route", "/api/kpis"), ("status", "401")))] == 1
    assert got[("ioc_http_requests_total", (("route", "/api/kpis/history"), ("status", "401")))] == 1
    assert got[("ioc_http_requests_total", (("route", "unmatched"), ("status", "404")))] == 1


def test_metrics_count_websocket_clients_messages_and_refusals(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    commune = create_token(settings, "commune", commune="16681")
    with client.websocket_connect("/ws", subprotocols=["bearer", commune]) as ws:
        ws.receive_json()
        ws.send_json({"type": "subscribe", "channels": ["kpi:province", "kpi:commune:16681"]})
        ws.receive_json()
        ws.receive_json()
        assert samples(client)[("ioc_ws_clients", (("role", "commune"),))] == 1
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "auth", "token": "nope"})
        ws.receive_json()
    with (
        pytest.raises(WebSocketDisconnect),
        client.websocket_connect("/ws", headers={"origin": "https://evil.example"}),
    ):
        pass
    got = samples(client)
    refused = {labels[0][1]: v for (name, labels), v in got.items() if name == "ioc_ws_refused_total"}
    assert refused == {"forbidden": 1, "auth": 1, "origin": 1}
    messages = {labels[0][1]: v for (name, labels), v in got.items() if name == "ioc_ws_messages_total"}
    assert messages == {"auth_ok": 1, "error": 2, "snapshot": 1}
    assert got[("ioc_ws_clients", (("role", "commune"),))] == 0


def test_metrics_count_feed_updates_by_contract_topic(app: FastAPI, client: TestClient) -> None:
    ctx: ApiContext = app.state.ioc
    ctx.feed.handle(ctx.feed.alerts_topic, b'{"id": "a1", "state": "fired"}')
    ctx.feed.handle(ctx.feed.alerts_topic, b"[1]")
    got = samples(client)
    assert got[("ioc_feed_updates_total", (("topic", "ioc.alerts"),))] == 1


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ('{"type":"update","seq":1}', "update"),
        ('{"type":"resumed"}', "resumed"),
        ("[1]", "other"),
        ('{"type":"', "other"),
    ],
)
def test_frame_type_is_read_without_parsing(text: str, kind: str) -> None:
    assert frame_type(text) == kind
