"""The audit loop: pull a batch from a durable, store it in one transaction, then ack it.

Live events trickle in one at a time (one image.received every few ms while a modality sends);
written as they come, each would cost its own transaction (a dozen statements and, with SQLite's
synchronous=FULL, an fsync that competes with the receiver's). So once a fetch returns less than a
full batch, the loop waits up to `LINGER_SECONDS` for more before writing: the log lags by at most
that, and the fixed cost of a transaction is shared by everything that arrived meanwhile.

A message is acked only after the transaction that stored it has committed. If the database
fails, the batch is nak'ed (JetStream hands the same messages back first) and the loop backs off
before pulling again, so the log catches up without gaps; the unique constraints make any
re-delivery harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from sqlalchemy import Engine

from services.bookkeeper.incarnation import StreamReplaced
from services.bookkeeper.store import BatchResult, Record, record_from_event, record_unreadable, write_batch
from shared import subjects
from shared.bus import Bus
from shared.events import Event

log = logging.getLogger(__name__)

BATCH = 200
LINGER_SECONDS = 0.2
MAX_BACKOFF = 30.0
FETCH_SECONDS = 1.0  # a pull request's life at the server
LATE_DELIVERY_SECONDS = 0.2


def record_from_msg(msg: Msg) -> Record:
    meta = msg.metadata
    stream, seq = meta.stream, int(meta.sequence.stream)
    recorded_at = meta.timestamp if meta.timestamp else None
    if recorded_at is not None and recorded_at.tzinfo is None:
        recorded_at = recorded_at.replace(tzinfo=UTC)
    try:
        event = Event.from_json(msg.data)
    except Exception:  # noqa: BLE001 - not a valid event: still recorded, never dropped
        headers = msg.headers or {}
        return record_unreadable(msg.data, headers.get("Nats-Msg-Id"), headers.get("Caduceus-Type"),
                                 stream, seq, recorded_at)
    return record_from_event(event, stream, seq, recorded_at)


class IngestStats:
    def __init__(self) -> None:
        self.stored = 0
        self.duplicates = 0
        self.batches = 0
        self.db_failures = 0
        self.last_batch_at: datetime | None = None
        self.last_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"stored": self.stored, "duplicates": self.duplicates, "batches": self.batches,
                "db_failures": self.db_failures, "last_error": self.last_error,
                "last_batch_at": self.last_batch_at.isoformat() if self.last_batch_at else None}


class Ingestor:
    """Follows one durable into the database."""

    def __init__(self, bus: Bus, engine: Engine, durable: subjects.Durable, stats: IngestStats,
                 stopping: asyncio.Event, floor: Callable[[], dict[str, float]], batch: int = BATCH,
                 linger: float = LINGER_SECONDS,
                 on_replaced: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.bus = bus
        self.engine = engine
        self.durable = durable
        self.stats = stats
        self.stopping = stopping
        self.floor = floor
        self.batch = batch
        self.linger = linger
        self.backoff = 0.0
        self.sub: Any = None
        self._requests_expire_at = 0.0  # monotonic time by which every pull request made has expired
        self.on_replaced = on_replaced  # the service archives the stream's earlier incarnation

    async def run(self) -> None:
        await self.bus.declare_durable(self.durable)
        self.sub = sub = await self.bus.js.pull_subscribe_bind(durable=self.durable.name,
                                                               stream=self.durable.stream)
        # The next batch is fetched while the previous one is written (NATS and database work overlap);
        # writes stay one at a time.
        writing: asyncio.Task[None] | None = None
        try:
            while not self.stopping.is_set():
                try:
                    msgs = await self._fetch(sub, self.batch, FETCH_SECONDS)
                except (TimeoutError, NatsTimeoutError):
                    continue
                except Exception as exc:  # noqa: BLE001 - connection trouble: pull again shortly
                    log.warning("fetch from %s failed: %s", self.durable.name, exc)
                    await asyncio.sleep(1)
                    continue
                if len(msgs) < self.batch and self.linger > 0:
                    msgs += await self._more(sub, self.batch - len(msgs))
                if writing is not None:
                    await writing
                writing = asyncio.create_task(self.handle(msgs))
            # Messages that landed after the last fetch returned (its pull request expires with it).
            leftover = await self._more(sub, self.batch, stopping_too=True)
            if writing is not None:
                await writing
                writing = None
            if leftover:
                await self.handle(leftover)
        finally:
            if writing is not None:
                # Let a running write finish and ack (or nak) instead of leaving it to ack_wait.
                await asyncio.shield(writing)

    async def _fetch(self, sub: Any, wanted: int, timeout: float) -> list[Msg]:
        # (A margin over the request's own expiry, for what the server sent just before it.)
        self._requests_expire_at = max(self._requests_expire_at, time.monotonic() + timeout + LATE_DELIVERY_SECONDS)
        return list(await sub.fetch(wanted, timeout=timeout))

    async def _more(self, sub: Any, wanted: int, stopping_too: bool = False) -> list[Msg]:
        """What arrives within the linger time (at most `wanted` messages; none once stopping,
        unless `stopping_too`: then what is there now)."""
        if not stopping_too:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.linger)
            if self.stopping.is_set():
                return []
        try:
            # Whatever the server holds by now comes back at once (fetch's no-wait request first);
            # the timeout only applies when nothing arrived at all.
            return await self._fetch(sub, wanted, 0.05)
        except (TimeoutError, NatsTimeoutError):
            return []
        except Exception as exc:  # noqa: BLE001 - write what we have; the next fetch reports the trouble
            log.warning("fetch from %s failed: %s", self.durable.name, exc)
            return []

    async def close(self) -> None:
        # Unsubscribe rather than leave it to drain: messages of a fetch cut short by shutdown sit
        # unread in the subscription queue and make drain wait for its timeout.
        if self.sub is None:
            return
        with contextlib.suppress(Exception):
            await self._hand_back_late_deliveries()
        with contextlib.suppress(Exception):
            await self.sub.unsubscribe()

    async def _hand_back_late_deliveries(self) -> None:
        """NAK what the server sent to this subscription after its last fetch returned.

        A fetch can return while its pull request is still open at the server (until it expires,
        FETCH_SECONDS); events published as the bookkeeper stops are then delivered to it. Dropped
        unread with the subscription, they stayed unacknowledged until the ack wait (60 s), and the
        next bookkeeper's projections, which advance in stream order, waited as long (2 runs in 10
        of test_events_published_while_it_stops_do_not_stall_the_next_bookkeeper).
        """
        await asyncio.sleep(max(0.0, self._requests_expire_at - time.monotonic()))
        while self.sub.pending_msgs:
            for msg in await self.sub.fetch(self.sub.pending_msgs, timeout=0.05):
                await msg.nak()

    async def handle(self, msgs: list[Msg]) -> None:
        records = [record_from_msg(m) for m in msgs]
        started = time.monotonic()
        try:
            result = await asyncio.to_thread(write_batch, self.engine, records, self.floor())
        except StreamReplaced as exc:
            if self.on_replaced is not None:
                with contextlib.suppress(Exception):  # (if it failed, the redelivery finds out again)
                    await self.on_replaced(exc.stream)
            await self._failed(msgs, exc)
            return
        except Exception as exc:  # noqa: BLE001 - database down or failing: nothing is acked
            await self._failed(msgs, exc)
            return
        # Acks after the commit. A lost ack only means a harmless re-delivery.
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()
        self.backoff = 0.0
        self._count(result, len(msgs), time.monotonic() - started)

    async def _failed(self, msgs: list[Msg], exc: Exception) -> None:
        self.stats.db_failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"[:500]
        self.backoff = min(MAX_BACKOFF, max(0.5, self.backoff * 2))
        log.error("storing %d events from %s failed, will retry in %.1fs: %s", len(msgs), self.durable.name,
                  self.backoff, self.stats.last_error)
        # In stream order, so the re-delivery comes back in the same order.
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=self.backoff)

    def _count(self, result: BatchResult, received: int, seconds: float) -> None:
        self.stats.stored += result.stored
        self.stats.duplicates += result.duplicates
        self.stats.batches += 1
        self.stats.last_batch_at = datetime.now(UTC)
        log.debug("stored batch of %d from %s in %.3fs (%d duplicates, %d projected)", received,
                  self.durable.name, seconds, result.duplicates, result.projected)
