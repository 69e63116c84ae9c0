"""The wall's trends and station map in a real headless Chromium, after a back-fill, against the live worker and API."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from api.auth import create_token
from ioc.registry import Registry, load_registry
from ioc.settings import Settings
from simulators.backfill import BackfillPlan, run_backfill
from simulators.envelope import VN_TZ
from simulators.producer import run as simulate

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
#: Eight days (the hydrographs' 72 h with the flood in it, and the same weekday last week), thinly.
PLAN = BackfillPlan(days=8, dossiers_per_day=1200, incidents_per_day=80)
COMMUNE = "17935"  # Xã Nam Đàn: the Nam Đàn river gauge and an air station


@pytest.fixture(scope="module")
def registry() -> Any:
    return load_registry()


async def _backfill(settings: Settings) -> None:
    await run_backfill(settings, days=PLAN.days, seed=20, now=dt.datetime.now(VN_TZ), plan=PLAN, progress=False)


async def _wait(page: Any, condition: str, arg: Any = None, timeout: float = 30_000) -> None:
    """Wait for ``condition``; on a timeout, fail with what the charts show (for the reader of the failure)."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        await page.wait_for_function(condition, arg=arg, timeout=timeout)
    except PlaywrightTimeout:
        pytest.fail(f"not reached: {condition}\ncharts: {await _chart_state(page)}")


async def _chart_state(page: Any) -> dict[str, Any]:
    return await page.evaluate(  # type: ignore[no-any-return]
        """() => ({
          hydro: Object.fromEntries([...document.querySelectorAll('.hydro-card')]
            .map(c => [c.dataset.station, Number(c.dataset.points || 0)])),
          hydroLast: Object.fromEntries([...document.querySelectorAll('.hydro-card')]
            .map(c => [c.dataset.station, Number(c.dataset.last || 0)])),
          air: Object.fromEntries([...document.querySelectorAll('.aqi-card')]
            .map(c => [c.dataset.station, Number(c.dataset.bars || 0)])),
          dossierToday: Number(document.querySelector('#dossier-chart').dataset.today || 0),
          dossierWeek: Number(document.querySelector('#dossier-chart').dataset.week || 0),
          incidents: Number(document.querySelector('#incident-chart').dataset.points || 0),
          canvases: document.querySelectorAll('#trends canvas').length,
          mapStations: [...document.querySelectorAll('#map-svg g.st')].map(g => g.dataset.station),
          mapCommunes: [...new Set([...document.querySelectorAll('#map-svg g.st')].map(g => g.dataset.commune))],
          coloured: [...document.querySelectorAll('#map-svg g.st')].filter(g => g.dataset.colour).length,
        })"""
    )


def _watch_subscriptions(page: Any) -> list[str]:
    channels: list[str] = []

    def on_socket(ws: Any) -> None:
        import json

        def sent(payload: Any) -> None:
            try:
                msg = json.loads(payload if isinstance(payload, str) else payload.decode())
            except ValueError:
                return
            if msg.get("type") == "subscribe":
                channels.extend(msg["channels"])

        ws.on("framesent", sent)

    page.on("websocket", on_socket)
    return channels


