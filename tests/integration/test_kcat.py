"""A standard Kafka client (Debian's `kcat`, librdkafka) against the running stack: produce, KPIs, output topics."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from api.auth import create_token
from ioc.settings import TOPIC_DEADLETTER, TOPIC_DOSSIER, TOPIC_KPI, Settings

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("kcat") is None, reason="needs kcat (Debian package `kcat`; scripts/setup installs it)"
    ),
]

KCAT = "kcat"
TZ = dt.timezone(dt.timedelta(hours=7))
#: Fields of a dead-lettered record (CONTRACT §1): its reason and where it came from.
DEADLETTER_HEADERS = (
    "ioc.error.stage",
    "ioc.error.reason",
    "ioc.source.topic",
    "ioc.source.partition",
    "ioc.source.offset",
)
#: A separator no record contains, between the fields kcat prints for each message.
SEP = "\x1e"


def kcat(settings: Settings, *args: str, stdin: bytes | None = None, timeout: float = 30) -> str:
    """Run kcat against the stack's broker; its stdout (fails the test on a non-zero exit)."""
    result = subprocess.run(
        [KCAT, "-b", settings.kafka_bootstrap, *args], input=stdin, capture_output=True, timeout=timeout
    )
    assert result.returncode == 0, f"kcat {' '.join(args)} failed: {result.stderr.decode(errors='replace')}"
    return result.stdout.decode()


def read_all(settings: Settings, topic: str) -> list[tuple[str, dict[str, str], str]]:
    """Every record of ``topic`` as (key, headers, value), read with kcat from the beginning to the end."""
    out = kcat(settings, "-C", "-t", topic, "-o", "beginning", "-e", "-q", "-f", f"%k{SEP}%h{SEP}%s{SEP}\n")
    records = []
    for chunk in out.split(f"{SEP}\n"):
        if not chunk:
            continue
        key, headers, value = chunk.split(SEP)
        # %h prints name=value pairs separated by commas; a reason may hold commas, a name starts "ioc.".
        pairs = dict(h.split("=", 1) for h in re.split(r",(?=ioc\.)", headers) if h)
        records.append((key, pairs, value))
    return records


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.5)


def dossier(dossier_id: str, now: dt.datetime) -> dict[str, Any]:
    return {
        "schema": "ioc.dossier.v1",
        "event_id": f"{dossier_id}-received",
        "dossier_id": dossier_id,
        "type": "received",
        "occurred_at": now.isoformat(),
        "commune_code": "17935",
        "agency_code": "000.23.71.H40",
        "procedure_code": "1.004227",
        "channel": "online",
        "full_online": True,
        "due_at": (now + dt.timedelta(days=5)).isoformat(),
    }


def test_kcat_produces_into_the_stack_and_reads_the_kpi_updates_and_dead_letters(
    system: Settings,
) -> None:
    settings = system
    listed = kcat(settings, "-L")
    for name in (TOPIC_DOSSIER, TOPIC_KPI, TOPIC_DEADLETTER):
        assert f'topic "{settings.topic(name)}"' in listed

    # Three valid dossiers and two invalid records, produced by librdkafka with their keys.
    now = dt.datetime.now(TZ).replace(microsecond=0)
    tag = uuid.uuid4().hex[:8]
    valid = [(f"kcat-{tag}-{i}", json.dumps(dossier(f"kcat-{tag}-{i}", now))) for i in range(3)]
    invalid = [
        (f"kcat-{tag}-bad-json", "{not json"),
        (f"kcat-{tag}-bad-type", json.dumps({**dossier(f"kcat-{tag}-x", now), "type": "teleported"})),
    ]
    lines = "".join(f"{key}\t{value}\n" for key, value in valid + invalid).encode()
    kcat(settings, "-P", "-t", settings.topic(TOPIC_DOSSIER), "-K", "\t", stdin=lines)

    # The KPIs move: three dossiers received today in the province and in their commune.
    token = create_token(settings, "operator", subject="kcat-test")

    def received(scope: str) -> float | None:
        r = httpx.get(
            f"http://127.0.0.1:{settings.api_port}/api/kpis",
            params={"kpi": "dossier.received", "scope": scope},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text
        return next((i["value"] for i in r.json()["items"] if i["window"] == "today"), None)

    wait_for("dossier.received today = 3 in the province", lambda: received("province") == 3)
    assert received("commune:17935") == 3

    # ioc.kpi.updates, read by kcat: the same value, keyed kpi|scope|window.
    def published() -> list[dict[str, Any]]:
        return [
            json.loads(value)
            for key, _, value in read_all(settings, settings.topic(TOPIC_KPI))
            if key == "dossier.received|province|today"
        ]

    updates = wait_for("the update in ioc.kpi.updates", lambda: [u for u in published() if u["value"] == 3])
    assert {(u["kpi"], u["scope"], u["window"]) for u in updates} == {("dossier.received", "province", "today")}

    # ioc.deadletter, read by kcat: each invalid record, its key and bytes unchanged, with its reason.
    def dead() -> dict[str, tuple[dict[str, str], str]]:
        return {key: (headers, value) for key, headers, value in read_all(settings, settings.topic(TOPIC_DEADLETTER))}

    letters = wait_for("both dead letters", lambda: (d := dead()) and all(k in d for k, _ in invalid) and d)
    assert not any(key in letters for key, _ in valid)
    for key, value in invalid:
        headers, body = letters[key]
        assert body == value
        assert set(DEADLETTER_HEADERS) <= set(headers), headers
        assert headers["ioc.source.topic"] == settings.topic(TOPIC_DOSSIER)
        assert headers["ioc.error.reason"]
        assert int(headers["ioc.source.offset"]) >= 0
