"""10,000+ randomised attempts to see what a caller may not: random roles and communes, random requests on every
route and random WebSocket subscriptions, judged by an oracle written from the contract (`tests.api_world.Viewer`),
not from `api.auth`.

A *leak* is anything outside the caller's rights in an answer (an item, an alert, a silence, a channel), or a
success, a 403 or a 409 that reveals an alert or silence the caller may not see (those are 404s). Any other
difference from the oracle (a missing item, a wrong status) is counted apart; both must be zero.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from alerts.model import TRANSITIONS, AlertState
from api.alert_store import CollectingPublisher, MemoryAlertStore
from api.app import create_app
from api.auth import create_token
from api.broadcaster import Broadcaster
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import Settings
from ioc.snapshot import WINDOWS
from tests.api_world import AGENCIES, Viewer, World, apply_to_memory, build_world, snapshot, viewer, write_to_database
from tests.live_server import LiveServer, offline_settings

pytestmark = pytest.mark.integration

SEED = 20261122
HTTP_ATTEMPTS = 8_500
WS_CONNECTIONS = 150
SOCKET_ATTEMPTS = 600
ROLES = ("commune", "commune", "commune", "security", "security", "operator", "admin")
JUNK_SCOPES = (
    "commune:",
    "station:",
    "agency:",
    "kpi:province",
    "*",
    "%",
    "commune:*",
    "PROVINCE",
    "province:",
    "commune:99999",
)


def split(value: str | None) -> list[str]:
    """How the API reads a comma-separated filter (docs/api.md)."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


@dataclass
class Tally:
    attempts: int = 0
    leaks: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.attempts += other.attempts
        self.leaks += other.leaks
        self.wrong += other.wrong


@dataclass
class Attempt:
    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    #: Judges the answer (status, JSON body) into the tally.
    judge: Callable[[int, Any, Tally], None] = lambda status, body, tally: None

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.params or ''}{' ' + json.dumps(self.body) if self.body else ''}"


