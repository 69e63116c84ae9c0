"""The API's live state: the current value of every KPI, and how updates become channel messages."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

import msgspec

from api.auth import ALERTS_CHANNEL, KPI_CHANNEL_PREFIX, Principal
from api.broadcaster import Broadcaster, ItemFilter, Published
from ioc.snapshot import Snapshot

log = logging.getLogger(__name__)

#: Alert events kept for the snapshot of the ``alerts`` channel.
RECENT_ALERTS: Final = 200
_AGENCY_CODE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def kpi_channel(scope: str) -> str:
    """The channel a snapshot of ``scope`` is published on: ``kpi:<scope>``."""
    return KPI_CHANNEL_PREFIX + scope


def snapshot_item(snapshot: Snapshot) -> dict[str, Any]:
    """The CONTRACT §4 JSON object of a snapshot."""
    item: dict[str, Any] = msgspec.to_builtins(snapshot)
    return item


class KpiTable:
    """Current snapshot per ``kpi|scope|window``; an older ``seq`` never overwrites a newer one."""

    def __init__(self) -> None:
        self._by_scope: dict[str, dict[str, Snapshot]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_scope.values())

    def upsert(self, snapshot: Snapshot) -> bool:
        """Store ``snapshot`` if it is newer than what is held; True when it changed the table."""
        scope = self._by_scope.setdefault(snapshot.scope, {})
        held = scope.get(snapshot.key)
        if held is not None and held.seq >= snapshot.seq:
            return False
        scope[snapshot.key] = snapshot
        return True

    def in_scope(self, scope: str) -> list[Snapshot]:
        return sorted(self._by_scope.get(scope, {}).values(), key=lambda s: (s.kpi, s.window))

    def query(
        self,
        kpis: Collection[str] = (),
        scopes: Collection[str] = (),
        windows: Collection[str] = (),
    ) -> list[Snapshot]:
        """Snapshots matching every non-empty filter, ordered by scope, kpi, window."""
        scope_names: Iterable[str] = scopes if scopes else sorted(self._by_scope)
        found: list[Snapshot] = []
        for scope in scope_names:
            for snap in self.in_scope(scope):
                if (not kpis or snap.kpi in kpis) and (not windows or snap.window in windows):
                    found.append(snap)
        return found


class LiveState:
    """Current values plus the broadcaster: what the Kafka feed hands every update to."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        table: KpiTable | None = None,
        *,
        station_communes: Mapping[str, str] | None = None,
    ) -> None:
        self.broadcaster = broadcaster
        self.table = table or KpiTable()
        self.recent_alerts: list[dict[str, Any]] = []
        #: station id → commune code: a station's alerts belong to its commune.
        self.station_communes = dict(station_communes or {})

    def apply_snapshot(self, snapshot: Snapshot) -> bool:
        """Take a KPI snapshot; publish it on ``kpi:<scope>`` when it is newer than the held one."""
        if not self.table.upsert(snapshot):
            return False
        self.broadcaster.publish(
            kpi_channel(snapshot.scope),
            snapshot_item(snapshot),
            key=snapshot.key,
            attrs={"kpi": snapshot.kpi, "scope": snapshot.scope},
        )
        return True

    def apply_alert(self, alert: Mapping[str, Any]) -> None:
        """Take an alert lifecycle event and publish it on ``alerts`` (never coalesced)."""
        event = dict(alert)
        self.recent_alerts.append(event)
        del self.recent_alerts[:-RECENT_ALERTS]
        self.broadcaster.publish(ALERTS_CHANNEL, event, kind="alert", attrs=event)

    def snapshot_items(self, channel: str, principal: Principal) -> Callable[[], list[Any]]:
        """A function building the items of ``channel`` that ``principal`` may see."""
        if channel == ALERTS_CHANNEL:
            stations = self.station_communes
            return lambda: [a for a in self.recent_alerts if principal.can_see_alert(a, stations)]
        scope = channel[len(KPI_CHANNEL_PREFIX) :]
        return lambda: [snapshot_item(s) for s in self.table.in_scope(scope) if principal.can_see_kpi(s.kpi, s.scope)]


def item_filter(
    channel: str, principal: Principal, station_communes: Mapping[str, str] | None = None
) -> ItemFilter | None:
    """The per-message filter of a subscription; None when the whole channel is visible."""
    if principal.sees_everything:
        return None
    if channel == ALERTS_CHANNEL:
        return lambda m: principal.can_see_alert(m.attrs, station_communes)

    def accept(m: Published) -> bool:
        return principal.can_see_kpi(str(m.attrs.get("kpi", "")), str(m.attrs.get("scope", "")))

    return accept


def channel_exists(channel: str, communes: Collection[str], stations: Collection[str]) -> bool:
    """Whether ``channel`` names something real (so clients cannot create unbounded channels)."""
    if channel in (ALERTS_CHANNEL, "kpi:province"):
        return True
    kind, _, ident = channel.removeprefix(KPI_CHANNEL_PREFIX).partition(":")
    if not channel.startswith(KPI_CHANNEL_PREFIX) or not ident:
        return False
    if kind == "commune":
        return ident in communes
    if kind == "station":
        return ident in stations
    if kind == "agency":
        return bool(_AGENCY_CODE.match(ident))
    return False
