"""The notification policy: which alert events notify (silences, inhibitions, groups) and which stay quiet."""

from __future__ import annotations

from typing import Final

import msgspec

from alerts.model import AlertEvent, AlertState
from alerts.rules import matches_all
from alerts.state import EngineState, Record

#: Which states a notification goes out for (an acknowledgement or a silence is recorded, not announced).
ANNOUNCED: Final = (AlertState.FIRING, AlertState.ESCALATED, AlertState.RESOLVED)
#: The states in which an alert demands attention (what silences and inhibitions hold back).
LOUD: Final = (AlertState.FIRING, AlertState.ESCALATED)


class NotificationMixin(EngineState):
    """Whether an event notifies: a silenced or inhibited alert's does not, a group's later ones do not."""

    def _emit(self, rec: Record, event: AlertEvent, *, opening: bool = False) -> None:
        """Decide whether the event notifies (silence, inhibition, group), then record and output it."""
        extra = dict(event.extra or {})
        notify = event.state in ANNOUNCED
        if rec.silenced_by is not None:
            notify = False
            extra["silenced_by"] = rec.silenced_by
        if event.state is AlertState.RESOLVED and not rec.notified:
            notify = False  # nobody was told it fired: no "resolved" news either
        if notify and event.state in LOUD:
            source = self._inhibitor(rec)
            rec.inhibited_by = source.alert.alert_id if source else None
            if source is not None:
                notify = False
                extra["inhibited_by"] = source.alert.alert_id
        group = None
        rule = rec.rule
        if notify and rule.group_by is not None and rule.group_window is not None:
            values = ",".join(f"{label}={self._labels(rec).get(label) or ''}" for label in rule.group_by)
            key = f"{rule.id}|{event.state.value}|{values}"
            current = self._groups.get(key)
            if current is not None and event.at < current[1]:
                group, notify = current[0], False
                extra["grouped"] = True
            else:
                group = f"{key}@{event.at.isoformat()}"
                self._groups[key] = (group, event.at + rule.group_window)
                if len(self._groups) > 4096:
                    self._groups = {k: g for k, g in self._groups.items() if g[1] > event.at}
        if notify or group is not None:
            rec.notified = True
        event = msgspec.structs.replace(event, notify=notify, group=group, extra=extra or None)
        if not opening:
            rec.alert.apply(event)
        self._out.append(event)

    def _labels(self, rec: Record) -> dict[str, str | None]:
        a = rec.alert
        return {
            **rec.labels,
            "rule": a.rule,
            "scope": a.scope,
            "severity": a.severity.value,
            "domain": a.domain,
            "commune_code": a.commune_code,
            "state": a.state.value,
        }

    def _inhibitor(self, rec: Record) -> Record | None:
        target = self._labels(rec)
        for inh in self.rules.inhibitions:
            if not matches_all(inh.target, target):
                continue
            for other in self._alerts.values():
                if other is rec:
                    continue
                source = self._labels(other)
                if matches_all(inh.source, source) and all(source.get(e) == target.get(e) for e in inh.equal):
                    return other
        return None
