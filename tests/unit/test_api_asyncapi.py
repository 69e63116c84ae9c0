"""``docs/asyncapi.yaml`` describes every topic and every WebSocket message the code really sends."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from api import broadcaster
from api.ws import frames as ws
from ioc.settings import ALL_TOPICS

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))
SERVER_SOURCES = [ROOT / "api" / name for name in ("ws/frames.py", "ws/handshake.py", "ws/connection.py", "ws/commands.py", "broadcaster.py", "live.py")]


def resolve(node: Any) -> Any:
    """Follow a local ``$ref`` (``#/components/...``)."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def messages(operation: dict[str, Any]) -> list[dict[str, Any]]:
    message = resolve(operation["message"])
    return [resolve(m) for m in message["oneOf"]] if "oneOf" in message else [message]


def test_spec_is_asyncapi_2_6_with_info_and_servers() -> None:
    assert SPEC["asyncapi"] == "2.6.0"
    assert SPEC["info"]["title"] and SPEC["info"]["version"]
    assert {s["protocol"] for s in SPEC["servers"].values()} == {"kafka", "ws", "mqtt"}


def test_every_contract_topic_and_the_websocket_are_channels() -> None:
    assert set(SPEC["channels"]) == {*ALL_TOPICS, "/ws", "ioc/sensors/{station_id}"}


@pytest.mark.parametrize("channel", sorted(SPEC["channels"]))
def test_every_channel_has_messages_with_a_payload_schema(channel: str) -> None:
    item = SPEC["channels"][channel]
    operations = [item[op] for op in ("publish", "subscribe") if op in item]
    assert operations, channel
    for operation in operations:
        for message in messages(operation):
            payload = resolve(message["payload"])
            assert payload.get("type") in ("object", "string"), (channel, message.get("name"))


def test_every_ref_resolves() -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(SPEC)


def test_deadletter_headers_are_the_contract_ones() -> None:
    (message,) = messages(SPEC["channels"]["ioc.deadletter"]["subscribe"])
    assert set(resolve(message["headers"])["required"]) == {
        "ioc.error.stage",
        "ioc.error.reason",
        "ioc.source.topic",
        "ioc.source.partition",
        "ioc.source.offset",
    }


def test_kpi_snapshot_schema_has_every_contract_field() -> None:
    schema = SPEC["components"]["schemas"]["KpiSnapshot"]
    assert set(schema["required"]) == {
        "kpi", "scope", "window", "value", "unit", "numerator", "denominator", "target", "status", "as_of", "seq"
    }  # fmt: skip


def sent_types() -> set[str]:
    """Message types the server code builds: ``"type": "..."`` literals and ``kind=`` of publish."""
    found: set[str] = set()
    for path in SERVER_SOURCES:
        text = path.read_text(encoding="utf-8")
        found |= set(re.findall(r'"type": "([a-z_]+)"', text))
        found |= set(re.findall(r'kind(?:: str)? ?= ?"([a-z_]+)"', text))
    return found


def test_every_message_type_the_server_sends_is_described() -> None:
    described = {
        resolve(m["payload"])["properties"]["type"]["const"] for m in messages(SPEC["channels"]["/ws"]["subscribe"])
    }
    sent = sent_types()
    assert {"auth_ok", "snapshot", "resumed", "update", "alert", "error", "ping", "pong"} <= sent
    assert sent <= described, sent - described


def test_every_error_code_the_server_sends_is_described() -> None:
    codes = set()
    for path in SERVER_SOURCES:
        codes |= set(re.findall(r'error\(\s*"([a-z_]+)"', path.read_text(encoding="utf-8")))
    (error,) = [m for m in messages(SPEC["channels"]["/ws"]["subscribe"]) if m["name"] == "error"]
    assert codes and codes <= set(error["payload"]["properties"]["code"]["enum"]), codes


def test_every_close_code_is_described() -> None:
    description = SPEC["channels"]["/ws"]["description"]
    for code in (ws.CLOSE_UNAUTHORIZED, ws.CLOSE_ORIGIN, ws.CLOSE_POLICY, ws.CLOSE_TOO_BIG, broadcaster.CLOSE_TOO_SLOW):
        assert str(code) in description, code


def test_client_messages_cover_what_the_server_handles() -> None:
    described = {
        resolve(m["payload"])["properties"]["type"]["const"] for m in messages(SPEC["channels"]["/ws"]["publish"])
    }
    handled = set(re.findall(r'kind == "([a-z_]+)"', (ROOT / "api" / "ws" / "commands.py").read_text(encoding="utf-8")))
    assert handled == described