class Oracle:
    """The world as the contract says each caller sees it; follows the acknowledgements and silences made."""

    def __init__(self, world: World, *, database: bool) -> None:
        self.world = world
        self.database = database
        self.communes = sorted(world.registry.units)
        self.stations = sorted(world.registry.stations)
        self.station_commune = {s.station_id: s.commune_code for s in world.registry.stations.values()}
        self.alerts: dict[str, dict[str, Any]] = {a.alert_id: msgspec.to_builtins(a) for a in world.alerts}
        self.silences: dict[str, dict[str, list[str]]] = {
            s.id: {k: list(v) for k, v in s.matchers.items()} for s in world.silences
        }
        self.kpis = sorted({s.kpi for s in world.snapshots})
        self.series = {(s.kpi, s.scope, s.window) for s in world.snapshots}

    # -- what to ask -------------------------------------------------------------------------------------

    def scope(self, rng: random.Random, who: Viewer) -> str:
        own = who.commune or rng.choice(self.communes)
        own_stations = [s for s, c in self.station_commune.items() if c == own] or self.stations
        return rng.choice([
            f"commune:{own}", f"commune:{own}", f"commune:{rng.choice(self.communes)}", "province",
            f"agency:{rng.choice(AGENCIES)}", f"station:{rng.choice(own_stations)}", f"station:{rng.choice(self.stations)}",
            f" commune:{own}\t", f"COMMUNE:{own}", f"commune:{own}%", rng.choice(JUNK_SCOPES),
        ])  # fmt: skip

    def scopes(self, rng: random.Random, who: Viewer) -> str:
        return ",".join(self.scope(rng, who) for _ in range(rng.choice((1, 1, 1, 2, 3))))

    def attempt(self, rng: random.Random, who: Viewer) -> Attempt:
        route = rng.choices(
            [self.kpis_list, self.history, self.alert_list, self.alert_detail, self.alert_action, self.silence_list,
             self.silence_create, self.silence_expire, self.registries],
            weights=[30, 20, 20, 10, 5, 4, 3, 3, 5],
        )[0]  # fmt: skip
        return route(rng, who)

    # -- the routes --------------------------------------------------------------------------------------

    def kpis_list(self, rng: random.Random, who: Viewer) -> Attempt:
        params: dict[str, str] = {}
        if rng.random() < 0.7:
            params["scope"] = self.scopes(rng, who)
        if rng.random() < 0.3:
            params["kpi"] = ",".join(rng.sample([*self.kpis, "cyber.*", "nope"], 2))
        if rng.random() < 0.3:
            params["window"] = rng.choice([*WINDOWS, "24h,now", "x"])
        names = split(params.get("scope"))

        def judge(status: int, body: Any, tally: Tally) -> None:
            forbidden = [n for n in names if not who.sees_scope(n)]
            if status == 200:
                got = {(i["kpi"], i["scope"], i["window"]) for i in body["items"]}
                for kpi, scope, _ in got:
                    if not who.sees_kpi(kpi, scope):
                        tally.leaks.append(f"{who}: {kpi} at {scope}")
            if forbidden:
                if status != 403:
                    tally.wrong.append(f"{who}: {status} for scopes {forbidden}, not 403")
                return
            kpis, windows = split(params.get("kpi")), split(params.get("window"))
            expected = {
                (s.kpi, s.scope, s.window)
                for s in self.world.snapshots
                if (not names or s.scope in names) and (not kpis or s.kpi in kpis)
                and (not windows or s.window in windows) and who.sees_kpi(s.kpi, s.scope)
            }  # fmt: skip
            if status != 200 or got != expected:
                tally.wrong.append(f"{who}: {status}, {len(expected)} items expected")

        return Attempt("GET", "/api/kpis", params, judge=judge)

    def history(self, rng: random.Random, who: Viewer) -> Attempt:
        kpi = rng.choice(self.kpis)
        if rng.random() < 0.5:
            s = rng.choice(self.world.snapshots)
            kpi, scope, window = s.kpi, s.scope, s.window
        else:
            scope, window = self.scope(rng, who), rng.choice([*WINDOWS, "now", "week"])
        params = {"kpi": kpi, "scope": scope, "window": window}

        def judge(status: int, body: Any, tally: Tally) -> None:
            visible = who.sees_kpi(kpi, scope)
            if window not in WINDOWS:
                expected = 400
            elif not visible:
                expected = 403
            else:
                expected = 200 if self.database else 503
            if status in (200, 503) and not visible:
                tally.leaks.append(f"{who}: history of {kpi} at {scope} answered {status}")
            if status != expected:
                tally.wrong.append(f"{who}: history {params} answered {status}, not {expected}")
            elif status == 200 and (body["kpi"], body["scope"]) != (kpi, scope):
                tally.leaks.append(f"{who}: history of {body['kpi']} at {body['scope']} for {kpi} at {scope}")
            elif status == 200 and bool(body["points"]) != ((kpi, scope, window) in self.series):
                tally.wrong.append(f"{who}: history {params} has {len(body['points'])} points")

        return Attempt("GET", "/api/kpis/history", params, judge=judge)

    def alert_list(self, rng: random.Random, who: Viewer) -> Attempt:
        params: dict[str, str] = {}
        if rng.random() < 0.6:
            params["scope"] = self.scopes(rng, who)
        if rng.random() < 0.3:
            params["state"] = rng.choice(["active", "firing", "resolved", "acknowledged,escalated", "silenced", "open"])
        if rng.random() < 0.2:
            params["severity"] = rng.choice(["high", "critical,info", "warning", "urgent"])
        if rng.random() < 0.3:
            params["domain"] = rng.choice(["cyber", "water", "env,dossier", "platform", "nope"])
        if rng.random() < 0.3:
            params["limit"] = str(rng.choice([1, 5, 50, 1000, 0, 1001]))

        def judge(status: int, body: Any, tally: Tally) -> None:
            if status == 200:
                for item in body["items"]:
                    if not who.sees_alert(item):
                        tally.leaks.append(f"{who}: alert {item['alert_id']} of {item['scope']} in a list")
            limit = int(params.get("limit", "100"))
            states, severities = split(params.get("state")), split(params.get("severity"))
            scopes, domains = split(params.get("scope")), split(params.get("domain"))
            if not 1 <= limit <= 1000:
                expected = 422
            elif any(s not in ("active", *AlertState) for s in states) or any(
                s not in ("info", "warning", "high", "critical") for s in severities
            ):
                expected = 400
            elif not who.alert_scopes_allowed(scopes):
                expected = 403
            else:
                expected = 200
            if status != expected:
                tally.wrong.append(f"{who}: alerts {params} answered {status}, not {expected}")
                return
            if status != 200:
                return
            wanted = {s for s in states if s != "active"} | (
                {s.value for s in AlertState} - {"resolved"} if "active" in states else set()
            )
            found = [
                a for a in sorted(self.alerts.values(), key=lambda a: (a["started_at"], a["alert_id"]), reverse=True)
                if (not wanted or a["state"] in wanted) and (not severities or a["severity"] in severities)
                and (not scopes or a["scope"] in scopes) and (not domains or a["domain"] in domains)
                and who.sees_alert(a)
            ][:limit]  # fmt: skip
            if [a["alert_id"] for a in body["items"]] != [a["alert_id"] for a in found]:
                tally.wrong.append(f"{who}: alerts {params}: {body['count']} items, {len(found)} expected")

        return Attempt("GET", "/api/alerts", params, judge=judge)

    def some_alert(self, rng: random.Random) -> str:
        return rng.choice([*self.alerts, "0000000000000000"])

    def alert_detail(self, rng: random.Random, who: Viewer) -> Attempt:
        alert_id = self.some_alert(rng)

        def judge(status: int, body: Any, tally: Tally) -> None:
            alert = self.alerts.get(alert_id)
            visible = alert is not None and who.sees_alert(alert)
            if status == 200 and (not visible or body["alert"]["alert_id"] != alert_id
                                  or any(e["alert_id"] != alert_id for e in body["events"])):  # fmt: skip
                tally.leaks.append(f"{who}: alert {alert_id} ({alert and alert['scope']}) answered 200")
            if status != (200 if visible else 404):
                tally.wrong.append(f"{who}: alert {alert_id} answered {status}")

        return Attempt("GET", f"/api/alerts/{alert_id}", judge=judge)

    def alert_action(self, rng: random.Random, who: Viewer) -> Attempt:
        alert_id = self.some_alert(rng)
        step = rng.choice(["ack", "resolve"])
        target = AlertState.ACKNOWLEDGED if step == "ack" else AlertState.RESOLVED

        def judge(status: int, body: Any, tally: Tally) -> None:
            alert = self.alerts.get(alert_id)
            visible = alert is not None and who.sees_alert(alert)
            if not visible:
                if status != 404:
                    tally.leaks.append(f"{who}: {step} of invisible alert {alert_id} answered {status}")
                return
            assert alert is not None
            if who.role == "security" and alert["domain"] != "cyber":
                expected = 403
            else:
                expected = 200 if target in TRANSITIONS[AlertState(alert["state"])] else 409
            if status != expected:
                tally.wrong.append(f"{who}: {step} of {alert_id} ({alert['state']}) answered {status}, not {expected}")
            if status == 200:
                alert.update(state=body["alert"]["state"], acknowledged_by=body["alert"]["acknowledged_by"])

        body = {"reason": "đã xử lý"} if rng.random() < 0.5 else None
        return Attempt("POST", f"/api/alerts/{alert_id}/{step}", body=body, judge=judge)

    def silence_list(self, rng: random.Random, who: Viewer) -> Attempt:
        def judge(status: int, body: Any, tally: Tally) -> None:
            got = {s["id"]: s["matchers"] for s in body["items"]} if status == 200 else {}
            for sid, matchers in got.items():
                if not who.sees_silence(matchers):
                    tally.leaks.append(f"{who}: silence {sid} {matchers}")
            expected = {sid for sid, m in self.silences.items() if who.sees_silence(m)}
            if status != 200 or set(got) != expected:
                tally.wrong.append(f"{who}: silences answered {status}, {len(got)} of {len(expected)}")

        return Attempt("GET", "/api/silences", judge=judge)

    def silence_create(self, rng: random.Random, who: Viewer) -> Attempt:
        own = who.commune or rng.choice(self.communes)
        matchers: dict[str, Any] = rng.choice([
            {"domain": "cyber"}, {"domain": ["cyber"]}, {"domain": ["cyber", "env"]}, {"domain": "cyber*"},
            {"commune_code": own}, {"scope": f"commune:{own}"}, {"rule": "env.*"}, {"domain": "cyber", "rule": "x.*"},
        ])  # fmt: skip
        body = {"matchers": matchers, "duration": rng.choice(["15m", "2h"]), "reason": f"thử {rng.random():.6f}"}

        def judge(status: int, answer: Any, tally: Tally) -> None:
            parsed = {k: [v] if isinstance(v, str) else v for k, v in matchers.items()}
            allowed = who.all_seeing or (who.role == "security" and parsed.get("domain") == ["cyber"])
            if status in (200, 201):
                if not allowed:
                    tally.leaks.append(f"{who}: created silence {matchers}")
                self.silences[answer["id"]] = answer["matchers"]
            elif status != 403 or allowed:
                tally.wrong.append(f"{who}: silence {matchers} answered {status}")

        return Attempt("POST", "/api/silences", body=body, judge=judge)

    def silence_expire(self, rng: random.Random, who: Viewer) -> Attempt:
        sid = rng.choice([*self.silences, "sil-000000000000"])

        def judge(status: int, body: Any, tally: Tally) -> None:
            matchers = self.silences.get(sid)
            visible = matchers is not None and who.sees_silence(matchers)
            if not visible:
                if status != 404:
                    tally.leaks.append(f"{who}: expiring invisible silence {sid} answered {status}")
                return
            expected = 403 if who.role == "commune" else 200
            if status != expected:
                tally.wrong.append(f"{who}: expiring {sid} answered {status}, not {expected}")

        return Attempt("DELETE", f"/api/silences/{sid}", judge=judge)

    def registries(self, rng: random.Random, who: Viewer) -> Attempt:
        path = rng.choice(["/api/units", "/api/stations"])
        size = len(self.world.registry.units if path == "/api/units" else self.world.registry.stations)

        def judge(status: int, body: Any, tally: Tally) -> None:
            if status != 200 or body["count"] != size:
                tally.wrong.append(f"{who}: {path} answered {status}")

        return Attempt("GET", path, judge=judge)


