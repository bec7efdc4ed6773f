"""Stopping a dispatcher: its background loops end with the stop even when a cancel gets lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from services.dispatcher.service import DispatcherService

from .conftest import dispatcher_settings


class HeldMessage:
    """A fetched message waiting for a handler slot. Its first progress report is answered just as
    the stop cancels it: Python 3.11's asyncio.wait_for (inside nats-py, e.g. a publish that has
    to flush a full pending buffer) then returns instead of raising CancelledError."""

    def __init__(self) -> None:
        self.reporting = asyncio.Event()
        self.reports = 0
        self.naked = False

    async def in_progress(self) -> None:
        self.reports += 1
        if self.reporting.is_set():
            return
        self.reporting.set()
        try:
            await asyncio.sleep(3600)  # waiting for the flush...
        except asyncio.CancelledError:
            return  # ...which completed with the cancel: the cancel is lost

    async def nak(self) -> None:
        self.naked = True


async def test_a_held_message_report_that_loses_its_cancel_does_not_hang_the_stop(
        nats_url: str, data_dir: Path) -> None:
    # An ack wait of 1.5 s reports held messages in progress every 0.5 s.
    service = DispatcherService(dispatcher_settings(nats_url, data_dir, dispatch_ack_wait_seconds=1.5))
    running = asyncio.create_task(service.run())
    deadline = time.monotonic() + 15
    while not hasattr(service, "gate"):
        assert not running.done() and time.monotonic() < deadline, "dispatcher did not start"
        await asyncio.sleep(0.05)
    held = HeldMessage()
    service._held[object()] = held  # type: ignore[index]  # (held for a durable; which one does not matter)
    await asyncio.wait_for(held.reporting.wait(), 10)
    service.request_stop("test: stop")
    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.shield(running), 10)
    finally:
        if not running.done():
            running.cancel()  # (a second cancel ends the loop, so the test itself does not hang)
            await asyncio.gather(running, return_exceptions=True)
    assert time.monotonic() - started < 5
    assert held.naked, "the held message was not handed back at the stop"
