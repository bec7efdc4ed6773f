"""Test helpers: a receiver process, configuration, and reading events back from the stream."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DeliverPolicy

from shared import subjects
from shared.bus import Bus, event_from_msg
from shared.config.model import CaduceusConfig
from shared.config.state import fold, plan_changes, read_all_at
from shared.events import Event
from tests.harness import config_in_use


async def apply_settings(bus: Bus, *, unchecked: bool = False, wait: bool = True, **settings: Any) -> int:
    """Publish settings as `config apply` would and, unless not `wait` (no receiver is running),
    wait until the receiver (each of its processes) uses them; return their CONFIG sequence.
    `unchecked`: without the checks only new input gets (values outside what senders accept, for
    tests of the receiver's own limits)."""
    events, seq = await read_all_at(bus)
    document = {"settings": settings}
    desired = CaduceusConfig.from_items({("settings", "settings"): settings}) if unchecked \
        else CaduceusConfig.parse(document)
    for event in plan_changes(fold(events), desired, actor="test"):
        seq = await bus.publish(event)
    if wait:
        await config_in_use(bus, seq, ["receiver"])
    return seq


async def read_events(bus: Bus, event_type: str | None = None, settle: float = 0.5) -> list[Event]:
    subject = subjects.event_subject(event_type) if event_type else f"{subjects.EVENTS_PREFIX}.>"
    if event_type in subjects.PRIORITISED_TYPES:
        subject = f"{subjects.EVENTS_PREFIX}.{event_type}.>"
    sub = await bus.js.subscribe(subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    events: list[Event] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=settle)
            except (TimeoutError, NatsTimeoutError):
                break
            events.append(event_from_msg(msg))
    finally:
        await sub.unsubscribe()
    return events


async def wait_events(bus: Bus, event_type: str, count: int, timeout: float = 15) -> list[Event]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        events = await read_events(bus, event_type, settle=0.2)
        if len(events) >= count or loop.time() > deadline:
            return events
        await asyncio.sleep(0.2)


def blob_files(data_dir: Path, prefix: str = "instances") -> list[Path]:
    root = data_dir / "blobs" / prefix
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def idle_peak_bytes(applier: Any) -> int:
    """Start a JournalApplier, wait until it is idle, and return the most memory Python had
    allocated meanwhile (tracemalloc's peak)."""
    tracemalloc.start()
    try:
        applier.start()
        assert applier.wait_idle(10)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
