"""Reports: the numbers equal the KPIs' month-to-date values at the month's end, from the database and from
an events file; the scheduled run stores the same documents each time; the API keeps a commune to its own."""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openpyxl
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import create_token
from ioc.registry import Registry, load_registry
from ioc.settings import Settings
from reports.document import make_documents
from reports.pdf import number
from reports.period import Period
from reports.render import render
from reports.source import engine_from_events
from reports.store import from_database, listing, run_scheduled, stored
from streams.engine import KINDS, Engine
from streams.replay import replay
from streams.sink import take_changes, write_changes
from streams.windows import TZ
from tests.report_month import month_events

pytestmark = pytest.mark.integration
PERIOD = Period.parse("2026-10")
SCOPES = ["province", "commune:17935", "commune:16681", "agency:000.00.01.H40"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return load_registry()


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six weeks of events around October 2026: the month, part of the one before, three days after."""
    path = tmp_path_factory.mktemp("report") / "month.jsonl"
    month_events(path, dt.datetime(2026, 9, 20, tzinfo=TZ), dt.datetime(2026, 11, 3, tzinfo=TZ))
    return path


@pytest.fixture(scope="module")
def kpis(events: Path, registry: Registry) -> dict[tuple[str, str, str], Any]:
    """What the KPIs show at the month's last instant (`ioc replay --until`)."""
    until = dt.datetime.fromtimestamp(PERIOD.as_of_us / 1e6, TZ)
    snapshots, _, _ = replay(events, registry, until, with_alerts=False)
    return {(s.kpi, s.scope, s.window): s for s in snapshots}


@pytest.fixture(scope="module")
def from_events(events: Path, registry: Registry) -> list[dict[str, Any]]:
    engine, counts = engine_from_events(events, registry, PERIOD.as_of_us)
    assert counts["after"] > 0  # the file reaches past the month: the cut is exercised
    return make_documents(engine, registry, PERIOD, SCOPES, "events:month.jsonl")


def _into_database(events: Path, registry: Registry, url: str) -> None:
    """Every event of the file (also those after the month) through the engine into the state tables, as the worker writes them."""
    engine = Engine(registry, 0)
    with events.open("rb") as fh:
        for line in fh:
            doc = json.loads(line)
            key, p = engine.parse(doc["topic"], json.dumps(doc["value"]).encode())
            engine.apply(doc["topic"], key, p)
    assert set(KINDS) >= {doc["topic"]}
    with psycopg.connect(url) as conn:
        write_changes(conn, take_changes(engine))


@pytest.fixture
def loaded(events: Path, registry: Registry, database_url: str) -> str:
    _into_database(events, registry, database_url)
    return database_url


def _escalated_after(events: Path, as_of_us: int) -> int:
    """Incidents whose severity an event after the period raised (a stored state keeps only the highest)."""
    n = set()
    for line in events.open(encoding="utf-8"):
        doc = json.loads(line)
        v = doc["value"]
        if doc["topic"] == "ioc.cyber.incidents" and v["type"] != "detected" and v.get("severity"):
            t = dt.datetime.fromisoformat(v["occurred_at"]).timestamp() * 1e6
            if t > as_of_us:
                n.add(v["incident_id"])
    return len(n)


def test_report_from_events_equals_the_kpis_month_to_date_values(
    from_events: list[dict[str, Any]], kpis: dict[tuple[str, str, str], Any]
) -> None:
    compared = 0
    for doc in from_events:
        for ind in doc["indicators"]:
            snap = kpis.get((ind["kpi"], doc["scope"], ind["window"]))
            if snap is None:  # a scope without any dossier publishes nothing
                assert ind["value"] in (None, 0.0), (doc["scope"], ind)
                continue
            assert (ind["value"], ind["numerator"], ind["denominator"]) == (
                snap.value,
                snap.numerator,
                snap.denominator,
            ), (doc["scope"], ind["kpi"])
            assert ind["status"] == snap.status
            compared += 1
        progress = doc["score_766"]["groups"][0]
        snap = kpis.get(("dossier.progress_index", doc["scope"], "mtd"))
        if snap is not None:
            assert progress["rates"][0] == snap.value
    province = from_events[0]
    assert province["indicators"][0]["value"] > 1000
    for kpi, key in (("cyber.mtta_minutes", "mtta_minutes"), ("cyber.mttr_minutes", "mttr_minutes")):
        assert province["cyber"][key] == kpis[(kpi, "province", "mtd")].value
    assert province["cyber"]["detected"] == sum(province["cyber"]["by_severity"].values()) > 0
    assert compared > 30


def test_report_from_the_database_equals_the_report_from_events(
    loaded: str, registry: Registry, events: Path, from_events: list[dict[str, Any]]
) -> None:
    with psycopg.connect(loaded) as conn:
        docs = from_database(conn, registry, PERIOD, SCOPES)
    escalated = _escalated_after(events, PERIOD.as_of_us)
    for db, ev in zip(docs, from_events, strict=True):
        assert db["source"] == "database"
        for key in ("indicators", "score_766", "ranking"):
            assert db[key] == ev[key], (db["scope"], key)
        assert {k: v for k, v in db["environment"].items()} == ev["environment"] or db["scope"].startswith("agency")
        db_c, ev_c = dict(db["cyber"]), dict(ev["cyber"])
        # A severity raised after the month is all a stored state knows (docs/reports.md): at most that many move.
        moved = sum(abs(db_c["by_severity"][s] - ev_c["by_severity"][s]) for s in ev_c["by_severity"]) // 2
        assert moved <= escalated
        for c in (db_c, ev_c):
            c.pop("by_severity")
            for o in c["past_reporting_deadline"]:
                o.pop("severity")
        assert db_c == ev_c


def test_scheduled_run_stores_province_and_every_commune_and_a_rerun_gives_the_same(
    loaded: str, registry: Registry
) -> None:
    now = dt.datetime(2026, 11, 1, 0, 30, tzinfo=TZ)
    with psycopg.connect(loaded) as conn:
        first = run_scheduled(conn, registry, now)
        assert {d["period"] for d in first} == {"2026-10"}
        assert len(first) == 1 + len(registry.units)
        again = run_scheduled(conn, registry, now + dt.timedelta(hours=5))
        assert again == first
        assert stored(conn, "2026-10", "commune:17935") == json.loads(
            json.dumps(first[1 + sorted(registry.units).index("17935")])
        )
        assert len(listing(conn)) == len(first)
        assert [r["scope"] for r in listing(conn, "17935")] == ["commune:17935"]


def test_formats_open_and_show_the_figures(from_events: list[dict[str, Any]], tmp_path: Path) -> None:
    doc = from_events[0]
    wb = openpyxl.load_workbook(io.BytesIO(render(doc, "xlsx", "vi")))
    ws = wb["Chỉ tiêu"]
    rows = {r[0].value: r for r in ws.iter_rows(min_row=2)}
    received = rows["dossier.received"][2]
    assert received.data_type == "n" and received.value == doc["indicators"][0]["value"]
    assert (
        isinstance(rows["dossier.online_rate"][2].value, float)
        and rows["dossier.online_rate"][2].number_format == "#,##0.00"
    )
    assert wb["QĐ 766"]["D2"].value == doc["score_766"]["groups"][0]["score"]

    data = render(doc, "csv", "vi")
    assert data.startswith(b"\xef\xbb\xbf")
    assert "Tỷ lệ hồ sơ trực tuyến" in data.decode("utf-8-sig")

    pdf = tmp_path / "r.pdf"
    pdf.write_bytes(render(doc, "pdf", "vi"))
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, check=True, text=True).stdout
    for phrase in ("BÁO CÁO THÁNG 2026-10", "Tỉnh Nghệ An", "Tiến độ giải quyết", "Tỷ lệ thanh toán trực tuyến",
                   "An toàn thông tin mạng", "Số ngày theo mức VN_AQI"):  # fmt: skip
        assert phrase in text, phrase
    for ind in doc["indicators"]:
        digits = 0 if ind["unit"] == "dossiers" else 2
        assert number(ind["value"], "vi", digits) in text, ind["kpi"]
    assert number(doc["score_766"]["total"], "vi") in text
    fonts = subprocess.run(["pdffonts", str(pdf)], capture_output=True, check=True, text=True).stdout
    assert "DejaVu" in fonts and all(line.split()[-5] == "yes" for line in fonts.splitlines()[2:])  # emb column
    en = tmp_path / "en.pdf"
    en.write_bytes(render(doc, "pdf", "en"))
    assert (
        "MONTHLY REPORT 2026-10" in subprocess.run(["pdftotext", str(en), "-"], capture_output=True, text=True).stdout
    )


