"""The `ioc` commands as an operator types them: token create, db migrate, topics create, bad input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from api.auth import verify_token
from ioc.settings import Settings
from tests.integration.conftest import env_for

pytestmark = pytest.mark.integration


def ioc(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ioc.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_token_create_prints_only_a_token_that_verifies(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    env = env_for(settings)
    out = ioc(env, "token", "create", "--role", "commune", "--commune", "17935", "--ttl", "2h")
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert "\n" not in token and token.count(".") == 2
    principal = verify_token(settings, token)
    assert (principal.role, principal.commune) == ("commune", "17935")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("token", "create", "--role", "commune"), "commune"),
        (("token", "create", "--role", "commune", "--commune", "99999"), "99999"),
        (("token", "create", "--role", "operator", "--ttl", "forever"), "duration"),
        (("replay", "/nonexistent/file.jsonl"), "file.jsonl"),
    ],
)
def test_bad_input_gets_a_clear_error_and_a_non_zero_exit(
    make_settings: Callable[..., Settings], args: tuple[str, ...], message: str
) -> None:
    out = ioc(env_for(make_settings()), *args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_db_migrate_and_topics_create_are_idempotent(make_settings: Callable[..., Settings]) -> None:
    env = env_for(make_settings())
    for _ in range(2):
        migrated = ioc(env, "db", "migrate")
        assert migrated.returncode == 0 and "migrated (postgresql)" in migrated.stdout, migrated.stderr
        topics = ioc(env, "topics", "create")
        assert topics.returncode == 0, topics.stderr


def test_production_mode_refuses_the_development_key(make_settings: Callable[..., Settings]) -> None:
    env = {**env_for(make_settings()), "IOC_MODE": "production", "IOC_SIGNING_KEY": ""}
    out = ioc(env, "token", "create", "--role", "operator")
    assert out.returncode != 0 and "IOC_SIGNING_KEY" in out.stderr
    assert out.stdout == ""


def test_worker_writes_no_terminal_codes_to_a_piped_stdout(make_settings: Callable[..., Settings]) -> None:
    """`ioc worker` under a supervisor or `ioc bench`: stdout is a pipe, so nothing meant for a terminal."""
    import asyncio
    import datetime as dt
    import signal
    import time

    import httpx

    from ioc.embedded.broker import ensure_topics
    from simulators.stream import generate
    from tests.integration import checks
    from tests.integration.conftest import free_port

    settings = make_settings()
    ensure_topics(settings)
    now = dt.datetime.now(dt.UTC)
    asyncio.run(checks.produce(settings, list(generate(3, now - dt.timedelta(seconds=30), 1.0, None, until=now))))
    port = free_port()
    # At WARNING (as `ioc bench` runs it) Faust keeps its spinner; below WARNING it drops it itself.
    env = {**env_for(settings), "IOC_WORKER_METRICS_PORT": str(port), "IOC_LOG_LEVEL": "WARNING"}
    worker = subprocess.Popen([sys.executable, "-m", "ioc.cli", "worker"], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # started and consuming (the spinner's end is written when start-up ends)
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                if any(line.startswith("ioc_records_in_total{") and not line.endswith(" 0.0")
                       for line in text.splitlines()):  # fmt: skip
                    break
            except httpx.HTTPError:
                pass
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.3)
        time.sleep(2)
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
        assert worker.stdout is not None
        worker.stdout.close()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert b"\x1b[" not in out, out[:200]
