"""Wazuh alerts (its integrator's JSON alert, as a webhook posts it) mapped to `ioc.incident.v1` ``detected`` events.

The mapping and what it loses are documented in docs/api.md ("SIEM webhook: Wazuh"). In short:
every alert is one incident, detected at the alert's ``timestamp``; ``rule.level`` (0-15) gives the
severity, ``rule.groups`` the category, ``agent.name`` the system, ``data.srcip`` the source IP,
``rule.description`` and ``rule.id`` the title. Wazuh alerts have no lifecycle: acknowledging and
resolving are later events of the same ``incident_id`` sent by the SOC through the plain ingest.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from typing import Any

import msgspec

from ioc.errors import InvalidEvent
from streams import cyber
from streams.windows import TZ

#: Wazuh rule levels (0-15, docs "Rules classification") to incident severities: 12 and up are
#: "high importance" events, 15 a "severe attack".
SEVERITY_BY_LEVEL = ((15, "critical"), (12, "high"), (7, "medium"), (0, "low"))
#: Rule groups to incident categories, the first group found in this order wins; else ``other``.
CATEGORY_BY_GROUP: tuple[tuple[str, str], ...] = (
    ("ddos", "ddos"),
    ("dos", "ddos"),
    ("phishing", "phishing"),
    ("data_leak", "data_leak"),
    ("exfiltration", "data_leak"),
    ("web_defacement", "defacement"),
    ("defacement", "defacement"),
    ("malware", "malware"),
    ("virus", "malware"),
    ("virustotal", "malware"),
    ("yara", "malware"),
    ("rootcheck", "malware"),
    ("trojan", "malware"),
    ("brute_force", "brute_force"),
    ("authentication_failures", "brute_force"),
    ("vulnerability-detector", "vulnerability"),
    ("vulnerability", "vulnerability"),
    ("sql_injection", "intrusion"),
    ("web_attack", "intrusion"),
    ("exploit_attempt", "intrusion"),
    ("attack", "intrusion"),
    ("ids", "intrusion"),
    ("intrusion_detection", "intrusion"),
)
_encode = msgspec.json.Encoder()


def severity_of(level: int) -> str:
    for threshold, severity in SEVERITY_BY_LEVEL:
        if level >= threshold:
            return severity
    return "low"


def category_of(groups: list[str]) -> str:
    present = set(groups)
    for group, category in CATEGORY_BY_GROUP:
        if group in present:
            return category
    return "other"


def _timestamp(text: object) -> dt.datetime:
    if not isinstance(text, str):
        raise InvalidEvent("missing", field="timestamp")
    try:
        # Wazuh writes "2026-12-05T03:04:05.123+0000": an offset without a colon, which 3.11 reads.
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent(f"not an ISO 8601 time: {text[:60]!r}", field="timestamp") from None
    if t.tzinfo is None:
        raise InvalidEvent("time has no UTC offset", field="timestamp")
    return t


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    for name in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(name)  # type: ignore[assignment]
    return obj


def incident_from_alert(
    body: object,
    *,
    agency_code: str | None = None,
    commune_code: str | None = None,
    system_level: int | None = None,
) -> bytes:
    """The ``ioc.incident.v1`` event of one Wazuh alert (raw, or wrapped as ``all_fields`` by the Shuffle
    integration); raises `InvalidEvent` naming the field that is missing or wrong."""
    if isinstance(body, Mapping) and isinstance(body.get("all_fields"), Mapping):
        body = body["all_fields"]
    if not isinstance(body, Mapping):
        raise InvalidEvent("a Wazuh alert must be a JSON object", stage="schema")
    alert_id = body.get("id")
    if not isinstance(alert_id, str) or not alert_id or len(alert_id) > 100:
        raise InvalidEvent("missing or longer than 100 characters", field="id")
    level = _get(body, "rule", "level")
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 16:
        raise InvalidEvent("must be an integer 0-16", field="rule.level")
    groups = _get(body, "rule", "groups")
    if not isinstance(groups, list):
        groups = []
    description = _get(body, "rule", "description")
    rule_id = _get(body, "rule", "id")
    title = str(description) if isinstance(description, str) and description else "Wazuh alert"
    if isinstance(rule_id, str | int):
        title = f"{title} (Wazuh rule {rule_id})"
    manager = _get(body, "manager", "name")
    prefix = f"wazuh:{manager}" if isinstance(manager, str) and manager else "wazuh"
    incident_id = f"{prefix}:{alert_id}"
    agent = _get(body, "agent", "name")
    srcip = _get(body, "data", "srcip")
    source_ip = None
    if isinstance(srcip, str):
        try:
            source_ip = str(ipaddress.ip_address(srcip))
        except ValueError:
            source_ip = None  # Wazuh decoders sometimes put a host name here: lost, not refused
    event = {
        "schema": cyber.SCHEMA,
        "event_id": f"{incident_id}:detected",
        "incident_id": incident_id,
        "type": "detected",
        "occurred_at": _timestamp(body.get("timestamp")).astimezone(TZ).isoformat(),
        "severity": severity_of(level),
        "category": category_of([g for g in groups if isinstance(g, str)]),
        "system": agent[:200] if isinstance(agent, str) and agent else None,
        "system_level": system_level,
        "agency_code": agency_code,
        "commune_code": commune_code,
        "source_ip": source_ip,
        "title": title[:500],
    }
    return _encode.encode({k: v for k, v in event.items() if v is not None})
