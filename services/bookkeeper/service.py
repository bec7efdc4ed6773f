"""The bookkeeper: every event from EVENTS and CONFIG into the SQL audit log, projections, queries."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import Engine

from services.bookkeeper.db import create_db_engine, upgrade
from services.bookkeeper.ingest import BATCH, Ingestor, IngestStats
from services.bookkeeper.rpc import RpcServer
from services.bookkeeper.store import advance_all
from shared import subjects
from shared.runtime import Service
from shared.settings import Settings

log = logging.getLogger(__name__)

DURABLES = (subjects.BOOKKEEPER_EVENTS, subjects.BOOKKEEPER_CONFIG)
GAP_CHECK_SECONDS = 30.0


class BookkeeperService(Service):
    name = "bookkeeper"

    def __init__(self, settings: Settings | None = None, batch: int = BATCH) -> None:
        super().__init__(settings)
        self.batch = batch
        self.engine: Engine
        self.ingest_stats = IngestStats()
        # Per stream: the highest sequence the stream no longer holds (expired by max_age);
        # the projector may skip over missing sequences up to it.
        self.floors: dict[str, float] = {}
        self.rpc: RpcServer | None = None
        self.ingestors: list[Ingestor] = []

    async def setup(self) -> None:
        self.engine = create_db_engine(self.settings.resolved_database_url())
        await self._migrate()
        self.rpc = RpcServer(self.bus.nc, self.engine, self.ingest_stats.as_dict)
        await self.rpc.start()
        for durable in DURABLES:
            ingestor = Ingestor(self.bus, self.engine, durable, self.ingest_stats, self.stopping,
                                lambda: self.floors, batch=self.batch)
            self.ingestors.append(ingestor)
            self.spawn(ingestor.run())
        self.spawn(self._gap_watch())

    async def _migrate(self) -> None:
        """`alembic upgrade head`, retried while the database is not reachable yet."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(upgrade, self.engine)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. Postgres still starting
                if self.stopping.is_set():
                    raise
                log.warning("database not ready for migration (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _gap_watch(self) -> None:
        """Refresh the floors and apply events another process stored after a gap we stopped at."""
        while not self.stopping.is_set():
            try:
                for durable in DURABLES:
                    info = await self.bus.js.stream_info(durable.stream)
                    self.floors[durable.stream] = max(0, int(info.state.first_seq) - 1)
                await asyncio.to_thread(advance_all, self.engine, [d.stream for d in DURABLES], self.floors)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("projection catch-up failed: %s", exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=GAP_CHECK_SECONDS)
            except TimeoutError:
                pass

    def health_details(self) -> dict[str, Any]:
        return self.ingest_stats.as_dict()

    async def teardown(self) -> None:
        for ingestor in self.ingestors:
            await ingestor.close()
        if self.rpc is not None:
            await self.rpc.stop()
        self.engine.dispose()
