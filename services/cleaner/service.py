"""The cleaner service: deletes image blobs after retention (first version: reports only, deletes nothing).

What this version does, and what it does NOT do yet:
- It starts, follows the configuration and heartbeats like every service.
- Every `scan_seconds` it walks the local blob store (`instances/`) and reports in its heartbeat how
  many blobs exist and how many are older than `settings.retention_days` (by file modification
  time). That number is an upper bound of what retention would remove: the real rule also requires
  that no open task references the blob.
- It does NOT delete anything and does NOT consume events: deciding that no open task references a
  blob (from route.decided / dispatch.completed / series.discarded) is a later issue. It declares no
  durable either: the EVENTS stream keeps every event for years, so the real cleaner's durable will
  read the whole history from the start when it is created.
- With CADUCEUS_BLOB_STORE=nats the scan is not done (reported as such).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from services.cleaner.scan import scan_blobs
from shared.runtime import Service

log = logging.getLogger(__name__)


class CleanerService(Service):
    name = "cleaner"
    scan_seconds = 60.0

    async def setup(self) -> None:
        self.report: dict[str, Any] = {"deletes_blobs": False}
        self.spawn(self._scan_loop())

    async def _scan_loop(self) -> None:
        while True:
            await self._scan_once()
            await asyncio.sleep(self.scan_seconds)

    async def _scan_once(self) -> None:
        if self.settings.blob_store != "local":
            self.report = {"deletes_blobs": False, "blob_scan": f"not done for blob store "
                                                                  f"'{self.settings.blob_store}'"}
            return
        retention_days = self.config.settings.retention_days
        root = self.settings.data_dir / "blobs" / "instances"
        try:
            result = await asyncio.to_thread(scan_blobs, root, retention_days, time.time())
        except OSError as exc:
            log.warning("blob scan failed: %s", exc)
            return
        self.report = {"deletes_blobs": False, "retention_days": retention_days,
                       "blobs_total": result.total, "blobs_older_than_retention": result.older,
                       "bytes_older_than_retention": result.older_bytes}

    def health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = dict(self.counters)
        details.update(self.report)
        return details
