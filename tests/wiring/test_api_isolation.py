"""Who sees what, who gets in, and what a slow client costs, through FastAPI's TestClient."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api.app import create_app
from api.auth import create_token, verify_token
from api.broadcaster import CLOSE_TOO_SLOW, Broadcaster
from api.context import ApiContext
from api.ws.connection import Connection
from api.ws.frames import WsLimits
from ioc.settings import Settings
from ioc.snapshot import Snapshot
from tests.factories import snap
from tests.fake_ws import FakeSocket
from tests.waiting import until as eventually

COMMUNE = "16681"
OTHER = "16690"
RETIRED_KEY = "retired-signing-key-" + "r" * 40


SAMPLE = (
    snap("dossier.received", "province"),
    snap("cyber.open", "province", "now"),
    snap("cyber.open", f"commune:{COMMUNE}", "now"),
    snap("dossier.received", f"commune:{COMMUNE}"),
    snap("dossier.received", f"commune:{OTHER}"),
    snap("env.aqi", f"station:AIR-{COMMUNE}", "now"),
    snap("env.aqi", f"station:AIR-{OTHER}", "now"),
    snap("dossier.received", "agency:000.01.70.H40"),
)
ALERTS = (
    {"id": "a1", "kpi": "water.alarm_level", "scope": f"commune:{OTHER}", "state": "fired"},
    {"id": "a2", "kpi": "water.alarm_level", "scope": f"commune:{COMMUNE}", "state": "fired"},
    {"id": "a3", "kpi": "cyber.open", "scope": "province", "domain": "cyber", "state": "fired"},
    {"id": "a4", "kpi": "env.aqi", "scope": "province", "state": "fired"},
)


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(
        kafka_bootstrap="127.0.0.1:1",
        database_url="postgresql://nobody@127.0.0.1:1/none",
        allowed_origins=["https://wall.nghean.gov.vn"],
        signing_keys_previous={"k0": RETIRED_KEY},
    )


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(
        settings,
        connect=False,
        broadcaster=Broadcaster(seq_origin=0),
        ws_limits=WsLimits(auth_timeout_s=2),
    )


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def ctx(app: FastAPI) -> ApiContext:
    context: ApiContext = app.state.ioc
    return context


def feed(client: TestClient, app: FastAPI, *snapshots: Snapshot) -> None:
    assert client.portal is not None
    for s in snapshots:
        client.portal.call(ctx(app).live.apply_snapshot, s)


def feed_alerts(client: TestClient, app: FastAPI, *alerts: dict[str, Any]) -> None:
    assert client.portal is not None
    for a in alerts:
        client.portal.call(ctx(app).live.apply_alert, a)


def token(settings: Settings, role: str = "operator", commune: str | None = None) -> str:
    return create_token(settings, role, commune=commune)


def until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = ws.receive_json()
        if message["type"] == kind:
            return message


def subscribe(ws: Any, channels: list[str], resume: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Subscribe, then collect one answer per channel (an error, a snapshot or a resume)."""
    ws.send_json({"type": "subscribe", "channels": channels, **({"resume": resume} if resume else {})})
    answers: list[dict[str, Any]] = []
    while len(answers) < len(channels):
        message = ws.receive_json()
        if message["type"] in ("error", "snapshot", "resumed"):
            answers.append(message)
    return answers


def probe(ws: Any) -> list[dict[str, Any]]:
    """Everything queued for the client before a pong: a client ping is answered in order."""
    ws.send_json({"type": "ping"})
    seen: list[dict[str, Any]] = []
    while (message := ws.receive_json())["type"] != "pong":
        seen.append(message)
    return seen


# --- a commune token never reaches another commune's data -------------------------------------