async def test_operator_wall_draws_every_chart_and_the_map_then_moves_them_live(
    system: Settings, registry: Any
) -> None:
    from playwright.async_api import async_playwright

    settings = system
    await _backfill(settings)
    token = create_token(settings, "operator", subject="trends-test")
    gauges = sorted(s.station_id for s in registry.stations.values() if s.kind == "water")
    air = sorted(s.station_id for s in registry.stations.values() if s.kind == "air")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1920, "height": 1080})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            # Loaded from /api/kpis/history: every gauge's 72 h, every air station's hours, last week's dossiers.
            await _wait(
                page,
                """(n) => { const cards = [...document.querySelectorAll('.hydro-card')];
                   return cards.length === n && cards.every(c => Number(c.dataset.points) > 50); }""",
                arg=len(gauges),
                timeout=30_000,
            )
            await _wait(
                page,
                """() => Number(document.querySelector('#dossier-chart').dataset.week) > 0
                      && Number(document.querySelector('#incident-chart').dataset.points) > 0""",
                timeout=30_000,
            )
            before = await _chart_state(page)
            assert sorted(before["hydro"]) == gauges
            assert sorted(before["air"]) == air and all(n > 0 for n in before["air"].values())
            assert before["canvases"] >= len(gauges) + len(air) + 2
            # The map places every station of the registry, coloured where a value is known.
            assert sorted(before["mapStations"]) == sorted(registry.stations)
            # ... coloured by each station's value once its channel has sent it.
            await _wait(
                page,
                "(n) => document.querySelectorAll('#map-svg g.st[data-colour]:not([data-colour=\"\"])').length >= n",
                len(gauges),
            )

            # Live events move the charts: new river levels and dossiers arrive through the feed.
            # The gauges report every 5 s here (every 10 min in the registry), so the hydrographs move at once.
            quick = Registry(
                registry.units,
                {
                    k: dataclasses.replace(v, interval_s=5) if v.kind == "water" else v
                    for k, v in registry.stations.items()
                },
                registry.targets,
            )
            sim = asyncio.create_task(simulate(settings, rate=40, duration=20, seed=21, progress=False, registry=quick))
            await _wait(
                page,
                """(before) => { const cards = [...document.querySelectorAll('.hydro-card')];
                   return cards.some(c => Number(c.dataset.last) > before[c.dataset.station]); }""",
                arg=before["hydroLast"],
                timeout=60_000,
            )
            await _wait(
                page,
                "(n) => Number(document.querySelector('#dossier-chart').dataset.today) > n",
                arg=before["dossierToday"],
                timeout=60_000,
            )
            await sim
            # Numbers the Vietnamese way: thousands with '.', decimals with ','.
            received = await page.inner_text('[data-tile="received"] .value')
            assert re.fullmatch(r"\d{1,3}(\.\d{3})*", received), received
            assert await page.get_attribute("body", "data-feed") == "on"
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOTS / "trends-1080p.png"))

            # Click a gauge on the map: its details.
            await page.click('#map-svg g.st[data-station="WL-NAMDAN"]')
            detail = await page.inner_text("#map-detail")
            assert "WL-NAMDAN" in detail and "BĐ I / II / III" in detail

            # The English switch covers every label, the new ones included: each one's text changes
            # (but for the few that read the same in both languages).
            labels = "() => Object.fromEntries([...document.querySelectorAll('[data-i18n]')].map(el => [el.dataset.i18n, el.textContent]))"
            vietnamese = await page.evaluate(labels)
            await page.click("#lang")
            english = await page.evaluate(labels)
            assert english["hydroTitle"] == "River levels, 72 h" and english["mapTitle"] == "Station map"
            assert english["mtta"] == "Mean time to acknowledge (24 h)"
            unchanged = sorted(k for k in english if english[k] == vietnamese[k])
            assert unchanged == ["colAqi"], unchanged
            assert "Station" in await page.inner_text("#map-detail")
            await page.screenshot(path=str(SCREENSHOTS / "trends-1080p-en.png"))
            await page.click("#lang")

            # 4K: the same page at 3840×2160 draws its charts to the wider size.
            await page.set_viewport_size({"width": 3840, "height": 2160})
            await _wait(page, "() => document.querySelector('#dossier-chart canvas').width > 1200", timeout=10_000)
            await page.screenshot(path=str(SCREENSHOTS / "trends-4k.png"))
            assert errors == []
        finally:
            await browser.close()


async def test_commune_wall_shows_its_own_stations_and_river_gauge_only(system: Settings, registry: Any) -> None:
    from playwright.async_api import async_playwright

    settings = system
    await _backfill(settings)
    token = create_token(settings, "commune", commune=COMMUNE, subject="nam-dan-trends")
    own = sorted(s.station_id for s in registry.stations.values() if s.commune_code == COMMUNE)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1920, "height": 1080})
            subscribed = _watch_subscriptions(page)
            await page.goto(f"http://127.0.0.1:{settings.api_port}/wall#token={token}")
            await page.wait_for_selector("#conn.conn-on", timeout=20_000)
            await _wait(
                page,
                """() => { const c = document.querySelector('.hydro-card[data-station="WL-NAMDAN"]');
                   return c && Number(c.dataset.points) > 50; }""",
                timeout=30_000,
            )
            state = await _chart_state(page)
            assert list(state["hydro"]) == ["WL-NAMDAN"]
            assert list(state["air"]) == [s for s in own if s.startswith("AIR-")]
            assert sorted(state["mapStations"]) == own
            assert state["mapCommunes"] == [COMMUNE]
            # Its own gauge's level, from the station's own channel (not only the commune's alarm level).
            await _wait(
                page,
                """() => { const c = document.querySelector('#river-rows tr[data-station="WL-NAMDAN"] .level');
                   return c && c.dataset.value !== undefined; }""",
                timeout=20_000,
            )
            stations = {c.removeprefix("kpi:station:") for c in subscribed if c.startswith("kpi:station:")}
            assert stations and stations <= set(own)
            assert {c for c in subscribed if not c.startswith("kpi:station:")} == {f"kpi:commune:{COMMUNE}", "alerts"}
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOTS / "trends-commune-1080p.png"))
        finally:
            await browser.close()
