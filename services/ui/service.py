"""The UI service: serves the web UI (services/ui/app.py) with uvicorn inside the service process.

It reads everything it shows from JetStream: heartbeats (STATUS), stream and consumer state, and the
configuration fold its ConfigFollower keeps live. The configuration page is read-only for now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import uvicorn

from services.ui.app import UiContext, create_app
from shared.runtime import Service

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service runtime owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class UiService(Service):
    name = "ui"

    async def setup(self) -> None:
        app = create_app(UiContext(bus=lambda: self.bus, config=lambda: self.config,
                                   config_seq=lambda: self.config_follower.last_seq))
        config = uvicorn.Config(app, host=self.settings.ui_host, port=self.settings.ui_port,
                                log_config=None, access_log=False, lifespan="off")
        self.server = _EmbeddedServer(config)
        self.server_task: asyncio.Task[Any] = asyncio.create_task(self.server.serve())
        # Fail the start (and let the supervisor restart us) if the port cannot be bound.
        while not self.server.started:
            if self.server_task.done():
                self.server_task.result()
                raise RuntimeError(f"UI server did not start on {self.settings.ui_host}:{self.settings.ui_port}")
            await asyncio.sleep(0.05)
        log.info("UI on http://%s:%d/", self.settings.ui_host, self.settings.ui_port)

    async def teardown(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server_task, timeout=10)

    def health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = dict(self.counters)
        details["url"] = f"http://{self.settings.ui_host}:{self.settings.ui_port}/"
        return details