@pytest.mark.parametrize(
    "channel",
    [
        f"kpi:commune:{OTHER}",
        f"kpi:station:AIR-{OTHER}",
        f"kpi:station:RAIN-{OTHER}",
        "kpi:station:WL-NAMDAN",
        "kpi:station:AIR-99999",
        "kpi:province",
        "kpi:agency:000.01.70.H40",
        "kpi:agency:000.00.16.H40",
        "kpi:commune:",
        "kpi:",
        "kpi:commune:16681:extra",
        "kpi:COMMUNE:16681",
    ],
)
def test_commune_token_is_refused_every_channel_but_its_own(
    client: TestClient, app: FastAPI, settings: Settings, channel: str
) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        (answer,) = subscribe(ws, [channel])
        assert answer == {"type": "error", "code": "forbidden", "message": "outside your rights", "channel": channel}
        feed(client, app, *(snap(s.kpi, s.scope, s.window, value=9, seq=2) for s in SAMPLE))
        assert probe(ws) == []


def test_commune_resume_of_a_forbidden_channel_replays_nothing(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        answers = subscribe(
            ws,
            [f"kpi:commune:{OTHER}", f"kpi:commune:{COMMUNE}"],
            resume={f"kpi:commune:{OTHER}": 0, f"kpi:commune:{COMMUNE}": 0, "kpi:province": 0},
        )
        assert answers[0]["code"] == "forbidden"
        assert answers[1]["type"] == "resumed" and answers[1]["channel"] == f"kpi:commune:{COMMUNE}"
        replayed = [ws.receive_json() for _ in range(answers[1]["replayed"])]
        assert {m["item"]["scope"] for m in replayed} == {f"commune:{COMMUNE}"}
        # a resume position for a channel that was not asked for subscribes to nothing
        feed(client, app, snap("dossier.received", "province", value=5, seq=3))
        assert probe(ws) == []


def test_commune_alerts_are_its_own_in_the_snapshot_and_the_stream(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed_alerts(client, app, *ALERTS)
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        (snapshot,) = subscribe(ws, ["alerts"])
        assert [a["id"] for a in snapshot["items"]] == ["a2"]
        feed_alerts(client, app, *({**a, "state": "resolved"} for a in ALERTS))
        assert [(m["type"], m["item"]["id"]) for m in probe(ws)] == [("alert", "a2")]
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        (resumed,) = subscribe(ws, ["alerts"], resume={"alerts": 0})
        assert resumed["type"] == "resumed"
        replayed = [ws.receive_json() for _ in range(resumed["replayed"])]
        assert {m["item"]["id"] for m in replayed} == {"a2"}


@pytest.mark.parametrize(
    "params",
    [
        {"kpi": "dossier.received", "scope": f"commune:{OTHER}", "window": "today"},
        {"kpi": "env.aqi", "scope": f"station:AIR-{OTHER}", "window": "now"},
        {"kpi": "dossier.received", "scope": "province", "window": "today"},
        {"kpi": "dossier.received", "scope": "agency:000.01.70.H40", "window": "today"},
    ],
)
def test_commune_history_of_another_scope_is_403(
    settings: Settings, client: TestClient, params: dict[str, str]
) -> None:
    headers = {"Authorization": f"Bearer {token(settings, 'commune', COMMUNE)}"}
    assert client.get("/api/kpis/history", params=params, headers=headers).status_code == 403


def test_commune_history_of_its_own_scope_passes_the_rights_check(settings: Settings, client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {token(settings, 'commune', COMMUNE)}"}
    params = {"kpi": "dossier.received", "scope": f"commune:{COMMUNE}", "window": "today"}
    assert client.get("/api/kpis/history", params=params, headers=headers).status_code == 503  # no database here


@pytest.mark.parametrize("scope", [f"commune:{OTHER}", f"station:AIR-{OTHER}", "province", "agency:000.01.70.H40"])
def test_commune_rest_kpis_of_another_scope_are_403(
    client: TestClient, app: FastAPI, settings: Settings, scope: str
) -> None:
    feed(client, app, *SAMPLE)
    headers = {"Authorization": f"Bearer {token(settings, 'commune', COMMUNE)}"}
    assert client.get("/api/kpis", params={"scope": f"commune:{COMMUNE},{scope}"}, headers=headers).status_code == 403
    items = client.get("/api/kpis", headers=headers).json()["items"]
    assert {i["scope"] for i in items} == {f"commune:{COMMUNE}", f"station:AIR-{COMMUNE}"}


# --- a commune token sees its own stations' environment (issue 20), and no other station ------------


def test_commune_token_gets_its_own_station_channel_and_nothing_of_another(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        answers = subscribe(ws, [f"kpi:station:AIR-{COMMUNE}", f"kpi:station:AIR-{OTHER}"])
        by_type = {a["type"]: a for a in answers}
        assert by_type["snapshot"]["channel"] == f"kpi:station:AIR-{COMMUNE}"
        assert {i["scope"] for i in by_type["snapshot"]["items"]} == {f"station:AIR-{COMMUNE}"}
        assert by_type["error"]["channel"] == f"kpi:station:AIR-{OTHER}"
        feed(client, app, *(snap(s.kpi, s.scope, s.window, value=9, seq=2) for s in SAMPLE))
        updates = [m for m in probe(ws) if m["type"] == "update"]
        assert [m["item"]["scope"] for m in updates] == [f"station:AIR-{COMMUNE}"]


def test_commune_history_of_its_own_station_passes_the_rights_check(settings: Settings, client: TestClient) -> None:
    headers = {"Authorization": f"Bearer {token(settings, 'commune', COMMUNE)}"}
    params = {"kpi": "env.aqi", "scope": f"station:AIR-{COMMUNE}", "window": "now"}
    assert client.get("/api/kpis/history", params=params, headers=headers).status_code == 503  # no database here
    params["scope"] = "station:WL-NAMDAN"  # Nam Đàn's gauge, not this commune's
    assert client.get("/api/kpis/history", params=params, headers=headers).status_code == 403


# --- a security token sees cyber.* only ----------------------------------------------------------


def test_security_token_sees_only_cyber_items_on_every_path(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed(client, app, *SAMPLE)
    feed_alerts(client, app, *ALERTS)
    sec = token(settings, "security")
    items = client.get("/api/kpis", headers={"Authorization": f"Bearer {sec}"}).json()["items"]
    assert {(i["kpi"], i["scope"]) for i in items} == {("cyber.open", "province")}
    with client.websocket_connect("/ws", subprotocols=["bearer", sec]) as ws:
        until(ws, "auth_ok")
        province, alerts, commune = subscribe(ws, ["kpi:province", "alerts", f"kpi:commune:{COMMUNE}"])
        assert [i["kpi"] for i in province["items"]] == ["cyber.open"]
        assert [a["id"] for a in alerts["items"]] == ["a3"]
        assert commune["code"] == "forbidden"
        feed(client, app, *(snap(s.kpi, s.scope, s.window, value=9, seq=2) for s in SAMPLE))
        feed_alerts(client, app, *({**a, "state": "resolved"} for a in ALERTS))
        got = probe(ws)
        assert [(m["type"], m["item"].get("kpi")) for m in got] == [("update", "cyber.open"), ("alert", "cyber.open")]


@pytest.mark.parametrize(("kpi", "status"), [("dossier.received", 403), ("cyber.open", 503)])
def test_security_history_is_limited_to_cyber(client: TestClient, settings: Settings, kpi: str, status: int) -> None:
    response = client.get(
        "/api/kpis/history",
        params={"kpi": kpi, "scope": "province", "window": "now"},
        headers={"Authorization": f"Bearer {token(settings, 'security')}"},
    )
    assert response.status_code == status


# --- authentication -------------------------------------------------------------------------------


def signed(key: str, kid: str | None, ttl_s: int = 600, **claims: Any) -> str:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    payload = {"sub": "x", "role": "operator", "iat": now, "exp": now + ttl_s, **claims}
    return jwt.encode(payload, key, algorithm="HS256", headers={"kid": kid} if kid else None)


def bad_tokens(settings: Settings) -> dict[str, str]:
    key = settings.effective_signing_key()
    return {
        "expired": signed(key, settings.signing_key_id, ttl_s=-3600),
        "wrong signature": signed("another-key-" + "x" * 40, settings.signing_key_id),
        "unknown kid": signed(key, "k9"),
        "no kid": signed(key, None),
        "retired kid, forged": signed("another-key-" + "x" * 40, "k0"),
        "retired kid, expired": signed(RETIRED_KEY, "k0", ttl_s=-3600),
    }


BAD = ["expired", "wrong signature", "unknown kid", "no kid", "retired kid, forged", "retired kid, expired"]


@pytest.mark.parametrize("case", BAD)
def test_bad_tokens_are_refused_over_http(client: TestClient, settings: Settings, case: str) -> None:
    response = client.get("/api/kpis", headers={"Authorization": f"Bearer {bad_tokens(settings)[case]}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("how", ["subprotocol", "first message"])
def test_bad_tokens_are_refused_over_websocket(client: TestClient, settings: Settings, case: str, how: str) -> None:
    bad = bad_tokens(settings)[case]
    protocols = ["bearer", bad] if how == "subprotocol" else []
    with client.websocket_connect("/ws", subprotocols=protocols) as ws:
        if how == "first message":
            ws.send_json({"type": "auth", "token": bad})
        assert ws.receive_json()["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


def test_token_of_a_retired_but_known_kid_is_accepted(client: TestClient, settings: Settings) -> None:
    old = signed(RETIRED_KEY, "k0", role="commune", commune=COMMUNE)
    assert client.get("/api/units", headers={"Authorization": f"Bearer {old}"}).status_code == 200
    with client.websocket_connect("/ws", subprotocols=["bearer", old]) as ws:
        ok = ws.receive_json()
        assert ok["type"] == "auth_ok" and ok["commune"] == COMMUNE


def test_missing_token_over_websocket_is_4401(client: TestClient) -> None:
    with client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"]})
        assert ws.receive_json()["message"] == "missing token"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


@pytest.mark.parametrize("name", ["token", "access_token", "jwt", "auth"])
def test_a_token_in_the_url_is_never_accepted(client: TestClient, settings: Settings, name: str) -> None:
    good = token(settings)
    assert client.get(f"/api/kpis?{name}={good}").status_code == 401
    with client.websocket_connect(f"/ws?{name}={good}") as ws:
        ws.send_json({"type": "subscribe", "channels": ["kpi:province"]})
        assert ws.receive_json()["code"] == "unauthorized"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4401


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://wall.nghean.gov.vn.evil.example"])
def test_foreign_origin_is_refused_even_with_a_good_token(client: TestClient, settings: Settings, origin: str) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect("/ws", subprotocols=["bearer", token(settings)], headers={"origin": origin}),
    ):
        pass
    assert refused.value.code == 4403


def test_reauthentication_cannot_change_role_or_commune(client: TestClient, settings: Settings) -> None:
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings, "commune", COMMUNE)]) as ws:
        until(ws, "auth_ok")
        ws.send_json({"type": "auth", "token": token(settings, "commune", OTHER)})
        assert until(ws, "error")["code"] == "forbidden"
        ws.send_json({"type": "auth", "token": token(settings, "operator")})
        assert until(ws, "error")["code"] == "forbidden"
        (answer,) = subscribe(ws, [f"kpi:commune:{OTHER}"])
        assert answer["code"] == "forbidden"


# --- resume -------------------------------------------------------------------------------------


def test_resume_without_a_gap_replays_exactly_what_was_missed(
    client: TestClient, app: FastAPI, settings: Settings
) -> None:
    feed(client, app, *SAMPLE)
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings)]) as ws:
        until(ws, "auth_ok")
        (snapshot,) = subscribe(ws, [f"kpi:commune:{COMMUNE}"])
    feed(client, app, snap("dossier.received", f"commune:{COMMUNE}", value=2, seq=2))
    feed(client, app, snap("dossier.received", f"commune:{COMMUNE}", value=3, seq=3))
    with client.websocket_connect("/ws", subprotocols=["bearer", token(settings)]) as ws:
        until(ws, "auth_ok")
        (resumed,) = subscribe(ws, [f"kpi:commune:{COMMUNE}"], resume={f"kpi:commune:{COMMUNE}": snapshot["seq"]})
        assert resumed["recovered"] is True and resumed["from"] == snapshot["seq"]
        # both missed updates of the one KPI may coalesce into the newest; the newest always arrives
        replayed = probe(ws)
        assert replayed[-1]["item"]["value"] == 3 and replayed[-1]["seq"] == resumed["seq"]
        assert [m["seq"] for m in replayed] == sorted(m["seq"] for m in replayed)


def test_resume_beyond_the_history_is_a_fresh_snapshot_not_recovered(settings: Settings) -> None:
    app = create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0, history_size=2))
    with TestClient(app) as client:
        feed(client, app, *(snap("dossier.received", "province", value=v, seq=v) for v in range(1, 8)))
        with client.websocket_connect("/ws", subprotocols=["bearer", token(settings)]) as ws:
            until(ws, "auth_ok")
            (answer,) = subscribe(ws, ["kpi:province"], resume={"kpi:province": 2})
            assert answer["type"] == "snapshot" and answer["recovered"] is False
            assert [i["value"] for i in answer["items"]] == [7]
            assert answer["seq"] == 7


