"""Configuration as the fold of the CONFIG stream.

`fold()` is the pure function; `ConfigFollower` keeps a live fold by following the stream with an
ordered consumer; `plan_changes()` turns a desired document into the events that reach it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from nats.js.api import DeliverPolicy

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


class ConfigFollower:
    """Keeps `self.config` equal to the fold of the CONFIG stream, live."""

    def __init__(self, bus: Bus, on_change: Callable[[CaduceusConfig], None] | None = None) -> None:
        self.bus = bus
        self.items: dict[ItemKey, dict[str, Any]] = {}
        self.config = CaduceusConfig()
        self.last_seq = 0
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._sub: Any = None

    async def start(self) -> None:
        initial_last = await self.bus.last_seq(subjects.CONFIG_STREAM)
        if initial_last == 0:
            self.ready.set()
        self._sub = await self.bus.js.subscribe(f"{subjects.CONFIG_PREFIX}.>", ordered_consumer=True,
                                                deliver_policy=DeliverPolicy.ALL, cb=self._handle)
        self._initial_last = initial_last

    async def _handle(self, msg: Any) -> None:
        try:
            event = event_from_msg(msg)
            apply_event(self.items, event)
            self.config = CaduceusConfig.from_items(self.items)
        except Exception:
            # An item this version cannot read (or a message that is no event at all) must not take
            # the service down, nor keep it from becoming ready; it keeps the last good
            # configuration and says so.
            log.exception("configuration message %s on %s could not be applied; keeping previous "
                          "configuration", msg.metadata.sequence.stream, msg.subject)
        self.last_seq = msg.metadata.sequence.stream or self.last_seq
        if self.last_seq >= self._initial_last:
            if not self.ready.is_set():
                self.ready.set()
            if self._on_change:
                self._on_change(self.config)

    async def wait_ready(self, timeout: float = 30) -> CaduceusConfig:
        await asyncio.wait_for(self.ready.wait(), timeout)
        return self.config

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - connection may already be closed
                pass