def callers(rng: random.Random, oracle: Oracle, count: int) -> list[Viewer]:
    out = []
    for _ in range(count):
        role = rng.choice(ROLES)
        out.append(viewer(oracle.world, role, rng.choice(oracle.communes) if role == "commune" else None))
    return out


def judged(attempt: Attempt, who: Viewer, status: int, body: Any, tally: Tally) -> None:
    tally.attempts += 1
    before = len(tally.leaks) + len(tally.wrong)
    try:
        attempt.judge(status, body, tally)
    except (KeyError, TypeError) as exc:  # an answer of the wrong shape
        tally.wrong.append(f"{who}: {attempt}: {status} {exc!r}")
    if len(tally.leaks) + len(tally.wrong) > before:
        tally.wrong.append(f"  ... after {attempt}")


def report(name: str, tally: Tally, started: float) -> None:
    print(f"{name}: {tally.attempts} attempts, {len(tally.leaks)} leaks, {len(tally.wrong)} other differences "
          f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    for line in [*tally.leaks, *tally.wrong][:40]:
        print("   ", line)


# --- HTTP in process --------------------------------------------------------------------------------------


async def test_random_http_attempts_in_process_never_leak() -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    world = build_world(seed=SEED, alerts=120)
    settings = offline_settings()
    store = MemoryAlertStore()
    app = create_app(settings, connect=False, alert_store=store, alert_publisher=CollectingPublisher())
    apply_to_memory(world, app.state.ioc.live, store)
    oracle = Oracle(world, database=False)
    tally = Tally()
    people = callers(rng, oracle, 300)
    tokens = {id(who): create_token(settings, who.role, who.commune) for who in people}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ioc") as client:
        for _ in range(HTTP_ATTEMPTS):
            who = rng.choice(people)
            attempt = oracle.attempt(rng, who)
            response = await client.request(
                attempt.method, attempt.path, params=attempt.params, json=attempt.body,
                headers={"Authorization": f"Bearer {tokens[id(who)]}"},
            )  # fmt: skip
            judged(attempt, who, response.status_code, response.json(), tally)
    report("HTTP in process", tally, started)
    assert tally.attempts == HTTP_ATTEMPTS
    assert tally.leaks == []
    assert tally.wrong == []


# --- WebSocket subscriptions on a real socket ---------------------------------------------------------------


def channel_exists(oracle: Oracle, channel: str) -> bool:
    if channel in ("alerts", "kpi:province"):
        return True
    kind, _, ident = channel.removeprefix("kpi:").partition(":")
    if not channel.startswith("kpi:") or not ident:
        return False
    if kind == "commune":
        return ident in oracle.world.registry.units
    if kind == "station":
        return ident in oracle.world.registry.stations
    return kind == "agency" and ident.replace(".", "").isalnum() and len(ident) <= 64


def some_channel(rng: random.Random, oracle: Oracle, who: Viewer) -> str:
    if rng.random() < 0.15:
        return rng.choice(["alerts", "kpi:", "kpi:commune:", "kpi:commune:00000", "kpi:nowhere:1", "Alerts"])
    return "kpi:" + oracle.scope(rng, who).strip()


@dataclass
class Subscription:
    who: Viewer
    channels: list[str]
    frames: list[dict[str, Any]] = field(default_factory=list)


async def subscribe_and_watch(
    url: str, token: str, sub: Subscription, ready: asyncio.Event, publish: asyncio.Event
) -> None:
    async with websockets.connect(url, subprotocols=["bearer", token], compression=None, max_size=None) as ws:  # type: ignore[list-item]
        assert json.loads(await ws.recv())["type"] == "auth_ok"
        await ws.send(json.dumps({"type": "subscribe", "channels": sub.channels}))
        waiting = set(sub.channels)
        while waiting:  # one answer per channel (a snapshot or an error), then updates can come
            message = json.loads(await asyncio.wait_for(ws.recv(), 20))
            sub.frames.append(message)
            waiting.discard(message.get("channel"))
        ready.set()
        await publish.wait()
        await ws.send(json.dumps({"type": "ping"}))
        while (message := json.loads(await asyncio.wait_for(ws.recv(), 20)))["type"] != "pong":
            sub.frames.append(message)


def judge_subscription(oracle: Oracle, sub: Subscription, updated: set[str], tally: Tally) -> None:
    """Each channel asked for is one attempt: refused as the oracle says, or a snapshot of what it may see."""
    who = sub.who
    answers: dict[str, dict[str, Any]] = {}
    for message in sub.frames:
        kind, channel = message.get("type"), message.get("channel")
        if kind in ("snapshot", "update", "alert"):
            if channel not in sub.channels or not who.may_subscribe(channel):
                tally.leaks.append(f"{who}: {kind} on {channel}")
                continue
            items = message["items"] if kind == "snapshot" else [message["item"]]
            for item in items:
                ok = who.sees_alert(item) if channel == "alerts" else (
                    who.sees_kpi(item["kpi"], item["scope"]) and f"kpi:{item['scope']}" == channel)  # fmt: skip
                if not ok:
                    tally.leaks.append(f"{who}: {item.get('kpi') or item.get('rule')} at {item['scope']} on {channel}")
        if kind in ("snapshot", "error") and isinstance(channel, str):
            answers.setdefault(channel, message)
    for channel in dict.fromkeys(sub.channels):
        tally.attempts += 1
        got = answers.get(channel, {})
        if not who.may_subscribe(channel):
            expected = "forbidden"
        elif not channel_exists(oracle, channel):
            expected = "unknown_channel"
        else:
            expected = "snapshot"
        if (got.get("code") or got.get("type")) != expected:
            tally.wrong.append(f"{who}: {channel} answered {got.get('code') or got.get('type')}, not {expected}")
        elif expected == "snapshot" and channel != "alerts":
            scope = channel.removeprefix("kpi:")
            want = {
                (s.kpi, s.window) for s in oracle.world.snapshots if s.scope == scope and who.sees_kpi(s.kpi, scope)
            }
            if {(i["kpi"], i["window"]) for i in got["items"]} != want:
                tally.wrong.append(f"{who}: snapshot of {channel} differs")
            seen_updates = {(m["item"]["kpi"], m["item"]["window"]) for m in sub.frames
                            if m.get("type") == "update" and m.get("channel") == channel}  # fmt: skip
            if channel in updated and seen_updates != want:
                tally.wrong.append(f"{who}: updates of {channel} differ: {len(seen_updates)} of {len(want)}")


async def publish_everything(server: LiveServer, world: World, rng: random.Random, seq: int) -> set[str]:
    """A newer value of every series, and a fresh event of a quarter of the alerts, on the server's loop."""

    async def on_loop() -> set[str]:
        live = server.ctx.live
        for n, s in enumerate(world.snapshots):
            live.apply_snapshot(snapshot(s.kpi, s.scope, s.window, rng.uniform(0, 100), seq + n, world.now))
        for events in rng.sample(world.alert_events, len(world.alert_events) // 4):
            live.apply_alert({**msgspec.to_builtins(events[-1]), "repeat": 1})
        return {f"kpi:{s.scope}" for s in world.snapshots}

    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_loop(), server.loop))