# --- slow clients ------------------------------------------------------------------------------


async def test_a_stuck_client_is_cut_off_and_never_delays_another(settings: Settings) -> None:
    app = create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0, max_queue=5))
    context = ctx(app)
    principal = verify_token(settings, token(settings))
    stuck, healthy = FakeSocket(stuck=True), FakeSocket(stuck=False)
    connections = [Connection(context, ws, principal) for ws in (stuck, healthy)]  # type: ignore[arg-type]
    for ws in (stuck, healthy):
        ws.inbox.put_nowait(
            {"type": "websocket.receive", "text": '{"type": "subscribe", "channels": ["kpi:province"]}'}
        )
    runs = [asyncio.create_task(c.run()) for c in connections]
    await eventually(lambda: len(context.broadcaster.channel("kpi:province").subscribers) == 2, what="both subscribed")
    for v in range(1, 51):
        context.live.apply_snapshot(snap(f"k{v}", "province", value=v, seq=v))
        await asyncio.sleep(0)
    await eventually(lambda: len([m for m in healthy.sent if m["type"] == "update"]) >= 50, what="the healthy client's 50 updates")
    assert [m["item"]["value"] for m in healthy.sent if m["type"] == "update"] == list(range(1, 51))
    await asyncio.wait_for(runs[0], 5)
    assert stuck.close_code == CLOSE_TOO_SLOW
    assert context.broadcaster.subscriber_count == 1 and context.broadcaster.disconnected_slow == 1
    assert context.metrics.registry.get_sample_value("ioc_ws_slow_disconnects_total") == 1
    healthy.inbox.put_nowait({"type": "websocket.disconnect"})
    await asyncio.wait_for(runs[1], 5)
    assert healthy.close_code != CLOSE_TOO_SLOW


