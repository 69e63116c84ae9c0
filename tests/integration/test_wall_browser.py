"""The wall page in a real headless Chromium, against the live worker and API."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from api.auth import create_token
from ioc.settings import Settings
from simulators.producer import run as simulate

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def _tile(page: object, name: str) -> str:
    return await page.inner_text(f'[data-tile="{name}"] .value')  # type: ignore[attr-defined, no-any-return]


async def test_wall_shows_live_province_kpis_that_change(system: Settings) -> None:
    from playwright.async_api import async_playwright

    settings = system
    token = create_token(settings, "operator", subject="wall-test")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1920, "height": 1080})
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            assert "token" not in page.url  # the fragment is cleared once read
            assert not await page.is_visible("#login")  # the paste box goes away once connected
            sim = asyncio.create_task(
                simulate(settings, rate=150, duration=12, seed=11, progress=False, history_s=3 * 3600)
            )
            await page.wait_for_function(
                """() => { const v = document.querySelector('[data-tile="received"] .value').textContent;
                           return v !== '—' && v !== '0'; }""",
                timeout=45_000,
            )
            first = await _tile(page, "received")
            await page.wait_for_function(
                f"""() => document.querySelector('[data-tile="received"] .value').textContent !== {first!r}""",
                timeout=30_000,
            )
            second = await _tile(page, "received")
            await sim
            assert first != second
            assert await page.inner_text("#last-update") != "—"
            # Three hours of sensor history make the hourly VN_AQI valid at once (NowCast rule).
            await page.wait_for_function(
                """() => /^[0-9]+$/.test(document.querySelector('[data-tile="aqi"] .value').textContent)""",
                timeout=20_000,
            )
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "wall.png"), full_page=False)
        finally:
            await browser.close()


async def test_wall_for_a_commune_token_shows_only_that_commune(system: Settings) -> None:
    from playwright.async_api import async_playwright

    settings = system
    token = create_token(settings, "commune", commune="17935", subject="nam-dan")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            await page.wait_for_function(
                "() => document.querySelectorAll('#commune-rows tr').length > 0", timeout=20_000
            )
            rows = await page.locator("#commune-rows tr td:first-child").all_inner_texts()
            assert rows == ["Xã Nam Đàn"]
            assert "Nam Đàn" in await page.inner_text("#scope-label")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "wall-commune.png"))
        finally:
            await browser.close()


async def test_wall_shows_an_alert_when_one_fires_and_acknowledges_it(system: Settings) -> None:
    import datetime as dt
    import json

    from aiokafka import AIOKafkaProducer
    from playwright.async_api import async_playwright

    from ioc.settings import TOPIC_CYBER

    settings = system
    token = create_token(settings, "operator", subject="truc.ban")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1920, "height": 1080})
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            assert await page.inner_text("#alert-count-n") == "0"
            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
            await producer.start()
            incident = {
                "schema": "ioc.incident.v1", "event_id": "wall-e1", "incident_id": "SOC-WALL-1", "type": "detected",
                "occurred_at": dt.datetime.now(dt.UTC).isoformat(), "severity": "critical", "category": "defacement",
                "system": "nghean.gov.vn", "system_level": 3, "agency_code": "000.00.16.H40",
            }  # fmt: skip
            await producer.send_and_wait(settings.topic(TOPIC_CYBER), json.dumps(incident).encode(), key=b"SOC-WALL-1")
            await producer.stop()
            item = page.locator("#alert-list li.sev-critical").first
            await item.wait_for(timeout=30_000)
            assert await page.inner_text("#alert-count-n") == "1"
            await item.locator("button.ack").click()
            await page.wait_for_selector("#alert-list li.is-acked", timeout=15_000)
            assert "truc.ban" in await page.inner_text("#alert-list li.is-acked")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "wall-alert.png"))
        finally:
            await browser.close()
