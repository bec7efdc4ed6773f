"""The dispatcher service: pulls send tasks, urgent first, and runs them (see handlers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from shared.blobstore import BlobStore, open_blob_store
from shared.runtime import Service
from shared.settings import Settings
from shared.subjects import DISPATCHER_NORMAL, DISPATCHER_URGENT, Durable

from .gate import AssociationGate
from .handlers import Dispatcher
from .progress import ProgressStore

log = logging.getLogger(__name__)
LONG_POLL_SECONDS = 1.0
PREFERRED_GRACE_SECONDS = 0.02


class DispatcherService(Service):
    name = "dispatcher"
    follows_events = True
    settings: Settings

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or Settings())
        self.dispatcher: Dispatcher
        self._subs: list[JetStreamContext.PullSubscription] = []
        # Per durable: a fetch in progress (and when it started), or a message fetched and not yet
        # handed to a handler.
        self._polls: dict[JetStreamContext.PullSubscription, tuple[asyncio.Task[Any], float]] = {}
        self._held: dict[JetStreamContext.PullSubscription, Any] = {}

    async def setup(self) -> None:
        progress = await ProgressStore.open(self.bus.js)
        store: BlobStore = open_blob_store(self.settings.blob_store, self.settings.data_dir, self.bus.js)
        ack_wait = self.settings.dispatch_ack_wait_seconds
        # Handler slots: tasks sending at once. A task waiting for a target's association gives its
        # slot back meanwhile (gate.py), and as many tasks may wait as there are slots.
        self._slots = asyncio.Semaphore(self.settings.dispatch_concurrency)
        self.gate = AssociationGate(self.stopping, self._slots)
        self.dispatcher = Dispatcher(self.bus, progress, store, lambda: self.config,
                                     keep_alive_seconds=max(0.5, ack_wait / 3), counters=self.counters,
                                     instance=self.instance, gate=self.gate)
        durables = [dataclasses.replace(d, ack_wait=ack_wait) for d in (DISPATCHER_URGENT, DISPATCHER_NORMAL)]
        self.spawn(self._pull_loop(durables))
        self.spawn(self._keep_held_alive(max(0.5, ack_wait / 3)))

    def health_details(self) -> dict[str, Any]:
        details = super().health_details()
        if hasattr(self, "gate"):
            details["tasks_waiting_for_associations"] = self.gate.waiting()
        return details

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
        limiter = self._slots
        turn = 0
        try:
            while not self.stopping.is_set():
                await self.gate.room_for(self.settings.dispatch_concurrency)
                await limiter.acquire()
                turn += 1
                order = subs if turn % self.settings.dispatch_normal_every else subs[::-1]
                msg = await self._fetch_first(order)
                if msg is None or self.stopping.is_set():
                    limiter.release()
                    if msg is not None:
                        await msg.nak()  # stopping: let another dispatcher have it now
                    continue
                task = asyncio.create_task(self.run_handler(self.dispatcher.handle, msg, limiter))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
        finally:
            await self._release_fetched()

    async def _release_fetched(self) -> None:
        """Shutdown: messages fetched but not started go back at once.

        The polls are let run out (their pull requests expire with them, within LONG_POLL_SECONDS):
        a cancelled poll left its request open at the server, and a task that reached it then
        waited the whole ack wait (60 s) before anyone else got it.
        """
        polls = {task for task, _ in self._polls.values()}
        if polls:
            _, late = await asyncio.wait(polls, timeout=LONG_POLL_SECONDS + 1)
            for poll in late:
                poll.cancel()
            await asyncio.gather(*polls, return_exceptions=True)
            self._reap(polls)
        for held in self._held.values():
            with contextlib.suppress(Exception):
                await held.nak()
        self._held.clear()

    async def _fetch_first(self, order: list[JetStreamContext.PullSubscription]) -> Any:
        """The next message, from the first durable in `order` that has one (None: stopping).

        Every durable is polled at once, so work arriving on any of them is picked up at once (one
        durable polled after the other left urgent work waiting 0.2-0.3 s behind normal's long
        poll, docs/performance.md, "Session 11"). When several have work, the one first in `order`
        wins: a durable before it whose poll started less than PREFERRED_GRACE_SECONDS ago (so it
        may not have answered yet) gets that long to answer. A poll still running when this
        returns is not cancelled (a message it was just receiving would be lost until
        redelivery): the next call waits on it again. Messages fetched but not taken are held for
        a later turn, in front of new work.
        """
        while not self.stopping.is_set():
            for sub in order:
                if sub not in self._held and sub not in self._polls:
                    self._polls[sub] = (asyncio.create_task(self._poll(sub)), time.monotonic())
            first = self._first_held(order)
            if first is None:
                running = [task for task, _ in self._polls.values()]
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                self._reap(done)
                continue
            young = time.monotonic() - PREFERRED_GRACE_SECONDS
            preferred = [self._polls[sub][0] for sub in order[:order.index(first)]
                         if sub in self._polls and self._polls[sub][1] > young]
            if preferred:
                done, _ = await asyncio.wait(preferred, timeout=PREFERRED_GRACE_SECONDS)
                self._reap(done)
                first = self._first_held(order)
                assert first is not None
            return self._held.pop(first)
        return None

    async def _keep_held_alive(self, every: float) -> None:
        """A message fetched while every handler slot is busy waits for a slot; until then it is
        reported in progress, so JetStream does not give it to another dispatcher meanwhile.

        Ends with `stopping`, not only when cancelled (as the runtime's heartbeat): Python 3.11's
        asyncio.wait_for, inside nats-py (a publish that must flush a full pending buffer), returns
        instead of raising CancelledError when it completes just as the task is cancelled, and the
        stop waits for this loop."""
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=every)
            if self.stopping.is_set():
                return  # the pull loop's shutdown hands the held messages back
            self._reap({task for task, _ in self._polls.values() if task.done()})
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()

    def _first_held(self, order: list[JetStreamContext.PullSubscription]) -> JetStreamContext.PullSubscription | None:
        return next((sub for sub in order if sub in self._held), None)

    def _reap(self, done: set[asyncio.Task[Any]]) -> None:
        """Forget the finished polls among `done`, holding their messages."""
        for sub, (task, _) in list(self._polls.items()):
            if task in done:
                del self._polls[sub]
                if not task.cancelled() and task.result() is not None:
                    self._held[sub] = task.result()

    async def _poll(self, sub: JetStreamContext.PullSubscription) -> Any:
        try:
            msgs = await sub.fetch(1, timeout=LONG_POLL_SECONDS)
        except (TimeoutError, NatsTimeoutError):
            return None
        except Exception as exc:  # noqa: BLE001 - connection trouble: back off and pull again
            log.warning("fetch failed: %s", exc)
            await asyncio.sleep(1)
            return None
        return msgs[0] if msgs else None
