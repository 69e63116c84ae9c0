"""Contract types several packages share (CONTRACT.md): time units, the time zone, severities, incident steps.

Defined once here, in the kernel, so that `streams`, `alerts`, `api`, `simulators` and `reports`
agree without importing each other. Topic names are in `ioc.settings` (``TOPIC_*``), the KPI
snapshot and its encoding in `ioc.snapshot`.
"""

from __future__ import annotations

import datetime as dt
from typing import Final, Literal, get_args
from zoneinfo import ZoneInfo

#: Microseconds per second: event times are integers of µs since the epoch.
US: Final = 1_000_000
#: The province's time zone (no daylight saving since 1975: UTC+7 for all data we take).
TZ: Final = ZoneInfo("Asia/Ho_Chi_Minh")
#: Its offset from UTC, in seconds, and as a fixed-offset zone: how the contract's producers write times (``+07:00``).
UTC_OFFSET_S: Final = 7 * 3600
UTC7: Final = dt.timezone(dt.timedelta(seconds=UTC_OFFSET_S), "+07:00")

#: Incident severities (``severity`` of ``ioc.incident.v1``), lowest first.
IncidentSeverity = Literal["low", "medium", "high", "critical"]
INCIDENT_SEVERITIES: Final[tuple[str, ...]] = get_args(IncidentSeverity)
#: Each severity's rank: a higher rank is worse.
SEVERITY_RANK: Final = {s: i for i, s in enumerate(INCIDENT_SEVERITIES)}
#: The steps of an incident's life (``type`` of ``ioc.incident.v1``), in the order they happen.
IncidentStep = Literal["detected", "acknowledged", "contained", "resolved", "false_positive"]
INCIDENT_STEPS: Final[tuple[str, ...]] = get_args(IncidentStep)