@pytest.fixture
def api(loaded: str, make_settings: Callable[..., Settings]) -> Iterator[tuple[TestClient, Settings]]:
    settings = make_settings(kafka_bootstrap="127.0.0.1:1", database_url=loaded)
    with psycopg.connect(loaded) as conn:
        run_scheduled(conn, load_registry(), dt.datetime(2026, 11, 1, 0, 30, tzinfo=TZ))
    with TestClient(create_app(settings, connect=False)) as client:
        yield client, settings


def _auth(settings: Settings, role: str, commune: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(settings, role, commune=commune)}"}


def test_report_endpoints_keep_a_commune_to_its_own(api: tuple[TestClient, Settings]) -> None:
    client, settings = api
    own = _auth(settings, "commune", "17935")
    r = client.get("/api/reports/2026-10", params={"scope": "commune:17935", "format": "pdf"}, headers=own)
    assert r.status_code == 200 and r.content.startswith(b"%PDF")
    r = client.get("/api/reports/2026-10", params={"scope": "commune:17935", "format": "json"}, headers=own)
    assert r.json()["scope"] == "commune:17935"
    for scope in ("commune:16681", "province"):
        r = client.get("/api/reports/2026-10", params={"scope": scope, "format": "json"}, headers=own)
        assert r.status_code == 403, scope
    assert [i["scope"] for i in client.get("/api/reports", headers=own).json()["items"]] == ["commune:17935"]
    assert client.get("/api/reports", headers=_auth(settings, "security")).status_code == 403
    assert client.get("/api/reports/2026-10", headers=_auth(settings, "security")).status_code == 403
    op = _auth(settings, "operator")
    assert client.get("/api/reports", headers=op).json()["count"] == 131
    r = client.get("/api/reports/2026-10", params={"format": "xlsx"}, headers=op)
    assert r.status_code == 200 and r.content[:2] == b"PK"
    assert client.get("/api/reports/2026-13", headers=op).status_code == 400
    assert client.get("/api/reports/2026-10", params={"scope": "commune:99999"}, headers=op).status_code == 400
    assert client.get("/api/reports/2026-10").status_code == 401


