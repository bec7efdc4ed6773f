"""The dispatcher service: pulls send tasks, urgent first, and runs them (see handlers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from shared.blobstore import BlobStore, open_blob_store
from shared.runtime import Service
from shared.settings import Settings
from shared.subjects import DISPATCHER_NORMAL, DISPATCHER_URGENT, Durable

from .handlers import Dispatcher
from .progress import ProgressStore

log = logging.getLogger(__name__)
LONG_POLL_SECONDS = 0.25


class DispatcherSettings(Settings):
    """Process settings of a dispatcher (CADUCEUS_DISPATCH_* environment variables)."""

    # Redelivery after a crashed dispatcher happens after ack_wait; a live one sends in_progress
    # every third of it, so a long send is never handed to a second process.
    dispatch_ack_wait_seconds: float = 60.0
    # Tasks one process runs at once: one dead destination must not hold up the others.
    dispatch_concurrency: int = 4
    # At least one of every N pulls goes to normal work first, so urgent work cannot starve it.
    dispatch_normal_every: int = 4


class DispatcherService(Service):
    name = "dispatcher"
    settings: DispatcherSettings

    def __init__(self, settings: DispatcherSettings | None = None) -> None:
        super().__init__(settings or DispatcherSettings())
        self.dispatcher: Dispatcher
        self._subs: list[JetStreamContext.PullSubscription] = []

    async def setup(self) -> None:
        progress = await ProgressStore.open(self.bus.js)
        store: BlobStore = open_blob_store(self.settings.blob_store, self.settings.data_dir, self.bus.js)
        ack_wait = self.settings.dispatch_ack_wait_seconds
        self.dispatcher = Dispatcher(self.bus, progress, store, lambda: self.config,
                                     keep_alive_seconds=max(0.5, ack_wait / 3), counters=self.counters)
        durables = [dataclasses.replace(d, ack_wait=ack_wait, max_ack_pending=100)
                    for d in (DISPATCHER_URGENT, DISPATCHER_NORMAL)]
        self.spawn(self._pull_loop(durables))

    async def teardown(self) -> None:
        # Unsubscribe before the runtime drains the connection: a pull subscription whose fetch was
        # cancelled mid-way would otherwise hold the drain for its whole timeout.
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _pull_loop(self, durables: list[Durable]) -> None:
        """Pull one message whenever a handler slot is free, from the first durable with work.

        Urgent comes first, except on every N-th pull where normal work is asked first.
        """
        subs = self._subs
        for durable in durables:
            await self.bus.declare_durable(durable)
            subs.append(await self.bus.js.pull_subscribe_bind(durable=durable.name, stream=durable.stream))
        limiter = asyncio.Semaphore(self.settings.dispatch_concurrency)
        turn = 0
        while not self.stopping.is_set():
            await limiter.acquire()
            turn += 1
            order = subs if turn % max(1, self.settings.dispatch_normal_every) else subs[::-1]
            msg = await self._fetch_first(order)
            if msg is None or self.stopping.is_set():
                limiter.release()
                if msg is not None:
                    await msg.nak()  # stopping: let another dispatcher have it now
                continue
            task = asyncio.create_task(self._run_handler(self.dispatcher.handle, msg, limiter))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _fetch_first(self, order: list[JetStreamContext.PullSubscription]) -> Any:
        for position, sub in enumerate(order):
            last = position == len(order) - 1
            try:
                # Probe the preferred durables briefly; wait on the last one (a long poll). Work
                # arriving on another durable meanwhile waits for this poll to end, so it is short.
                msgs = await sub.fetch(1, timeout=LONG_POLL_SECONDS if last else 0.05)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - connection trouble: back off and pull again
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(1)
                return None
            if msgs:
                return msgs[0]
        return None
