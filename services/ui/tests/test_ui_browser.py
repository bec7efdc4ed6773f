"""The dashboard in a real browser (system Chromium via Playwright): htmx loads and polling refreshes it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
from playwright.async_api import async_playwright

from services.ui.service import UiService
from shared.bus import Bus
from shared.events import ServiceHeartbeat, make_event
from shared.natsserver import free_port
from shared.settings import Settings


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is not installed (make test installs it)"
    return path


async def _heartbeat(bus: Bus, service: str) -> None:
    await bus.publish(make_event("service.heartbeat", service, ServiceHeartbeat(
        service=service, instance=f"{service}-test", pid=4321, uptime_seconds=1, interval_seconds=30)))


async def test_dashboard_refreshes_itself_with_htmx(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    port = free_port()
    service = UiService(Settings(nats_url=nats_url, data_dir=tmp_path, ui_host="127.0.0.1", ui_port=port))
    running = asyncio.create_task(service.run())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(150):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        await _heartbeat(bus, "router")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{port}/")
            assert await page.evaluate("typeof window.htmx") == "object"
            await page.wait_for_selector('tr[data-service="router"] td.healthy')
            assert await page.locator('tr[data-service="receiver"] td.missing').count() == 1

            # A new heartbeat appears without reloading the page: htmx polls /fragments/health.
            await _heartbeat(bus, "receiver")
            await page.wait_for_selector('tr[data-service="receiver"] td.healthy', timeout=10_000)
            assert page.url == f"http://127.0.0.1:{port}/"
            await page.click("text=Configuration")
            await page.wait_for_selector("#config-yaml")
            await browser.close()
            assert errors == []
    finally:
        service.request_stop("test over")
        await asyncio.wait_for(running, 15)
