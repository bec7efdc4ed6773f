"""Helpers for router tests: publish synthetic image.received events, run routers in-process,
read what they published."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from services.router.service import RouterService
from shared.blobstore import LocalBlobStore, blob_key
from shared.bus import Bus, replay
from shared.config.model import CaduceusConfig
from shared.config.state import fold, plan_changes, read_all_at
from shared.events import Event, ImageReceived, make_event
from shared.settings import Settings
from tests.harness import config_in_use

FAST = {"series_complete_seconds": 1, "study_complete_seconds": 30, "study_force_complete_seconds": 600}
TARGETS = {"pacs": {"host": "127.0.0.1", "port": 11113, "called_aet": "PACS"},
           "archive": {"host": "127.0.0.1", "port": 11114, "called_aet": "ARCHIVE"}}


async def apply_config(bus: Bus, document: dict[str, Any], running: list[str] | None = None) -> None:
    """Publish `document` as `config apply` would; `running`: the services the test runs now, whose
    heartbeats must say they use it before this returns."""
    events, seq = await read_all_at(bus)
    for event in plan_changes(fold(events), CaduceusConfig.parse(document), actor="test"):
        seq = await bus.publish(event)
    if running:
        await config_in_use(bus, seq, running)


async def send_image(bus: Bus, store: LocalBlobStore, study: str, series: str, sop: str,
                     tags: dict[str, str] | None = None, content: bytes = b"") -> Event:
    """What the receiver does for one instance: blob first, then image.received."""
    event = await stored_image(store, study, series, sop, tags, content)
    event.stream_seq = await bus.publish(event)
    return event


async def stored_image(store: LocalBlobStore, study: str, series: str, sop: str,
                       tags: dict[str, str] | None = None, content: bytes = b"") -> Event:
    """The blob of one instance, written, and its image.received, not yet published."""
    key = blob_key("instances", study, series, f"{sop}.dcm")
    data = content or f"DICM {study} {series} {sop}".encode()
    await store.put(key, data)
    all_tags = {"StudyInstanceUID": study, "SeriesInstanceUID": series, "SOPInstanceUID": sop,
                "Modality": "CT", **(tags or {})}
    event = make_event("image.received", "receiver", ImageReceived(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", blob_key=key,
        size=len(data), sha256=hashlib.sha256(data).hexdigest(), calling_aet="MODALITY", called_aet="CADUCEUS",
        peer_host="127.0.0.1", peer_port=40000, association_id="assoc-1", tags=all_tags),
        study_uid=study, series_uid=series, sop_uid=sop)
    return event


async def send_series(bus: Bus, store: LocalBlobStore, study: str, series: str, count: int,
                      tags: dict[str, str] | None = None) -> list[Event]:
    return [await send_image(bus, store, study, series, f"{series}.{i}", tags) for i in range(1, count + 1)]


async def published(bus: Bus, type_: str | None = None) -> list[Event]:
    events = [e async for e in replay(bus, "caduceus.events.>", idle_timeout=2)]
    return [e for e in events if type_ is None or e.type == type_]


async def wait_for(bus: Bus, predicate: Callable[[list[Event]], bool], timeout: float = 15) -> list[Event]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        events = await published(bus)
        if predicate(events):
            return events
        if asyncio.get_running_loop().time() > deadline:
            types = [e.type for e in events]
            raise AssertionError(f"condition not reached in {timeout}s; events: {types}")
        await asyncio.sleep(0.3)


def of_type(events: list[Event], type_: str) -> list[Event]:
    return [e for e in events if e.type == type_]


@contextlib.asynccontextmanager
async def running_router(nats_url: str, data_dir: Path) -> AsyncIterator[RouterService]:
    router = RouterService(Settings(nats_url=nats_url, data_dir=data_dir, heartbeat_seconds=5))
    task = asyncio.create_task(router.run())
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while not router.caught_up:
            if task.done():
                task.result()
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("router did not catch up")
            await asyncio.sleep(0.05)
        yield router
    finally:
        router.request_stop("test done")
        await asyncio.wait_for(task, 30)
