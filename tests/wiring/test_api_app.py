"""The HTTP and WebSocket edge through FastAPI's TestClient, without a broker or a database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster
from api.context import ApiContext
from api.ws.frames import WsLimits
from ioc.settings import Settings
from ioc.snapshot import Snapshot
from tests.factories import snap

COMMUNE = "16681"
OTHER = "16690"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        kafka_bootstrap="127.0.0.1:1",
        database_url="postgresql://nobody@127.0.0.1:1/none",
        allowed_origins=["https://wall.nghean.gov.vn"],
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(
        settings,
        connect=False,
        broadcaster=Broadcaster(seq_origin=0),
        ws_limits=WsLimits(rate_per_s=1, burst=5, max_frame_bytes=2048, auth_timeout_s=2),
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def ctx(app: FastAPI) -> ApiContext:
    context: ApiContext = app.state.ioc
    return context


def feed(client: TestClient, app: FastAPI, *snapshots: Snapshot) -> None:
    """Hand snapshots to the app on its own event loop, as the Kafka feed would."""
    assert client.portal is not None
    for s in snapshots:
        client.portal.call(ctx(app).live.apply_snapshot, s)


def bearer(settings: Settings, role: str = "operator", commune: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(settings, role, commune=commune)}"}


SAMPLE = (
    snap("dossier.received", "province"),
    snap("cyber.open", "province", "now"),
    snap("dossier.received", f"commune:{COMMUNE}"),
    snap("dossier.received", f"commune:{OTHER}"),
)


# --- HTTP ------------------------------------------------------------------------------------


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_not_ready_without_database_and_broker(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["broker"] == "unreachable"


@pytest.mark.parametrize("path", ["/api/kpis", "/api/kpis/history", "/api/units", "/api/stations"])
def test_api_without_token_is_401(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_api_with_expired_token_is_401(client: TestClient, settings: Settings) -> None:
    token = create_token(settings, "operator", ttl=dt.timedelta(hours=-1))
    response = client.get("/api/kpis", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_operator_sees_every_current_snapshot(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    body = client.get("/api/kpis", headers=bearer(settings)).json()
    assert body["count"] == 4
    assert body["items"][0]["as_of"] == "2026-11-22T08:15:00+07:00"


def test_kpis_are_filtered_by_query(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    body = client.get(
        "/api/kpis",
        params={"kpi": "dossier.received", "scope": "province"},
        headers=bearer(settings),
    ).json()
    assert [(i["kpi"], i["scope"]) for i in body["items"]] == [("dossier.received", "province")]


def test_commune_user_sees_only_its_commune(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    headers = bearer(settings, "commune", COMMUNE)
    items = client.get("/api/kpis", headers=headers).json()["items"]
    assert {i["scope"] for i in items} == {f"commune:{COMMUNE}"}
    assert client.get("/api/kpis", params={"scope": "province"}, headers=headers).status_code == 403
    assert client.get("/api/kpis", params={"scope": f"commune:{OTHER}"}, headers=headers).status_code == 403


def test_security_sees_only_province_cyber_kpis(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    items = client.get("/api/kpis", headers=bearer(settings, "security")).json()["items"]
    assert [(i["kpi"], i["scope"]) for i in items] == [("cyber.open", "province")]


def test_history_bad_input_is_400_with_a_message(client: TestClient, settings: Settings) -> None:
    response = client.get(
        "/api/kpis/history",
        params={"kpi": "env.aqi", "scope": "province", "window": "now", "bucket": "5 minutes"},
        headers=bearer(settings),
    )
    assert response.status_code == 400
    assert "bucket" in response.json()["detail"]


def test_history_outside_rights_is_403(client: TestClient, settings: Settings) -> None:
    response = client.get(
        "/api/kpis/history",
        params={"kpi": "env.aqi", "scope": "province", "window": "now"},
        headers=bearer(settings, "commune", COMMUNE),
    )
    assert response.status_code == 403


def test_registries(client: TestClient, settings: Settings) -> None:
    units = client.get("/api/units", headers=bearer(settings)).json()
    assert units["count"] >= 100 and {"code", "name", "kind"} <= units["items"][0].keys()
    stations = client.get("/api/stations", headers=bearer(settings)).json()
    assert stations["count"] > 0 and "bd3_m" in stations["items"][0]


def test_wall_page_and_static_files_need_no_token(client: TestClient) -> None:
    page = client.get("/wall")
    assert page.status_code == 200 and "/static/wall.js" in page.text
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/wall.js").status_code == 200
    assert client.get("/static/wall.css").status_code == 200


# --- WebSocket -------------------------------------------------------------------------------


def subprotocol_auth(settings: Settings, role: str = "operator", commune: str | None = None) -> list[str]:
    return ["bearer", create_token(settings, role, commune=commune)]


def until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = ws.receive_json()
        if message["type"] == kind:
            return message


def test_ws_subprotocol_auth_then_snapshot_then_update(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        assert ws.accepted_subprotocol == "bearer"
        assert ws.receive_json()["role"] == "operator"
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"]})
        snapshot = ws.receive_json()
        assert snapshot["type"] == "snapshot" and snapshot["channel"] == "kpi:province"
        assert {i["kpi"] for i in snapshot["items"]} == {"dossier.received", "cyber.open"}
        feed(client, app, snap("dossier.received", "province", value=7, seq=2))
        update = ws.receive_json()
        assert update["type"] == "update" and update["item"]["value"] == 7
        assert update["seq"] == snapshot["seq"] + 1


def test_ws_first_message_auth(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "auth", "token": create_token(settings, "commune", commune=COMMUNE)})
        ok = ws.receive_json()
        assert ok["type"] == "auth_ok" and ok["commune"] == COMMUNE


@pytest.mark.parametrize("token", ["not-a-token", None])
def test_ws_bad_token_is_closed_4401(client: TestClient, token: str | None) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "auth", "token": token})
        assert ws.receive_json()["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


def test_ws_expired_subprotocol_token_is_closed_4401(client: TestClient, settings: Settings) -> None:
    token = create_token(settings, "operator", ttl=dt.timedelta(hours=-1))
    with client.websocket_connect("/ws", subprotocols=["bearer", token]) as ws:
        assert "expired" in ws.receive_json()["message"]
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


def test_ws_foreign_origin_is_refused(client: TestClient, settings: Settings) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect(
            "/ws",
            subprotocols=subprotocol_auth(settings),
            headers={"origin": "https://evil.example"},
        ),
    ):
        pass
    assert refused.value.code == 4403


@pytest.mark.parametrize("origin", ["https://wall.nghean.gov.vn", "http://testserver"])
def test_ws_allowed_and_own_origin_are_accepted(client: TestClient, settings: Settings, origin: str) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings), headers={"origin": origin}) as ws:
        assert ws.receive_json()["type"] == "auth_ok"


def test_ws_forbidden_channel_is_refused_and_others_work(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings, "commune", COMMUNE)) as ws:
        until(ws, "auth_ok")
        ws.send_json(
            {
                "type": "subscribe",
                "channels": ["kpi:province", f"kpi:commune:{COMMUNE}", f"kpi:commune:{OTHER}"],
            }
        )
        assert ws.receive_json() == {
            "type": "error",
            "code": "forbidden",
            "message": "outside your rights",
            "channel": "kpi:province",
        }
        snapshot = ws.receive_json()
        assert snapshot["channel"] == f"kpi:commune:{COMMUNE}"
        assert [i["scope"] for i in snapshot["items"]] == [f"kpi:commune:{COMMUNE}"[4:]]
        assert ws.receive_json()["channel"] == f"kpi:commune:{OTHER}"
        feed(
            client,
            app,
            snap("dossier.received", f"commune:{OTHER}", seq=5),
            snap("dossier.received", f"commune:{COMMUNE}", value=3, seq=5),
        )
        update = ws.receive_json()
        assert update["channel"] == f"kpi:commune:{COMMUNE}" and update["item"]["value"] == 3


def test_ws_unknown_channel(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "subscribe", "channels": ["kpi:commune:99999"]})
        assert ws.receive_json()["code"] == "unknown_channel"


def test_ws_resume_replays_missed_updates(client: TestClient, app: FastAPI, settings: Settings) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"]})
        seen = until(ws, "snapshot")["seq"]
    feed(
        client,
        app,
        snap("dossier.received", "province", value=8, seq=2),
        snap("cyber.open", "province", "now", value=2, seq=2),
    )
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"], "resume": {"kpi:province": seen}})
        resumed = ws.receive_json()
        assert resumed["type"] == "resumed" and resumed["recovered"] is True and resumed["replayed"] == 2
        assert [ws.receive_json()["seq"] for _ in range(2)] == [seen + 1, seen + 2]


def test_ws_resume_from_an_unknown_position_sends_snapshot_not_recovered(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"], "resume": {"kpi:province": 10**15}})
        snapshot = ws.receive_json()
        assert snapshot["type"] == "snapshot" and snapshot["recovered"] is False and len(snapshot["items"]) == 2


def test_ws_client_ping_is_answered(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}


def test_ws_oversized_frame_closes_1009(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_text("x" * 4096)
        assert ws.receive_json()["code"] == "too_large"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1009


def test_ws_message_flood_closes_1008(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        for _ in range(20):
            ws.send_json({"type": "pong"})
        assert until(ws, "error")["code"] == "rate_limited"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1008


def test_ws_bad_json_is_an_error_not_a_disconnect(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=subprotocol_auth(settings)) as ws:
        until(ws, "auth_ok")
        ws.send_text("{nope")
        assert ws.receive_json()["code"] == "bad_request"
        ws.send_json({"type": "ping"})
        assert ws.receive_json()["type"] == "pong"
