"""The bookkeeper: every event from EVENTS and CONFIG into the SQL audit log, projections, queries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from services.bookkeeper.db import create_db_engine, upgrade
from services.bookkeeper.incarnation import follow_incarnation
from services.bookkeeper.ingest import BATCH, Ingestor, IngestStats
from services.bookkeeper.retention import (
    OldestNeeded,
    next_max_age,
    oldest_needed,
    set_max_age,
    wanted_max_age,
)
from services.bookkeeper.rpc import RpcServer
from services.bookkeeper.store import advance_all
from shared import subjects
from shared.config.model import DAY_SECONDS, CaduceusConfig
from shared.events import AlertRaised, make_event
from shared.runtime import Service
from shared.settings import Settings

log = logging.getLogger(__name__)

DURABLES = (subjects.BOOKKEEPER_EVENTS, subjects.BOOKKEEPER_CONFIG)
GAP_CHECK_SECONDS = 30.0
RETENTION_CHECK_SECONDS = 60.0
RETENTION_ALERT_EVERY_SECONDS = DAY_SECONDS
# At shutdown the ingest loops finish their fetch (at most a second) and store what it brought.
# Cancelled, a fetch's pull request stayed open at the server, whose messages (the other services'
# `service.stopped`, published just then) went to nobody until the ack wait (60 s) passed, and the
# next bookkeeper's projections, which advance in stream order, waited that long.
INGEST_STOP_SECONDS = 10.0


class BookkeeperService(Service):
    name = "bookkeeper"
    follows_events = True

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
        self.ingesting: list[asyncio.Task[None]] = []
        self.retention_changed = asyncio.Event()
        self.retention: dict[str, Any] = {}
        self._retention_alerted = 0.0   # time.monotonic() of the last warning alert

    async def setup(self) -> None:
        self.engine = create_db_engine(self.settings.resolved_database_url())
        await self._migrate()
        self.rpc = RpcServer(self.bus.nc, self.engine, self.ingest_stats.as_dict)
        await self.rpc.start()
        for durable in DURABLES:
            await self._follow_incarnation(durable.stream)
        for durable in DURABLES:
            ingestor = Ingestor(self.bus, self.engine, durable, self.ingest_stats, self.stopping,
                                lambda: self.floors, batch=self.batch, on_replaced=self._replaced)
            self.ingestors.append(ingestor)
            # Not spawned (shutdown would cancel it): see INGEST_STOP_SECONDS.
            self.ingesting.append(asyncio.create_task(ingestor.run()))
        self.spawn(self._gap_watch())
        self.spawn(self._retention_watch())

    async def _follow_incarnation(self, stream: str, conflict: bool = False) -> None:
        info = await self.bus.js.stream_info(stream)
        if info.created is None:
            return  # (every server with JetStream reports it; without it there is nothing to compare)
        archive = await asyncio.to_thread(follow_incarnation, self.engine, stream, info.created,
                                          int(info.state.last_seq), conflict)
        if archive is not None:
            await self.bus.publish(make_event("alert.raised", self.name, AlertRaised(
                severity="warning", source=self.name,
                message=f"the {stream} stream was created anew (its store was lost or replaced): the audit log "
                        f"keeps its earlier events as stream '{archive}' (histories still show them) and "
                        f"follows the new stream from its start. Work that was waiting in the old stream "
                        "(open series, tasks) is not in the new one: check `caduceus tasks` and the senders")))

    async def _replaced(self, stream: str) -> None:
        await self._follow_incarnation(stream, conflict=True)

    def on_config(self, config: CaduceusConfig) -> None:
        self.retention_changed.set()

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

    async def _retention_watch(self) -> None:
        """Apply settings.events_retention_days to the EVENTS stream as far as is safe (retention.py)."""
        while not self.stopping.is_set():
            try:
                await self._apply_retention()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("EVENTS retention check failed: %s", exc)
            self.retention_changed.clear()
            # Shutdown cancels this task (Service.spawn): only a configuration change cuts the wait short.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.retention_changed.wait(), timeout=RETENTION_CHECK_SECONDS)

    async def _apply_retention(self) -> None:
        now = datetime.now(UTC)
        wanted = wanted_max_age(self.config)
        current = float((await self.bus.js.stream_info(subjects.EVENTS_STREAM)).config.max_age or 0)
        oldest = await oldest_needed(self.bus.js)
        target = next_max_age(current, wanted, oldest, now)
        if abs(target - current) >= 1.0:   # the server keeps nanoseconds: fractions of days round-trip inexactly
            await set_max_age(self.bus.js, target)
            log.info("EVENTS retention %.1f -> %.1f days%s", current / DAY_SECONDS, target / DAY_SECONDS,
                     "" if target == wanted else f" (configured {wanted / DAY_SECONDS:.1f}; "
                     f"{oldest.reader if oldest else '?'} still needs older events)")
            current = target
        self.retention = {"events_retention_days": round(current / DAY_SECONDS, 2)}
        if abs(current - wanted) >= 1.0:
            self.retention["events_retention_wanted_days"] = round(wanted / DAY_SECONDS, 2)
        if oldest is not None:
            age = oldest.age_seconds(now)
            self.retention["events_oldest_needed"] = (f"{oldest.reader}@{oldest.stream_seq} "
                                                      f"{age / DAY_SECONDS:.2f}d")
            if age > current / 2:
                await self._warn_expiring(oldest, age, current)

    async def _warn_expiring(self, oldest: OldestNeeded, age: float, max_age: float) -> None:
        message = (f"{oldest.reader} has not consumed EVENTS sequence {oldest.stream_seq} for "
                   f"{age / DAY_SECONDS:.1f} days; the stream deletes events after {max_age / DAY_SECONDS:.1f} "
                   "days, and what it deletes before that reader consumes it is lost to that reader")
        if self._retention_alerted and time.monotonic() - self._retention_alerted < RETENTION_ALERT_EVERY_SECONDS:
            return
        log.warning("%s", message)
        await self.publish(make_event("alert.raised", self.name, AlertRaised(
            severity="warning", source="bookkeeper", message=message)))
        self._retention_alerted = time.monotonic()

    def health_details(self) -> dict[str, Any]:
        return {**self.ingest_stats.as_dict(), **self.retention}

    async def teardown(self) -> None:
        if self.ingesting:
            _, late = await asyncio.wait(self.ingesting, timeout=INGEST_STOP_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*self.ingesting, return_exceptions=True)
        await asyncio.gather(*(ingestor.close() for ingestor in self.ingestors))
        if self.rpc is not None:
            await self.rpc.stop()
        self.engine.dispose()
