"""Which work runs when: urgent before normal without starving it, the off-peak window, back-off."""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import datetime
from pathlib import Path

from bench.common import stage_files
from services.dispatcher.schedule import attempt_delay, seconds_until_offpeak
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from tests.peers import StoreScp, make_series

from .conftest import (
    apply_pacs_config,
    events_of,
    request_dispatch,
    running_dispatcher,
    wait_events,
)


def test_offpeak_window_wrapping_midnight() -> None:
    at = lambda hhmm: datetime.fromisoformat(f"2026-01-05T{hhmm}:00")  # noqa: E731
    assert seconds_until_offpeak(at("23:00"), "22:00", "06:00") == 0
    assert seconds_until_offpeak(at("05:59"), "22:00", "06:00") == 0
    assert seconds_until_offpeak(at("06:00"), "22:00", "06:00") == 16 * 3600
    assert seconds_until_offpeak(at("21:30"), "22:00", "06:00") == 1800


def test_offpeak_window_within_a_day_and_always() -> None:
    at = lambda hhmm: datetime.fromisoformat(f"2026-01-05T{hhmm}:00")  # noqa: E731
    assert seconds_until_offpeak(at("13:00"), "12:00", "14:00") == 0
    assert seconds_until_offpeak(at("14:00"), "12:00", "14:00") == 22 * 3600
    assert seconds_until_offpeak(at("11:00"), "12:00", "14:00") == 3600
    assert seconds_until_offpeak(at("03:00"), "00:00", "00:00") == 0


def test_backoff_doubles_and_is_capped() -> None:
    assert [attempt_delay(n, 60, 300) for n in (1, 2, 3, 4, 5)] == [60, 120, 240, 300, 300]


async def test_urgent_first_but_normal_not_starved(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                   blob_store: LocalBlobStore, storescp: StoreScp) -> None:
    files = make_series(tmp_path / "series", 1)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    normal = [await request_dispatch(bus, manifest, key, "pacs", task_id=f"normal-{i}") for i in range(4)]
    urgent = [await request_dispatch(bus, manifest, key, "pacs", priority="urgent", task_id=f"urgent-{i}")
              for i in range(4)]
    assert len(normal + urgent) == 8
    # One task at a time; every 3rd pull asks normal work first.
    async with running_dispatcher(nats_url, data_dir, dispatch_concurrency=1, dispatch_normal_every=3):
        done = await wait_events(bus, "dispatch.completed", count=8)
    order = [e.payload["task_id"].split("-")[0] for e in done]
    assert order == ["urgent", "urgent", "normal", "urgent", "urgent", "normal", "normal", "normal"]


def closed_window() -> tuple[str, str]:
    """A one-minute off-peak window that opened two minutes ago: closed now, opens in ~23 h 58 min."""
    now = datetime.now().astimezone()
    start = f"{(now.hour * 60 + now.minute - 2) % 1440 // 60:02d}:{(now.minute - 2) % 60:02d}"
    end = f"{(now.hour * 60 + now.minute - 1) % 1440 // 60:02d}:{(now.minute - 1) % 60:02d}"
    return start, end


async def test_offpeak_task_waits_outside_the_window(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                     blob_store: LocalBlobStore, storescp: StoreScp) -> None:
    files = make_series(tmp_path / "series", 2)
    manifest, key = await stage_files(blob_store, files)
    start, end = closed_window()
    await apply_pacs_config(bus, storescp.port, storescp.aet, offpeak_start=start, offpeak_end=end)
    async with running_dispatcher(nats_url, data_dir):
        waiting = await request_dispatch(bus, manifest, key, "pacs", priority="offpeak")
        normal = await request_dispatch(bus, manifest, key, "pacs")
        await wait_events(bus, "dispatch.completed", normal.task_id)
        assert await events_of(bus, "dispatch.completed", waiting.task_id) == []
        assert await events_of(bus, "dispatch.attempt_failed") == []
        info = await bus.js.consumer_info("EVENTS", "dispatcher-normal")
        assert info.num_ack_pending == 1  # held back with a delay, not lost and not failed
    # Inside the window (start == end reads as "always") it goes out.
    await apply_pacs_config(bus, storescp.port, storescp.aet, offpeak_start="00:00", offpeak_end="00:00")
    async with running_dispatcher(nats_url, data_dir):
        now_task = await request_dispatch(bus, manifest, key, "pacs", priority="offpeak")
        await wait_events(bus, "dispatch.completed", now_task.task_id)


async def test_idle_dispatcher_starts_urgent_and_normal_work_at_once(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp: StoreScp) -> None:
    # Both durables are polled at the same time: a task does not wait for the other durable's
    # long poll to end (which left it waiting up to 0.3 s, docs/performance.md "Session 11").
    files = make_series(tmp_path / "series", 1)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    waits: dict[str, list[float]] = {"normal": [], "urgent": []}
    async with running_dispatcher(nats_url, data_dir):
        for n in range(8):
            await asyncio.sleep(0.2 + 0.13 * n)  # arrivals at different points of the polls
            priority = "urgent" if n % 2 else "normal"
            requested = await request_dispatch(bus, manifest, key, "pacs", priority=priority)
            (completed,) = await wait_events(bus, "dispatch.completed", requested.task_id)
            busy = float(completed.payload["duration_seconds"])
            waits[priority].append((completed.occurred_at - requested.occurred_at).total_seconds() - busy)
    # Polled one after the other, urgent work waited 0.21-0.25 s here behind normal's long poll.
    assert statistics.median(waits["urgent"]) < 0.1 and statistics.median(waits["normal"]) < 0.1, waits


async def test_many_waiting_tasks_do_not_hold_back_new_work(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                            blob_store: LocalBlobStore, storescp: StoreScp) -> None:
    # A task waiting for the off-peak window (or for its next attempt) is a message JetStream counts
    # as pending. A night's research copies (one task per series) used to fill the normal durable's
    # max_ack_pending (100): from then on no normal task or manual retry was delivered until the window.
    files = make_series(tmp_path / "series", 1)
    manifest, key = await stage_files(blob_store, files)
    start, end = closed_window()
    await apply_pacs_config(bus, storescp.port, storescp.aet, offpeak_start=start, offpeak_end=end)
    async with running_dispatcher(nats_url, data_dir):
        for _ in range(120):
            await request_dispatch(bus, manifest, key, "pacs", priority="offpeak")
        deadline = time.monotonic() + 30
        while (await bus.js.consumer_info("EVENTS", "dispatcher-normal")).num_ack_pending < 100:
            assert time.monotonic() < deadline, "the off-peak tasks were not taken"
            await asyncio.sleep(0.2)
        normal = await request_dispatch(bus, manifest, key, "pacs")
        await wait_events(bus, "dispatch.completed", normal.task_id, timeout=20)
