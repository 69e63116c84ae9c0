"""A province's worth of API data for the API's robustness tests: snapshots, alerts and silences across communes.

Built from the packaged registry with a seeded generator; written to PostgreSQL as the worker writes it
(``kpi_latest``, ``kpi_history``, ``alert_current``/``alert_event``, ``alert_silence``) or into the API's
in-memory stores.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

import msgspec
import psycopg

from alerts.engine import Silence, alert_id_for
from alerts.model import Alert, AlertEvent, AlertState, Audience, Severity, fingerprint
from api.alert_store import MemoryAlertStore
from api.live import LiveState
from ioc.registry import Registry, load_registry
from ioc.snapshot import Snapshot

VN = dt.timezone(dt.timedelta(hours=7))
AGENCIES = ("000.00.01.H40", "000.00.16.H40", "000.01.70.H40")
#: Lifecycle steps that lead to each state from ``firing``.
PATHS: dict[AlertState, tuple[AlertState, ...]] = {
    AlertState.FIRING: (),
    AlertState.ACKNOWLEDGED: (AlertState.ACKNOWLEDGED,),
    AlertState.ESCALATED: (AlertState.ESCALATED,),
    AlertState.SILENCED: (AlertState.SILENCED,),
    AlertState.RESOLVED: (AlertState.ACKNOWLEDGED, AlertState.RESOLVED),
}


@dataclass
class World:
    registry: Registry
    now: dt.datetime
    snapshots: list[Snapshot] = field(default_factory=list)
    #: Every alert's events, the opening one first.
    alert_events: list[list[AlertEvent]] = field(default_factory=list)
    silences: list[Silence] = field(default_factory=list)

    @property
    def alerts(self) -> list[Alert]:
        out = []
        for events in self.alert_events:
            alert = Alert.open(events[0])
            for e in events[1:]:
                alert.apply(e)
            out.append(alert)
        return out

    def scopes(self) -> list[str]:
        return sorted({s.scope for s in self.snapshots})


def snapshot(kpi: str, scope: str, window: str, value: float, seq: int, as_of: dt.datetime) -> Snapshot:
    return Snapshot(
        kpi=kpi, scope=scope, window=window, value=value, unit="%", numerator=value, denominator=100.0,
        target=70.0, status="ok" if value >= 70 else "breach", as_of=as_of, seq=seq,
    )  # fmt: skip


def build_world(seed: int = 20261122, *, alerts: int = 80) -> World:
    rng = random.Random(seed)
    registry = load_registry(None, None, None)
    now = dt.datetime.now(VN).replace(microsecond=0)
    world = World(registry, now)
    seq = 1

    def add(kpi: str, scope: str, window: str) -> None:
        nonlocal seq
        world.snapshots.append(snapshot(kpi, scope, window, round(rng.uniform(0, 100), 1), seq, now))
        seq += 1

    for kpi, window in (("dossier.online_rate", "24h"), ("cyber.open", "now"), ("env.aqi", "now")):
        add(kpi, "province", window)
    for code in registry.units:
        add("dossier.online_rate", f"commune:{code}", "24h")
        add("cyber.open" if rng.random() < 0.3 else "dossier.received", f"commune:{code}", "today")
    for station in registry.stations.values():
        add("env.aqi" if station.kind == "air" else "water.level_m", f"station:{station.station_id}", "now")
    for agency in AGENCIES:
        add("dossier.on_time_rate", f"agency:{agency}", "mtd")

    communes = sorted(registry.units)
    stations = sorted(registry.stations.values(), key=lambda s: s.station_id)
    for n in range(alerts):
        started = now - dt.timedelta(minutes=5 + n)
        kind = n % 6
        if kind == 0:
            code = rng.choice(communes)
            rule, scope, domain, commune, audience = "dossier.overdue", f"commune:{code}", "dossier", code, ("commune",)
        elif kind == 1:
            st = rng.choice(stations)
            rule, scope, domain, commune, audience = (
                "water.alarm_2",
                f"station:{st.station_id}",
                "water",
                None,
                ("operator", "commune"),
            )
        elif kind == 2:
            st = rng.choice(stations)
            rule, scope, domain, commune, audience = (
                "env.aqi_bad",
                f"station:{st.station_id}",
                "env",
                st.commune_code,
                ("commune",),
            )
        elif kind == 3:
            rule, scope, domain, commune, audience = "cyber.incident", "province", "cyber", None, ("security",)
        elif kind == 4:
            rule, scope, domain, commune, audience = (
                "dossier.agency_late",
                f"agency:{rng.choice(AGENCIES)}",
                "dossier",
                None,
                ("operator",),
            )
        else:
            code = rng.choice(communes)
            rule, scope, domain, commune, audience = (
                "platform.ddos",
                f"commune:{code}",
                "platform",
                code,
                ("operator", "security"),
            )
        fp = fingerprint(rule, scope)
        opened = AlertEvent(
            alert_id=alert_id_for(fp, started), fingerprint=fp, rule=rule, scope=scope,
            severity=rng.choice(list(Severity)), state=AlertState.FIRING, domain=domain,
            audience=tuple(Audience(a) for a in audience), commune_code=commune,
            message_vi=f"Cảnh báo {n}", message_en=f"Alert {n}", at=started, value=float(n),
            labels={"kpi": rule, "window": "now"},
        )  # fmt: skip
        events = [opened]
        for i, state in enumerate(PATHS[rng.choice(list(AlertState))], start=1):
            events.append(
                msgspec.structs.replace(opened, state=state, at=started + dt.timedelta(seconds=i), by="system")
            )
        world.alert_events.append(events)

    def silence(sid: str, matchers: dict[str, tuple[str, ...]], hours: float) -> None:
        world.silences.append(
            Silence(
                id=sid, matchers=matchers, starts_at=now - dt.timedelta(hours=1),
                ends_at=now + dt.timedelta(hours=hours), created_by="operator", reason="bảo trì",
            )
        )  # fmt: skip

    a, b = rng.sample(communes, 2)
    silence("sil-cyber", {"domain": ("cyber",)}, 2)
    silence("sil-cyberenv", {"domain": ("cyber", "env")}, 2)
    silence(f"sil-code-{a}", {"commune_code": (a,)}, 3)
    silence(f"sil-scope-{b}", {"rule": ("env.*",), "scope": (f"commune:{b}",)}, 3)
    silence(f"sil-glob-{a}", {"commune_code": (f"{a[:3]}*",)}, 3)
    silence("sil-env", {"rule": ("env.*",)}, 4)
    return world


def apply_to_memory(world: World, live: LiveState, store: MemoryAlertStore) -> None:
    """The world as an API started without a database holds it: live snapshots and alerts, a memory store."""
    for s in world.snapshots:
        live.apply_snapshot(s)
    for events in world.alert_events:
        for e in events:
            store.put(e)
            live.apply_alert(msgspec.to_builtins(e))
    for s in world.silences:
        store.silence_rows[s.id] = s


def write_to_database(world: World, url: str, *, history_points: int = 12) -> None:
    """The world as the stream worker leaves it in PostgreSQL (with a history of each snapshot)."""
    with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO kpi_latest (kpi, scope, win, value, unit, numerator, denominator, target, status, as_of, seq)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(s.kpi, s.scope, s.window, s.value, s.unit, s.numerator, s.denominator, s.target, s.status, s.as_of,
              s.seq) for s in world.snapshots],
        )  # fmt: skip
        cur.executemany(
            "INSERT INTO kpi_history (as_of, kpi, scope, win, value, numerator, denominator, status, seq)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(s.as_of - dt.timedelta(minutes=7 * k), s.kpi, s.scope, s.window, (s.value or 0) + k, s.numerator,
              s.denominator, s.status, s.seq * 100 - k) for s in world.snapshots for k in range(history_points)],
        )  # fmt: skip
        for events, alert in zip(world.alert_events, world.alerts, strict=True):
            cur.executemany(
                "INSERT INTO alert_event (alert_id, fingerprint, state, at, by, event) VALUES (%s, %s, %s, %s, %s, %s)",
                [(e.alert_id, e.fingerprint, e.state.value, e.at, e.by, msgspec.json.encode(e).decode())
                 for e in events],
            )  # fmt: skip
            cur.execute(
                "INSERT INTO alert_current (alert_id, fingerprint, rule, scope, severity, state, domain, commune_code,"
                " started_at, updated_at, alert) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (alert.alert_id, alert.fingerprint, alert.rule, alert.scope, alert.severity.value, alert.state.value,
                 alert.domain, alert.commune_code, alert.started_at, alert.updated_at,
                 msgspec.json.encode(alert).decode()),
            )  # fmt: skip
        cur.executemany(
            "INSERT INTO alert_silence (id, matchers, starts_at, ends_at, created_by, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            [(s.id, msgspec.json.encode(s.matchers).decode(), s.starts_at, s.ends_at, s.created_by, s.reason)
             for s in world.silences],
        )  # fmt: skip


# --- the oracle: who may see what, written from CONTRACT §7 and docs/api.md, not from api.auth -----------


@dataclass(frozen=True)
class Viewer:
    """A caller as the contract describes it; ``stations`` maps station id → commune (the registry)."""

    role: str
    commune: str | None
    stations: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def all_seeing(self) -> bool:
        return self.role in ("operator", "admin")

    def sees_scope(self, scope: str) -> bool:
        if self.all_seeing:
            return True
        if self.role == "security":
            return scope == "province"
        if self.role != "commune" or self.commune is None:
            return False
        if scope.startswith("station:"):  # its own stations' environment (issue 20)
            return self.stations.get(scope.removeprefix("station:")) == self.commune
        return scope == f"commune:{self.commune}"

    def sees_kpi(self, kpi: str, scope: str) -> bool:
        if self.role == "security":
            return scope == "province" and kpi.startswith("cyber.")
        return self.sees_scope(scope)

    def alert_commune(self, alert: dict[str, object]) -> str | None:
        code, scope = alert.get("commune_code"), str(alert.get("scope") or "")
        if code:
            return str(code)
        if scope.startswith("commune:"):
            return scope.removeprefix("commune:")
        if scope.startswith("station:"):
            return self.stations.get(scope.removeprefix("station:"))
        return None

    def sees_alert(self, alert: dict[str, object]) -> bool:
        if self.all_seeing:
            return True
        if self.role == "security":
            audience = alert.get("audience") or ()
            return alert.get("domain") == "cyber" or "security" in audience  # type: ignore[operator]
        return self.role == "commune" and self.commune is not None and self.alert_commune(alert) == self.commune

    def may_subscribe(self, channel: str) -> bool:
        if self.all_seeing:  # every channel there is: the alerts and the KPIs of any scope
            return channel == "alerts" or channel.startswith("kpi:")
        if self.role == "security":
            return channel in ("alerts", "kpi:province")
        if self.role != "commune":
            return False
        return channel in ("alerts", f"kpi:commune:{self.commune}") or (
            channel.startswith("kpi:station:") and self.sees_scope(channel.removeprefix("kpi:"))
        )

    def alert_scopes_allowed(self, scopes: list[str]) -> bool:
        """Whether ``GET /api/alerts?scope=`` may name these (a commune: its scope and its stations)."""
        if self.role != "commune":
            return True
        own = {f"commune:{self.commune}"} | {f"station:{s}" for s, c in self.stations.items() if c == self.commune}
        return all(s in own for s in scopes)

    def sees_silence(self, matchers: dict[str, list[str]]) -> bool:
        if self.all_seeing:
            return True
        if self.role == "security":
            return matchers.get("domain") == ["cyber"]
        return matchers.get("commune_code") == [self.commune] or matchers.get("scope") == [f"commune:{self.commune}"]


def viewer(world: World, role: str, commune: str | None = None) -> Viewer:
    return Viewer(role, commune, {s.station_id: s.commune_code for s in world.registry.stations.values()})
