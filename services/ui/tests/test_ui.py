"""The UI against a real nats-server: dashboard, htmx fragment, config page, /healthz, static htmx."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

import httpx

from services.ui.app import UiContext, create_app
from services.ui.service import UiService
from shared import subjects
from shared.bus import Bus
from shared.config.model import CaduceusConfig, DicomTarget, Rule
from shared.config.state import plan_changes
from shared.events import ServiceHeartbeat, make_event, utcnow
from shared.natsserver import free_port
from shared.settings import Settings

CONFIG = CaduceusConfig(targets={"pacs": DicomTarget(host="127.0.0.1", port=4242, called_aet="PACS")},
                        rules={"ct": Rule(filter="@Modality@ == 'CT'", targets=["pacs"])})


async def _heartbeat(bus: Bus, service: str, age_seconds: float) -> None:
    event = make_event("service.heartbeat", service, ServiceHeartbeat(
        service=service, instance=f"{service}-1", pid=1234, uptime_seconds=60, interval_seconds=1,
        details={"queue": 7}))
    event.occurred_at = utcnow() - timedelta(seconds=age_seconds)
    await bus.publish(event)


def _client(bus: Bus, config: CaduceusConfig = CONFIG) -> httpx.AsyncClient:
    app = create_app(UiContext(bus=lambda: bus, config=lambda: config, config_seq=lambda: 2))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ui")


async def test_dashboard_shows_health_streams_and_consumers(bus: Bus) -> None:
    await _heartbeat(bus, "router", age_seconds=0)
    await _heartbeat(bus, "dispatcher", age_seconds=30)  # 30 s > 3x 1 s interval
    await bus.declare_durable(subjects.PROCESSOR_WORK)
    async with _client(bus) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert '<script src="http://ui/static/htmx.min.js"></script>' in page.text
        assert 'hx-get="/fragments/health"' in page.text and 'hx-trigger="every 3s"' in page.text

        fragment = (await client.get("/fragments/health")).text
        assert "<html" not in fragment  # a fragment, swapped into the page by htmx
        router_row = fragment.split('data-service="router"')[1].split("</tr>")[0]
        assert 'class="healthy"' in router_row and "queue=7" in router_row
        assert 'class="stale"' in fragment.split('data-service="dispatcher"')[1].split("</tr>")[0]
        assert 'class="missing"' in fragment.split('data-service="receiver"')[1].split("</tr>")[0]
        assert "unhealthy" in fragment
        assert "<td>EVENTS</td>" in fragment and "<td>processor</td>" in fragment

        report = await client.get("/api/health")
        assert report.status_code == 503  # receiver etc. are missing
        states = {s["service"]: s["state"] for s in report.json()["services"]}
        assert states["router"] == "healthy" and states["dispatcher"] == "stale" and states["receiver"] == "missing"

        healthz = await client.get("/healthz")
        assert healthz.status_code == 200 and healthz.json() == {"status": "ok", "nats_connected": True}

        script = await client.get("/static/htmx.min.js")
        assert script.status_code == 200 and "htmx" in script.text[:2000]


async def test_config_page_shows_the_fold(bus: Bus) -> None:
    async with _client(bus) as client:
        page = (await client.get("/config")).text
    assert "<td>pacs</td>" in page and "4242" in page
    assert "@Modality@ == &#39;CT&#39;" in page  # escaped, never raw HTML
    assert "sequence 2" in page


async def test_ui_service_serves_http_and_follows_config(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    port = free_port()
    service = UiService(Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=0.5,
                                 ui_host="127.0.0.1", ui_port=port))
    running = asyncio.create_task(service.run())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert asyncio.get_running_loop().time() < deadline, "UI did not come up"
                await asyncio.sleep(0.1)
            for event in plan_changes({}, CONFIG, "user:test"):
                await bus.publish(event)
            deadline = asyncio.get_running_loop().time() + 10
            while "<td>pacs</td>" not in (await client.get("/config")).text:
                assert asyncio.get_running_loop().time() < deadline, "config page never showed the new target"
                await asyncio.sleep(0.1)
            fragment = (await client.get("/fragments/health")).text
            deadline = asyncio.get_running_loop().time() + 10
            while f"ui-{os.getpid()}" not in fragment and service.instance not in fragment:
                assert asyncio.get_running_loop().time() < deadline, "own heartbeat never shown"
                await asyncio.sleep(0.2)
                fragment = (await client.get("/fragments/health")).text
    finally:
        service.request_stop("test over")
        await asyncio.wait_for(running, 15)
