"""The processor service: runs processing modules on completed series (first version: holds work only).

What this version does, and what it does NOT do yet:
- It starts, follows the configuration, and heartbeats like every service.
- It declares its durable consumer `processor` (shared.subjects.PROCESSOR_WORK) on the EVENTS stream,
  so that every `process.requested` event published from now on is retained for it and shows up as
  pending work in `caduceus status` and the UI.
- It does NOT pull, ack or run anything: running modules (containers, the module contract with
  task.json, /tmp/data and /tmp/output) is a later issue. Acknowledging work it cannot do would lose
  it, so the work stays pending in the durable until a processor that can do it starts.
- Its heartbeat reports the durable's backlog (`work_pending`, `work_ack_pending`), read from JetStream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.processor.backlog import read_backlog
from shared.runtime import Service
from shared.subjects import PROCESSOR_WORK

log = logging.getLogger(__name__)


class ProcessorService(Service):
    name = "processor"
    follows_events = True
    backlog_refresh_seconds = 5.0

    async def setup(self) -> None:
        await self.bus.declare_durable(PROCESSOR_WORK)
        self.backlog: dict[str, Any] = {}
        self.spawn(self._watch_backlog())

    async def _watch_backlog(self) -> None:
        while True:
            try:
                self.backlog = await read_backlog(self.bus, PROCESSOR_WORK)
            except Exception as exc:  # noqa: BLE001 - a missed refresh only makes the heartbeat older
                log.warning("cannot read the processor backlog: %s", exc)
            await asyncio.sleep(self.backlog_refresh_seconds)

    def health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = dict(self.counters)
        details.update(self.backlog)
        details["executes_modules"] = False
        return details