@pytest.fixture
def ws_server() -> Iterator[tuple[LiveServer, World, Settings]]:
    world = build_world(seed=SEED + 1, alerts=120)
    settings = offline_settings()
    store = MemoryAlertStore()
    app = create_app(settings, connect=False, alert_store=store, broadcaster=Broadcaster(seq_origin=0))
    apply_to_memory(world, app.state.ioc.live, store)
    with LiveServer(app, settings) as server:
        yield server, world, settings


async def test_random_ws_subscriptions_never_leak(ws_server: tuple[LiveServer, World, Settings]) -> None:
    started = time.monotonic()
    server, world, settings = ws_server
    rng = random.Random(SEED + 1)
    oracle = Oracle(world, database=False)
    subs = [Subscription(who, [some_channel(rng, oracle, who) for _ in range(rng.randint(4, 10))])
            for who in callers(rng, oracle, WS_CONNECTIONS)]  # fmt: skip
    tally = Tally()
    for batch in range(0, len(subs), 50):
        publish = asyncio.Event()
        group = subs[batch : batch + 50]
        ready = [asyncio.Event() for _ in group]
        watchers = [
            asyncio.create_task(
                subscribe_and_watch(server.ws_url, create_token(settings, s.who.role, s.who.commune), s, r, publish)
            )
            for s, r in zip(group, ready, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
        updated = await publish_everything(server, world, rng, 1_000_000 * (batch + 1))
        publish.set()
        await asyncio.gather(*watchers)
        for s in group:
            judge_subscription(oracle, s, updated, tally)
    report("WebSocket on a real socket", tally, started)
    assert tally.attempts >= WS_CONNECTIONS * 4
    assert tally.leaks == []
    assert tally.wrong == []
    assert server.errors.lines() == []


# --- HTTP on a real socket, with PostgreSQL and the broker ---------------------------------------------------


def test_random_attempts_over_a_real_socket_and_database_never_leak(make_settings: Callable[..., Settings]) -> None:
    started = time.monotonic()
    settings = make_settings()
    ensure_topics(settings)
    world = build_world(seed=SEED + 2, alerts=60)
    write_to_database(world, settings.database_url)
    rng = random.Random(SEED + 2)
    oracle = Oracle(world, database=True)
    people = callers(rng, oracle, 40)
    tally = Tally()
    with LiveServer(create_app(settings), settings) as server:
        deadline = time.monotonic() + 30
        while not server.ctx.feed.loaded:
            assert time.monotonic() < deadline, "the API never loaded kpi_latest"
            time.sleep(0.05)
        with httpx.Client(base_url=server.http_url, timeout=15) as client:
            tokens = {id(who): create_token(settings, who.role, who.commune) for who in people}
            for _ in range(SOCKET_ATTEMPTS):
                who = rng.choice(people)
                attempt = oracle.attempt(rng, who)
                response = client.request(
                    attempt.method, attempt.path, params=attempt.params, json=attempt.body,
                    headers={"Authorization": f"Bearer {tokens[id(who)]}"},
                )  # fmt: skip
                judged(attempt, who, response.status_code, response.json(), tally)
        errors = server.errors.lines()
    report("HTTP on a real socket and PostgreSQL", tally, started)
    assert tally.attempts == SOCKET_ATTEMPTS
    assert tally.leaks == []
    assert tally.wrong == []
    assert errors == []


def test_the_attempts_cover_every_role_and_route() -> None:
    """The generator is not stuck on a corner: every role meets every route, in and out of its rights."""
    rng = random.Random(SEED)
    oracle = Oracle(build_world(seed=SEED, alerts=120), database=False)
    seen: set[tuple[str, str, str]] = set()
    for who in callers(rng, oracle, 300):
        for _ in range(30):
            attempt = oracle.attempt(rng, who)
            route = attempt.path if not attempt.path.startswith(("/api/alerts/", "/api/silences/")) else attempt.method
            seen.add((who.role, attempt.method, route.split("?")[0]))
    for role in ("operator", "admin", "security", "commune"):
        assert {r for w, _, r in seen if w == role} >= {"/api/kpis", "/api/kpis/history", "/api/alerts", "GET", "POST",
                                                         "DELETE", "/api/silences", "/api/units"}, role  # fmt: skip
