"""Schemathesis against the API's own OpenAPI document, on a real socket, backed by a real PostgreSQL and broker.

Every operation, positive and negative data, with an operator token and with a commune token: no 5xx, and
every answer (status, content type, body) is one the document declares.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.auth import create_token
from api.ws.frames import WsLimits
from entrypoints.embedded.broker import ensure_topics
from entrypoints.embedded.postgres import create_database, drop_database
from ioc.db.migrate import migrate
from ioc.settings import Settings
from tests.api_world import World, build_world, write_to_database
from tests.conftest import TEST_SIGNING_KEY
from tests.live_server import LiveServer

pytestmark = [
    pytest.mark.integration,
    # schemathesis draws from the `random` module inside its strategies (Hypothesis seeds it per example)
    pytest.mark.filterwarnings(
        "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning"
    ),
]

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
#: Examples per operation, generation mode and token: 12 operations x 2 x 2 x this.
EXAMPLES = 25


@pytest.fixture(scope="module")
def world() -> World:
    return build_world(seed=6)


@pytest.fixture(scope="module")
def served(postgres_admin_url: str, kafka_bootstrap: str, world: World) -> Iterator[tuple[LiveServer, Settings]]:
    """One database and one API for the whole module (the cases only add silences and acknowledgements)."""
    name = f"ioc_test_{uuid.uuid4().hex[:12]}"
    url = create_database(postgres_admin_url, name)
    prefix = f"t{uuid.uuid4().hex[:8]}."
    try:
        migrate(url)
        write_to_database(world, url)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None, kafka_bootstrap=kafka_bootstrap, database_url=url, topic_prefix=prefix,
            topic_partitions=1, topic_replication=1, consumer_group=f"{prefix}worker", signing_key=TEST_SIGNING_KEY,
        )  # fmt: skip
        ensure_topics(settings)
        with LiveServer(create_app(settings, ws_limits=WsLimits()), settings) as server:
            deadline = time.monotonic() + 30
            while not server.ctx.feed.loaded:  # the current values are in before the first request
                assert time.monotonic() < deadline, "the API never loaded kpi_latest"
                time.sleep(0.05)
            yield server, settings
    finally:
        drop_database(postgres_admin_url, name)


def run_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, session: requests.Session, base_url: str
) -> int:
    calls = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    def check(case: Case) -> None:
        nonlocal calls
        calls += 1
        response = case.call(base_url=base_url, session=session, timeout=15)
        case.validate_response(response, checks=CHECKS)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        # string-only query parameters have no negative form that survives a URL (every value is a string)
        if mode is GenerationMode.POSITIVE:
            raise
    return calls


def has_inputs(operation: schemathesis.APIOperation) -> bool:
    return bool(len(operation.query) or len(operation.path_parameters) or len(operation.body))


def test_every_operation_answers_as_documented_for_operator_and_commune(
    served: tuple[LiveServer, Settings], world: World
) -> None:
    server, settings = served
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    commune = world.alerts[0].commune_code
    assert commune is not None
    tokens = {"operator": create_token(settings, "operator"), "commune": create_token(settings, "commune", commune)}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    calls: dict[str, int] = {}
    for role, token in tokens.items():
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {token}"
            for operation in operations:
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if has_inputs(operation) else 1]:
                    key = f"{role} {operation.label} {mode.value}"
                    calls[key] = run_operation(operation, mode, session, server.http_url)
    total = sum(calls.values())
    print(f"schemathesis: {total} cases over {len(operations)} operations x {len(tokens)} tokens x 2 modes")
    assert total >= len(operations) * len(tokens) * EXAMPLES // 2
    assert server.errors.lines() == []


def test_real_alert_ids_answer_as_documented(served: tuple[LiveServer, Settings], world: World) -> None:
    """Random ids are 404s; the alerts that exist must answer 200, 403 or 409 as documented too."""
    server, settings = served
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    by_label = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    statuses: dict[str, set[int]] = {}
    for role, commune in (("operator", None), ("security", None), ("commune", world.alerts[0].commune_code)):
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {create_token(settings, role, commune)}"
            for alert in world.alerts[:12]:
                for label in ("GET /api/alerts/{alert_id}", "POST /api/alerts/{alert_id}/ack",
                              "POST /api/alerts/{alert_id}/resolve"):  # fmt: skip
                    kwargs: dict[str, Any] = {"path_parameters": {"alert_id": alert.alert_id}}
                    if label.startswith("POST"):
                        kwargs["body"] = {"reason": "đã xử lý"}
                        kwargs["media_type"] = "application/json"
                    case = by_label[label].Case(**kwargs)
                    response = case.call(base_url=server.http_url, session=session, timeout=15)
                    case.validate_response(response, checks=CHECKS)
                    statuses.setdefault(label, set()).add(response.status_code)
    assert {200, 404} <= statuses["GET /api/alerts/{alert_id}"]
    assert {200, 403, 404, 409} <= statuses["POST /api/alerts/{alert_id}/ack"] | statuses[
        "POST /api/alerts/{alert_id}/resolve"
    ]
    assert server.errors.lines() == []


#: Values random generation rarely reaches past the other filters (a NUL needs a valid `window` to reach the
#: database, a far date needs the ISO shape): each once, through the same checks.
HOSTILE: list[tuple[str, dict[str, Any]]] = [
    ("GET /api/alerts/{alert_id}", {"path_parameters": {"alert_id": "a\x00b"}}),
    ("DELETE /api/silences/{silence_id}", {"path_parameters": {"silence_id": "s\x00"}}),
    ("GET /api/alerts", {"query": {"scope": "commune:1\x00"}}),
    ("GET /api/alerts", {"query": {"domain": "\x00", "state": "active"}}),
    ("GET /api/kpis", {"query": {"scope": "province\x00", "kpi": "\x00"}}),
    ("GET /api/kpis/history", {"query": {"kpi": "env.aqi\x00", "scope": "province", "window": "now"}}),
    ("GET /api/kpis/history", {"query": {"kpi": "env.aqi", "scope": "province", "window": "now",
                                         "to": "0001-01-01T00:00:00+00:00"}}),
    ("GET /api/kpis/history", {"query": {"kpi": "env.aqi", "scope": "province", "window": "now",
                                         "from": "9999-12-31T23:00:00-12:00", "to": "9999-12-31T23:59:00-12:00"}}),
    ("GET /api/kpis/history", {"query": {"kpi": "env.aqi", "scope": "province", "window": "now",
                                         "from": "0001-01-01T00:00:00", "to": "0001-01-01T08:00:00"}}),
    ("GET /api/kpis/history", {"query": {"kpi": "env.aqi", "scope": "province", "window": "now", "bucket": "9999d"}}),
    ("POST /api/silences", {"body": {"matchers": {"rule": "env.\x00"}, "duration": "1h", "reason": "x"}}),
    ("POST /api/silences", {"body": {"matchers": {"rule": "env.*"}, "duration": "1h", "reason": "\x00"}}),
    ("POST /api/silences", {"body": {"matchers": {"rule": "\ud800"}, "duration": "1h", "reason": "x"}}),
    ("POST /api/silences", {"body": {"matchers": {"rule": "env.*"}, "duration": "99999999d", "reason": "x"}}),
    ("POST /api/silences", {"body": {"matchers": {"rule": "env.*"}, "starts_at": "9999-12-31T23:00:00",
                                     "duration": "2d", "reason": "x"}}),
    ("POST /api/alerts/{alert_id}/ack", {"path_parameters": {"alert_id": "first"}, "body": {"reason": "\x00"}}),
    ("POST /api/alerts/{alert_id}/ack", {"path_parameters": {"alert_id": "first"}, "body": {"reason": "\udfff"}}),
    ("POST /api/alerts/{alert_id}/resolve", {"path_parameters": {"alert_id": "first"}, "body": {"reason": "a" * 1001}}),
]  # fmt: skip


@pytest.mark.parametrize(("label", "parts"), HOSTILE, ids=[f"{n}-{label}" for n, (label, _) in enumerate(HOSTILE)])
def test_hostile_values_answer_as_documented(
    served: tuple[LiveServer, Settings], world: World, label: str, parts: dict[str, Any]
) -> None:
    server, settings = served
    schema = schemathesis.openapi.from_url(f"{server.http_url}/openapi.json")
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)
    if parts.get("path_parameters", {}).get("alert_id") == "first":
        parts = {**parts, "path_parameters": {"alert_id": world.alerts[0].alert_id}}
    if "body" in parts:
        parts = {**parts, "media_type": "application/json"}
    case = operation.Case(**parts)
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {create_token(settings, 'operator')}"
        response = case.call(base_url=server.http_url, session=session, timeout=15)
    case.validate_response(response, checks=CHECKS)
    assert response.status_code < 500
    assert server.errors.lines() == []
