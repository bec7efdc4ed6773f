"""Configuration as the fold of the CONFIG stream.

`fold()` is the pure function; `ConfigFollower` keeps a live fold by following the stream with an
ordered consumer; `plan_changes()` turns a desired document into the events that reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from shared import subjects
from shared.bus import Bus, event_from_msg, readable_event
from shared.config.model import CaduceusConfig
from shared.events import ConfigItemChanged, Event, make_event

log = logging.getLogger(__name__)

ItemKey = tuple[str, str]


def apply_event(items: dict[ItemKey, dict[str, Any]], event: Event) -> None:
    change = ConfigItemChanged.model_validate(event.payload)
    key = (change.kind, change.name)
    if event.type == "config.item.deleted":
        items.pop(key, None)
    elif change.item is not None:
        items[key] = change.item


def fold(events: Iterable[Event]) -> dict[ItemKey, dict[str, Any]]:
    items: dict[ItemKey, dict[str, Any]] = {}
    for event in events:
        apply_event(items, event)
    return items


def plan_changes(current: dict[ItemKey, dict[str, Any]], desired: CaduceusConfig, actor: str,
                 comment: str = "") -> list[Event]:
    """The events that turn `current` into `desired`: created, updated, deleted; nothing if equal."""
    wanted = desired.items()
    events: list[Event] = []
    for (kind, name), item in sorted(wanted.items()):
        old = current.get((kind, name))
        if old == item:
            continue
        type_ = "config.item.created" if old is None else "config.item.updated"
        changed = [] if old is None else sorted(k for k in set(old) | set(item) if old.get(k) != item.get(k))
        events.append(make_event(type_, actor, ConfigItemChanged(kind=kind, name=name, item=item,  # type: ignore[arg-type]
                                                                 comment=comment, changed_fields=changed),
                                 config_kind=kind, config_name=name))
    for (kind, name) in sorted(set(current) - set(wanted)):
        if kind == "settings":
            continue  # settings always exist; an omitted block means "all defaults", planned above
        events.append(make_event("config.item.deleted", actor,
                                 ConfigItemChanged(kind=kind, name=name, item=None, comment=comment),  # type: ignore[arg-type]
                                 config_kind=kind, config_name=name))
    return events


async def read_all(bus: Bus) -> list[Event]:
    """Every event on the CONFIG stream, in order (for history, apply and one-shot reads)."""
    events, _ = await read_all_at(bus)
    return events


async def read_all_at(bus: Bus) -> tuple[list[Event], int]:
    """`read_all`, and the CONFIG sequence read up to: the last message, readable or not (what a
    change based on this read must expect to be the stream's last sequence)."""
    last = await bus.last_seq(subjects.CONFIG_STREAM)
    if last == 0:
        return [], 0
    events: list[Event] = []
    sub = await bus.js.subscribe(f"{subjects.CONFIG_PREFIX}.>", ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
    try:
        while True:
            msg = await sub.next_msg(timeout=10)
            event = readable_event(msg)
            if event is not None:
                events.append(event)
            seq = int(msg.metadata.sequence.stream)
            if seq >= last:
                break
    finally:
        await sub.unsubscribe()
    return events, seq


# How often a follower checks that the CONFIG stream is still the one it folds (its creation time).
STREAM_CHECK_SECONDS = 5.0


async def config_stream_id(bus: Bus) -> str:
    """Which incarnation of the CONFIG stream exists now: its creation time ("" if it has none).

    Sequences of two incarnations (a NATS store lost or replaced, the stream declared again) are
    not comparable: a configuration sequence means something only together with this."""
    created = await bus.stream_created(subjects.CONFIG_STREAM)
    return created.isoformat() if created is not None else ""


class ConfigFollower:
    """Keeps `self.config` equal to the fold of the CONFIG stream, live, also across a stream
    created anew under it (the NATS store lost or replaced).

    nats-py's ordered consumer, once the stream it follows is gone, creates its consumer again from
    the old stream's last sequence + 1: on a stream declared again it receives nothing until that
    stream grows beyond the old one, and then folds it onto the old items. So the follower watches
    the stream's creation time (every STREAM_CHECK_SECONDS, and before it applies a message from a
    consumer created anew) and, when it changed, folds the new stream from its start.

    While the new stream is empty the configuration folded from the old one stays in force
    (`replaced` is True): a lost store must not open a receiver with an allow-list or TLS to the
    defaults. Once the new stream has items, its fold is the configuration.
    """

    def __init__(self, bus: Bus, on_change: Callable[[CaduceusConfig], None] | None = None) -> None:
        self.bus = bus
        self.items: dict[ItemKey, dict[str, Any]] = {}
        self.config = CaduceusConfig()
        # The CONFIG sequence `config` is the fold up to, on the stream `stream` (its creation time).
        self.last_seq = 0
        self.stream = ""
        # The stream was created anew and is still empty: `config` is the old stream's fold.
        self.replaced = False
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._sub: Any = None
        self._generation = 0          # messages of an earlier subscription are dropped
        self._folding: dict[ItemKey, dict[str, Any]] = {}   # the fold of `stream` so far
        self._good: CaduceusConfig | None = None            # the last readable configuration of it
        self._initial_last = 0
        self._caught_up = False
        self._consumer = ""           # the ordered consumer the last message came from
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._switching = asyncio.Lock()
        self._switch_task: asyncio.Task[bool] | None = None

    async def start(self) -> None:
        self.stream = await config_stream_id(self.bus)
        await self._follow()
        self._watch_task = asyncio.create_task(self._watch())

    async def _follow(self) -> None:
        """Subscribe to `self.stream` from its start; `config` changes once the fold caught up."""
        self._generation += 1
        generation = self._generation
        self._folding, self._good, self._consumer = {}, None, ""
        self._initial_last = await self.bus.last_seq(subjects.CONFIG_STREAM)
        self._caught_up = False
        if self._initial_last == 0:
            self._caught_up_with(0)

        async def handle(msg: Any) -> None:
            if generation == self._generation:
                await self._handle(msg)

        self._sub = await self.bus.js.subscribe(f"{subjects.CONFIG_PREFIX}.>", ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.ALL, cb=handle)

    async def _handle(self, msg: Any) -> None:
        consumer = str(msg.metadata.consumer or "")
        if self._consumer and consumer != self._consumer and await self._other_stream():
            # The ordered consumer was created again (after a reconnect, or with the stream gone) on
            # a new stream, from the old one's position: the new stream is folded from its start
            # instead (not here: unsubscribing inside our own callback would cancel it).
            if self._switch_task is None or self._switch_task.done():
                self._switch_task = asyncio.create_task(self._replaced())
            return
        self._consumer = consumer
        try:
            event = event_from_msg(msg)
            apply_event(self._folding, event)
            self._good = CaduceusConfig.from_items(self._folding)
        except Exception:
            # An item this version cannot read (or a message that is no event at all) must not take
            # the service down, nor keep it from becoming ready; it keeps the last good
            # configuration and says so.
            log.exception("configuration message %s on %s could not be applied; keeping previous "
                          "configuration", msg.metadata.sequence.stream, msg.subject)
        seq = int(msg.metadata.sequence.stream or 0)
        if self._caught_up or seq >= self._initial_last:
            self._caught_up_with(seq)

    def _caught_up_with(self, seq: int) -> None:
        """The fold of `stream` up to `seq` is complete: make it the configuration (an empty new
        stream keeps the old one), and tell the service."""
        self._caught_up = True
        if seq > 0:
            self.items = self._folding
            if self._good is not None:
                self.config = self._good
            if self.replaced:
                log.warning("the CONFIG stream created anew has items: its configuration is in force now")
            self.replaced = False
        self.last_seq = seq
        if not self.ready.is_set():
            self.ready.set()
        if self._on_change:
            self._on_change(self.config)

    async def _other_stream(self) -> bool:
        try:
            return await config_stream_id(self.bus) != self.stream
        except Exception:  # noqa: BLE001 - cannot tell now: apply it; the next check folds anew if need be
            return False

    async def _replaced(self) -> bool:
        """If the CONFIG stream was created anew since we subscribed, follow the new one: True."""
        async with self._switching:
            try:
                now = await config_stream_id(self.bus)
            except NotFoundError:
                return False   # gone for now: nothing to fold; the one declared next is checked then
            if now == self.stream:
                return False
            await self._switch(now)
            return True

    async def _switch(self, now: str) -> None:
        log.warning("the CONFIG stream was created anew (NATS store lost or replaced): folding the new "
                    "one from its start; the configuration in force stays until it has items")
        old, old_stream, old_replaced = self._sub, self.stream, self.replaced
        self._generation += 1   # (nothing more of the old subscription is folded)
        with contextlib.suppress(Exception):
            await old.unsubscribe()
        self.stream, self.replaced = now, True
        try:
            await self._follow()
        except Exception:
            # (NATS unreachable meanwhile: the next check finds the stream new again and retries.)
            self.stream, self.replaced = old_stream, old_replaced
            raise

    async def _watch(self) -> None:
        # Ends with `_stopping`, not only when cancelled: Python 3.11's asyncio.wait_for inside
        # nats-py's stream_info request can swallow the cancel, and stop() awaits this task.
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), STREAM_CHECK_SECONDS)
            if self._stopping.is_set():
                return
            try:
                await self._replaced()
            except Exception as exc:  # noqa: BLE001 - NATS unreachable for now: check again later
                log.debug("could not check the CONFIG stream: %s", exc)

    async def wait_ready(self, timeout: float = 30) -> CaduceusConfig:
        await asyncio.wait_for(self.ready.wait(), timeout)
        return self.config

    async def stop(self) -> None:
        self._stopping.set()
        for task in (self._watch_task, self._switch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection may already be closed
                pass