async def test_a_slow_client_gets_the_newest_value_per_kpi(settings: Settings) -> None:
    app = create_app(settings, connect=False, broadcaster=Broadcaster(seq_origin=0))
    context = ctx(app)
    slow = FakeSocket(stuck=True)
    connection = Connection(context, slow, verify_token(settings, token(settings)))  # type: ignore[arg-type]
    slow.inbox.put_nowait({"type": "websocket.receive", "text": '{"type": "subscribe", "channels": ["kpi:province"]}'})
    run = asyncio.create_task(connection.run())
    # the snapshot is taken and now stuck in send_text
    await eventually(lambda: "kpi:province" in connection.sub.filters, what="the subscription")
    for v in range(1, 101):
        context.live.apply_snapshot(snap(f"k{v % 2}", "province", value=v, seq=v))
    slow.gate.set()
    await eventually(lambda: len([m for m in slow.sent if m["type"] == "update"]) >= 2, what="the coalesced updates")
    updates = [(m["item"]["kpi"], m["item"]["value"]) for m in slow.sent if m["type"] == "update"]
    assert updates == [("k1", 99), ("k0", 100)]
    assert connection.sub.coalesced == 98
    assert context.metrics.registry.get_sample_value("ioc_ws_coalesced_total") == 98
    slow.inbox.put_nowait({"type": "websocket.disconnect"})
    await asyncio.wait_for(run, 5)