def _ioc(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


def test_ioc_report_writes_the_files_and_refuses_bad_input_with_a_reason(
    events: Path, from_events: list[dict[str, Any]], tmp_path: Path
) -> None:
    r = _ioc("--month", "2026-10", "--from-events", str(events), "--format", "json", "--out", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert doc["indicators"] == from_events[0]["indicators"]
    r = _ioc("--month", "2026-10", "--scope", "commune:17935", "--from-events", str(events), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bao-cao-2026-10-commune-17935.pdf").read_bytes().startswith(b"%PDF")
    for bad, reason in (
        (["--month", "2026-13"], "neither a month"),
        (["--month", "2026-10", "--scope", "commune:00000"], "known commune"),
        (["--month", "2026-10", "--out", "x.docx"], "--format"),
        (["--scope", "province"], "give --month"),
    ):
        r = _ioc(*bad, "--from-events", str(events), cwd=tmp_path)
        assert r.returncode == 2 and reason in r.stderr, (bad, r.stderr)


def test_a_quarter_is_the_sum_of_its_months(events: Path, registry: Registry) -> None:
    def received(label: str) -> tuple[float, float]:
        p = Period.parse(label)
        engine, _ = engine_from_events(events, registry, p.as_of_us)
        doc = make_documents(engine, registry, p, ["province"], "events")[0]
        values = {i["kpi"]: i["value"] for i in doc["indicators"]}
        return values["dossier.received"], values["dossier.completed"]

    months = [received(m) for m in ("2026-10", "2026-11", "2026-12")]
    assert received("2026-Q4") == (sum(m[0] for m in months), sum(m[1] for m in months))
    assert months[1][0] > 0  # the file's three days of November count in the quarter
