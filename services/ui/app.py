"""The web UI: FastAPI + Jinja2 templates + htmx (vendored under static/).

Pages
  GET /                   dashboard; the health block reloads itself from /fragments/health (htmx polling)
  GET /fragments/health   service health (STATUS heartbeats) and stream/consumer stats, as an HTML fragment
  GET /config             current configuration (fold of the CONFIG stream), read-only for now
  GET /api/health         the same health report as JSON (what `caduceus status --json` prints)
  GET /healthz            liveness of the UI process and its NATS connection
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.health import HealthReport, collect_health

HERE = Path(__file__).parent
POLL_SECONDS = 3


@dataclass
class UiContext:
    """What the pages read: the service's bus and its live configuration fold."""

    bus: Callable[[], Bus]
    config: Callable[[], CaduceusConfig]
    config_seq: Callable[[], int]


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def create_app(ctx: UiContext) -> FastAPI:
    app = FastAPI(title="caduceus", docs_url=None, redoc_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["bytes"] = human_bytes
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    async def health() -> HealthReport:
        return await collect_health(ctx.bus())

    @app.get("/", response_class=HTMLResponse)
    async def dashboard(request: Request) -> Response:
        return templates.TemplateResponse(request, "dashboard.html",
                                          {"report": await health(), "poll_seconds": POLL_SECONDS})

    @app.get("/fragments/health", response_class=HTMLResponse)
    async def health_fragment(request: Request) -> Response:
        return templates.TemplateResponse(request, "_health.html", {"report": await health()})

    @app.get("/config", response_class=HTMLResponse)
    async def config_page(request: Request) -> Response:
        document = ctx.config().to_document()
        context: dict[str, Any] = {
            "document": document,
            "yaml_text": yaml.safe_dump(document, sort_keys=False, allow_unicode=True),
            "config_seq": ctx.config_seq(),
        }
        return templates.TemplateResponse(request, "config.html", context)

    @app.get("/api/health")
    async def health_json() -> JSONResponse:
        report = await health()
        return JSONResponse(report.model_dump(mode="json"), status_code=200 if report.healthy else 503)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        connected = ctx.bus().nc.is_connected
        return JSONResponse({"status": "ok" if connected else "degraded", "nats_connected": connected},
                            status_code=200 if connected else 503)

    return app
