"""Checks of the Kubernetes manifests under deploy/k8s that run without a cluster.

* Every YAML file loads; every kustomization lists exactly the files of its folder.
* The base and both overlays are rendered with `kubectl kustomize` (kustomize built into kubectl)
  or a standalone `kustomize`, when installed; without either, the base is checked file by file
  and the overlays are skipped.
* The rendered objects are checked structurally: names, selectors against pod labels, probes
  against declared ports, environment variables against the settings class, Secret and
  ConfigMap references, PDB/HPA/Service/Ingress targets, security contexts and resources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ioc.settings import Mode, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "production": K8S / "overlays" / "production"}
KUSTOMIZATION = "kustomization.yaml"

#: Environment variables that are not IOC_* settings but are read by libraries in the image.
NON_SETTINGS_ENV = {
    "PGPASSWORD": "libpq: the database password (kept out of IOC_DATABASE_URL)",
    "TZ": "the C library's time zone",
    "FORWARDED_ALLOW_IPS": "uvicorn: proxies trusted for X-Forwarded-*",
}
IOC_SUBCOMMANDS = {("db", "migrate"), ("worker",), ("api",), ("topics", "create"), ("report", "--scheduled")}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
TEMPLATE_SECRET = "ioc-secrets"


# --- helpers ------------------------------------------------------------------------------------


def setting_env_names() -> set[str]:
    return {f"IOC_{name.upper()}" for name in Settings.model_fields}


def kustomize_cli() -> list[str] | None:
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    return None


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def render(folder: Path) -> list[dict[str, Any]]:
    cli = kustomize_cli()
    if cli is None:
        if folder != BASE:
            pytest.skip("neither kubectl nor kustomize installed: overlays not rendered")
        kust = yaml.safe_load((BASE / KUSTOMIZATION).read_text())
        docs = [d for res in kust["resources"] for d in load_docs(BASE / res)]
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
        return docs
    result = subprocess.run([*cli, str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(kind/name, pod template metadata, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            tpl = d["spec"]["template"]
            yield f"{d['kind']}/{d['metadata']['name']}", tpl.get("metadata", {}), tpl["spec"]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def config_data(docs: list[dict[str, Any]], name: str = "ioc-config") -> dict[str, str]:
    return by_kind(docs, "ConfigMap")[name]["data"]


def template_secret_keys() -> set[str]:
    secret = next(d for d in load_docs(BASE / "secret.yaml") if d["kind"] == "Secret")
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    folder = BASE if request.param == "base" else OVERLAYS[request.param]
    return request.param, render(folder)


# --- files --------------------------------------------------------------------------------------


def test_every_yaml_file_loads_and_names_its_objects() -> None:
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 15
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            if path.name == KUSTOMIZATION:
                assert doc["kind"] == "Kustomization", path
                assert doc["apiVersion"].startswith("kustomize.config.k8s.io/"), path
                continue
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion/kind missing"
            assert (doc.get("metadata") or {}).get("name"), f"{path}: metadata.name missing"


def kustomize_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob(KUSTOMIZATION))


@pytest.mark.parametrize("folder", kustomize_dirs(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_lists_exactly_the_files_present(folder: Path) -> None:
    kust = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    listed: set[str] = set()
    for res in kust.get("resources", []):
        target = (folder / res).resolve()
        assert target.exists(), f"{folder}: resource {res} does not exist"
        if target.is_dir():
            assert (target / KUSTOMIZATION).is_file(), f"{folder}: {res} is not a kustomization"
        else:
            listed.add(res)
    for patch in kust.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).is_file(), f"{folder}: patch {patch['path']} missing"
            listed.add(patch["path"])
        else:
            assert "patch" in patch and "target" in patch, patch
    present = {p.name for p in folder.glob("*.yaml") if p.name != KUSTOMIZATION}
    assert listed == present, f"{folder}: listed but absent {listed - present}, present but unlisted {present - listed}"


def test_overlays_use_the_base_and_pin_the_image() -> None:
    for name, folder in OVERLAYS.items():
        kust = yaml.safe_load((folder / KUSTOMIZATION).read_text())
        assert "../../base" in kust["resources"], name
        images = {i["name"]: i for i in kust.get("images", [])}
        assert "ioc-nghean" in images and images["ioc-nghean"].get("newTag"), name
    prod = yaml.safe_load((OVERLAYS["production"] / KUSTOMIZATION).read_text())
    tag = {i["name"]: i for i in prod["images"]}["ioc-nghean"]["newTag"]
    assert tag not in ("latest", "local"), "production pins a release tag"


def test_template_secret_holds_no_usable_secret() -> None:
    secret = next(d for d in load_docs(BASE / "secret.yaml") if d["kind"] == "Secret")
    assert "data" not in secret, "base64 data in git looks like a real secret"
    keys = template_secret_keys()
    assert keys == {"IOC_SIGNING_KEY", "PGPASSWORD", "IOC_SIGNING_KEYS_PREVIOUS"}
    for key, value in secret["stringData"].items():
        if key == "IOC_SIGNING_KEYS_PREVIOUS":
            assert json.loads(value) == {}, "no retired key in git either"
            continue
        assert len(value) < 32 and "REPLACE" in value, f"{key}: a placeholder, never a real value"
    # fail closed: a pod that got the placeholder refuses to start in production
    with pytest.raises(Exception, match="IOC_SIGNING_KEY"):
        Settings(_env_file=None, mode=Mode.PRODUCTION, signing_key=secret["stringData"]["IOC_SIGNING_KEY"])


# --- rendered objects ---------------------------------------------------------------------------


def test_rendering_names_every_object_in_one_namespace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    assert len(namespaces) == 1, name
    seen: set[tuple[str, str]] = set()
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), d
        key = (d["kind"], d["metadata"]["name"])
        assert key not in seen, f"{name}: duplicate {key}"
        seen.add(key)
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"].get("namespace") == namespaces[0], f"{name}: {key} outside {namespaces[0]}"
    labels = by_kind(docs, "Namespace")[namespaces[0]]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    expected_kinds = {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
    }
    assert expected_kinds <= {d["kind"] for d in docs}, name


def test_overlays_never_ship_the_template_secret(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    secrets = by_kind(docs, "Secret")
    if name == "base":
        assert TEMPLATE_SECRET in secrets
    else:
        assert TEMPLATE_SECRET not in secrets, f"{name}: `kubectl apply -k` would overwrite the real secret"


def test_selectors_match_pod_labels(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for d in docs:
        if d["kind"] == "Deployment":
            selector = d["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert matches(selector, labels), f"Deployment/{d['metadata']['name']}: selector {selector} vs {labels}"


def test_containers_are_hardened_and_sized(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    for what, _, spec in pod_specs(docs):
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, what
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", what
        assert spec.get("automountServiceAccountToken") is False, what
        assert spec.get("serviceAccountName") in by_kind(docs, "ServiceAccount"), what
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            where = f"{name}: {what}/{c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{where}: {kind}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= volumes, f"{where}: mounts undeclared volumes {mounts - volumes}"
            assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{where}: /tmp not writable"
            assert c["image"].split("/")[-1].split(":")[0] == "ioc-nghean", where
            args = c.get("args") or c.get("command")
            assert args[0] == "ioc" and any(tuple(args[1 : 1 + len(s)]) == s for s in IOC_SUBCOMMANDS), where


def test_probes_point_at_declared_ports(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for what, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            numbers = set(ports.values())
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_name)
                if probe is None:
                    continue
                handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                assert handler, f"{what}: {probe_name} has no port-based handler"
                port = handler["port"]
                assert port in ports or port in numbers, f"{what}: {probe_name} port {port} not declared"


def test_env_vars_are_real_settings(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    known = setting_env_names() | set(NON_SETTINGS_ENV)
    configmaps = by_kind(docs, "ConfigMap")
    for cm_name, cm in configmaps.items():
        unknown = set(cm.get("data") or {}) - known
        assert not unknown, f"{name}: ConfigMap/{cm_name} has keys that no component reads: {unknown}"
    secret_keys = template_secret_keys()
    for what, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            for env in c.get("env", []):
                assert env["name"] in known, f"{what}: env {env['name']} is not a setting"
                ref = env.get("valueFrom") or {}
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["name"] == TEMPLATE_SECRET and r["key"] in secret_keys, f"{what}: {r}"
                    assert env["name"] == r["key"], f"{what}: {env['name']} from {r['key']}"
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in configmaps[r["name"]]["data"], f"{what}: {r}"
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, what
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == TEMPLATE_SECRET, what
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{what}: duplicate env"
            # every container runs in production mode and so needs the signing key
            assert "IOC_SIGNING_KEY" in names, what


def test_configmap_values_are_valid_settings(
    rendered: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, docs = rendered
    data = config_data(docs)
    for key in list(os.environ):
        if key.startswith("IOC_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IOC_SIGNING_KEY", "k" * 40)
    settings = Settings(_env_file=None)
    assert settings.mode is Mode.PRODUCTION, name
    assert settings.api_host == "0.0.0.0"
    assert "@" in settings.database_url and ":" not in settings.database_url.split("//", 1)[1].split("@")[0], (
        "no password in IOC_DATABASE_URL: it comes from PGPASSWORD"
    )
    if name != "dev":
        assert settings.topic_replication == 3
    workers = by_kind(docs, "Deployment")["ioc-worker"]["spec"]["replicas"]
    assert settings.topic_partitions >= workers


def test_worker_deployment(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    worker = by_kind(docs, "Deployment")["ioc-worker"]
    # several workers in one consumer group (docs/scaling.md); a rollout never loses one first
    assert worker["spec"]["replicas"] >= 2
    assert worker["spec"]["strategy"]["type"] == "RollingUpdate"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (pdb,) = [p for p in by_kind(docs, "PodDisruptionBudget").values() if p["metadata"]["name"] == "ioc-worker"]
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    (c,) = worker["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["ioc", "worker"]
    port = int(config_data(docs)["IOC_WORKER_METRICS_PORT"])
    assert port == Settings.model_fields["worker_metrics_port"].default
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": port}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/metrics", probe
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_api_deployment(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    api = by_kind(docs, "Deployment")["ioc-api"]
    assert api["spec"]["replicas"] >= (1 if name == "dev" else 2)
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (c,) = api["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["ioc", "api"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(config_data(docs)["IOC_API_PORT"])}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_services_select_pods_and_target_their_ports(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    pods = [(meta.get("labels") or {}, spec) for what, meta, spec in pod_specs(docs) if what.startswith("Deployment/")]
    for svc_name, svc in by_kind(docs, "Service").items():
        selected = [spec for labels, spec in pods if matches(svc["spec"]["selector"], labels)]
        assert selected, f"Service/{svc_name} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for spec in selected:
                declared = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])} | {
                    p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])
                }
                assert target in declared, f"Service/{svc_name}: targetPort {target} not declared"


def test_pdbs_and_hpa_target_existing_deployments(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    deployments = by_kind(docs, "Deployment")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    covered = set()
    for pdb_name, pdb in pdbs.items():
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), pdb_name
        hits = [
            d
            for d, dep in deployments.items()
            if matches(spec["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
        ]
        assert hits, f"PodDisruptionBudget/{pdb_name} selects no Deployment"
        covered.update(hits)
        for d in hits:
            if "minAvailable" in spec:
                assert spec["minAvailable"] < deployments[d]["spec"]["replicas"] or spec["minAvailable"] == 0, (
                    f"{name}: PDB {pdb_name} would block every drain of {d}"
                )
    assert covered == {"ioc-api", "ioc-worker"}
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"ioc-api"}
    hpa = hpas["ioc-api"]
    ref = hpa["spec"]["scaleTargetRef"]
    assert ref["kind"] == "Deployment" and ref["name"] in deployments
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] >= (1 if name == "dev" else 2)
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])


def test_ingress_tls_websockets_and_backends(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    services = by_kind(docs, "Service")
    ingresses = by_kind(docs, "Ingress")
    main = ingresses["ioc-api"]
    ann = main["metadata"]["annotations"]
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(ann["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert ann["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert ann["nginx.ingress.kubernetes.io/ssl-redirect"] == "true"
    for ing_name, ing in ingresses.items():
        tls_hosts = {h for t in ing["spec"]["tls"] for h in t["hosts"]}
        assert all(t.get("secretName") for t in ing["spec"]["tls"]), ing_name
        for rule in ing["spec"]["rules"]:
            assert rule["host"] in tls_hosts, f"Ingress/{ing_name}: {rule['host']} without TLS"
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] in services, f"Ingress/{ing_name}: no Service {backend['name']}"
                port_names = {p.get("name") for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"].get("name") in port_names or "number" in backend["port"], ing_name
    deny = ingresses["ioc-api-metrics-deny"]
    assert deny["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/metrics"
    assert deny["metadata"]["annotations"]["nginx.ingress.kubernetes.io/denylist-source-range"] == "0.0.0.0/0,::/0"


def test_jobs_run_migrate_and_topics(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    jobs = by_kind(docs, "Job")
    commands = {n: j["spec"]["template"]["spec"]["containers"][0]["args"] for n, j in jobs.items()}
    assert commands == {
        "ioc-db-migrate": ["ioc", "db", "migrate"],
        "ioc-topics-create": ["ioc", "topics", "create"],
    }
    for n, job in jobs.items():
        assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never"), n
        assert job["spec"].get("backoffLimit", 6) >= 1, n
        assert job["spec"].get("ttlSecondsAfterFinished") is not None, f"{n}: an immutable Job blocks re-apply"


def test_network_policies_select_existing_pods(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    labels = [meta.get("labels") or {} for _, meta, _ in pod_specs(docs)]
    for np_name, np in by_kind(docs, "NetworkPolicy").items():
        selector = np["spec"]["podSelector"]["matchLabels"]
        assert any(matches(selector, lab) for lab in labels), f"NetworkPolicy/{np_name} selects no pods"


def test_overlay_specifics() -> None:
    if kustomize_cli() is None:
        pytest.skip("neither kubectl nor kustomize installed")
    dev = render(OVERLAYS["dev"])
    assert {d["metadata"]["name"] for d in dev if d["kind"] == "Namespace"} == {"ioc-dev"}
    prod = render(OVERLAYS["production"])
    image = by_kind(prod, "Deployment")["ioc-api"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "/" in image and image.rsplit(":", 1)[1] not in ("latest", "local"), image
    worker = by_kind(prod, "Deployment")["ioc-worker"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["memory"] == "4Gi"
