"""The first processor: declares its durable, keeps process.requested work pending, never acks it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.processor.service import ProcessorService
from shared import subjects
from shared.bus import Bus
from shared.events import Priority, ProcessRequested, make_event
from shared.settings import Settings


async def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_process_requests_stay_pending_and_are_reported(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    processor = ProcessorService(Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=0.3))
    processor.backlog_refresh_seconds = 0.1
    running = asyncio.create_task(processor.run())
    await _wait_for(lambda: hasattr(processor, "backlog") and processor.backlog.get("work_pending") == 0)

    priorities: tuple[Priority, ...] = ("normal", "urgent")
    for n, priority in enumerate(priorities):
        await bus.publish(make_event("process.requested", "router", ProcessRequested(
            task_id=f"t{n}", rule="r", modules=["m"], manifest_key="manifests/b.json", instance_count=3,
            priority=priority), task_id=f"t{n}"))
    await _wait_for(lambda: processor.backlog.get("work_pending") == 2)
    assert processor.health_details()["executes_modules"] is False

    # The heartbeat carries the backlog.
    subject = subjects.status_subject("processor", processor.instance)
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        beat = await bus.get_last_for_subject(subjects.STATUS_STREAM, subject)
        if beat is not None and beat.payload["details"].get("work_pending") == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, beat
        await asyncio.sleep(0.1)

    processor.request_stop("test over")
    await asyncio.wait_for(running, 15)

    # Nothing was delivered, acked or dropped: the work waits for a processor that can do it.
    info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.PROCESSOR_WORK.name)
    assert info.num_pending == 2 and info.num_ack_pending == 0
    assert (info.delivered.stream_seq or 0) == 0
