"""Killing and restarting the API: the wall page notices, reconnects by itself, and shows the data it
could not replay was reloaded (`recovered: false`), then keeps updating."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from api.auth import create_token
from entrypoints.embedded.broker import ensure_topics
from ioc.settings import Settings
from simulators.producer import run as simulate
from tests.integration.conftest import env_for, free_port
from tests.integration.test_wall_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def _start_api(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "api"], env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "API did not start"
        time.sleep(0.2)


async def test_wall_reconnects_after_the_api_is_killed_and_restarted(make_settings: Callable[..., Settings]) -> None:
    from playwright.async_api import async_playwright

    settings = make_settings(api_port=free_port())
    ensure_topics(settings)
    env = env_for(settings)
    worker = subprocess.Popen([sys.executable, "-m", "entrypoints.cli", "worker"], env=env, stdin=subprocess.DEVNULL)
    api = _start_api(env, settings.api_port)
    sim = asyncio.create_task(simulate(settings, rate=100, duration=40, seed=21, progress=False))
    token = create_token(settings, "operator", subject="reconnect-test")
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            await page.wait_for_function(
                """() => !['—', '0'].includes(document.querySelector('[data-tile="received"] .value').textContent)""",
                timeout=40_000,
            )
            api.kill()
            api.wait()
            await page.wait_for_selector("#conn.conn-off", timeout=15_000)  # the page shows it is disconnected
            before = await page.inner_text('[data-tile="received"] .value')
            api = _start_api(env, settings.api_port)
            await page.wait_for_selector("#conn.conn-on", timeout=40_000)  # reconnected by itself
            # The new process cannot replay what the old one sent: a fresh snapshot, said so on screen.
            await page.wait_for_function(
                "() => document.querySelector('#notice').textContent.includes('Đã tải lại toàn bộ số liệu')",
                timeout=10_000,
            )
            assert not await page.is_hidden("#notice")
            await page.wait_for_function(
                f"""() => document.querySelector('[data-tile="received"] .value').textContent !== {before!r}""",
                timeout=30_000,
            )
            await browser.close()
    finally:
        sim.cancel()
        # Awaited, so its producer stops inside this test: left pending, its sender task is destroyed
        # later and logged in whichever test runs then (test_isolation_random counts such errors).
        with contextlib.suppress(asyncio.CancelledError):
            await sim
        for p in (api, worker):
            p.terminate()
        for p in (api, worker):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
