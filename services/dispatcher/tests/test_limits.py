"""A target's max_associations: tasks beyond it wait their turn in the dispatcher instead of being
rejected by the peer, without holding up other targets, and are handed back at once on SIGTERM.
The peer is a pynetdicom Storage SCP that rejects associations beyond its own limit."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from bench.common import stage_files
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from tests.peers import StoreScp, make_series

from .conftest import (
    FAST_RETRIES,
    apply_config,
    dicom_target,
    events_of,
    request_dispatch,
    running_dispatcher,
    start_dispatcher_process,
    wait_events,
)
from .test_statuses import ScriptedScp


async def test_tasks_beyond_a_targets_max_associations_wait_their_turn(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore) -> None:
    # Five tasks at once to a target with max_associations: 2: without the limit the dispatcher's
    # four handler slots would open four associations (a PACS that takes two rejects the others as
    # "local limit exceeded"). With it, three tasks wait in the dispatcher, each longer than the ack
    # wait (1.5 s): their messages are kept in progress, so none is redelivered meanwhile.
    scp = ScriptedScp(store_seconds=0.25)
    try:
        manifest, key = await stage_files(blob_store, make_series(tmp_path / "series", 4))  # ~1 s per task
        await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1}, "targets": {
            "scripted": dicom_target(scp.port, "SCRIPTED", max_associations=2)}})
        async with running_dispatcher(nats_url, data_dir, dispatch_ack_wait_seconds=1.5) as service:
            tasks = [(await request_dispatch(bus, manifest, key, "scripted")).task_id or "" for _ in range(5)]
            await wait_events(bus, "dispatch.completed", count=5, timeout=30)
            assert service.counters.get("tasks_waited_for_associations", 0) >= 1, "no task waited: test proves little"
    finally:
        scp.server.shutdown()
    assert await events_of(bus, "dispatch.attempt_failed") == []
    assert scp.most_open == 2
    started = await events_of(bus, "dispatch.started")
    assert sorted(e.payload["task_id"] for e in started) == sorted(tasks)
    assert {e.payload["delivery"] for e in started} == {1}, "a waiting task was redelivered"
    assert len(scp.received) == 5 * 4


async def test_a_task_waiting_for_its_target_does_not_hold_up_other_targets(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp: StoreScp) -> None:
    # Three handler slots. Three tasks to a slow PACS that takes one association, then one to another
    # target: the second and third wait for the PACS without their slot, so the fourth is sent at
    # once rather than after the PACS's tasks.
    scp = ScriptedScp(max_associations=1, store_seconds=0.5)
    try:
        slow, slow_key = await stage_files(blob_store, make_series(tmp_path / "slow", 6))  # ~3 s per task
        quick, quick_key = await stage_files(blob_store, make_series(tmp_path / "quick", 2))
        await apply_config(bus, {"settings": FAST_RETRIES, "targets": {
            "pacs": dicom_target(scp.port, "SCRIPTED", max_associations=1),
            "archive": dicom_target(storescp.port, storescp.aet)}})
        async with running_dispatcher(nats_url, data_dir, dispatch_concurrency=3):
            to_pacs = [await request_dispatch(bus, slow, slow_key, "pacs") for _ in range(3)]
            to_archive = await request_dispatch(bus, quick, quick_key, "archive")
            [archived] = await wait_events(bus, "dispatch.completed", to_archive.task_id, timeout=15)
            first_to_pacs = await events_of(bus, "dispatch.completed", to_pacs[0].task_id)
            await wait_events(bus, "dispatch.completed", count=4, timeout=30)
        assert first_to_pacs == [], "the archive waited behind the PACS"
        assert archived.payload["sent"] == 2
        # (The peer may still reject one now and then: it counts an association until its thread
        # has ended, a moment after the release; the dispatcher asks again shortly, in the attempt.)
        assert scp.most_open == 1
        assert await events_of(bus, "dispatch.attempt_failed") == []
    finally:
        scp.server.shutdown()


async def test_sigterm_hands_a_waiting_task_back_at_once(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore) -> None:
    # A dispatcher process stops while one task sends and another waits for the target: the waiting
    # one is handed back at once (another dispatcher takes it well before the 30 s ack wait), the
    # sending one is finished, and the process exits cleanly.
    scp = ScriptedScp(max_associations=1, store_seconds=0.5)
    try:
        manifest, key = await stage_files(blob_store, make_series(tmp_path / "series", 6))  # ~3 s per task
        await apply_config(bus, {"settings": FAST_RETRIES, "targets": {
            "pacs": dicom_target(scp.port, "SCRIPTED", max_associations=1)}})
        process = start_dispatcher_process(nats_url, data_dir, tmp_path / "dispatcher.log",
                                           CADUCEUS_DISPATCH_ACK_WAIT_SECONDS="30")
        try:
            sending = await request_dispatch(bus, manifest, key, "pacs")
            await wait_events(bus, "dispatch.started", sending.task_id, timeout=20)
            waiting = await request_dispatch(bus, manifest, key, "pacs")
            deadline = time.monotonic() + 10
            while b"waits for one of the 1 association" not in (tmp_path / "dispatcher.log").read_bytes():
                assert time.monotonic() < deadline, "the second task never waited"
                await asyncio.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            async with running_dispatcher(nats_url, data_dir):
                [started] = await wait_events(bus, "dispatch.started", waiting.task_id, timeout=10)
                taken_after = time.monotonic() - stopped_at
                await wait_events(bus, "dispatch.completed", count=2, timeout=30)
            assert process.wait(25) == 0
        finally:
            if process.poll() is None:
                process.kill()
        # (Delivery 3 when the stopping process's last poll fetched it once more and handed it back too.)
        assert started.payload["delivery"] >= 2 and taken_after < 10
        [first] = await events_of(bus, "dispatch.started", sending.task_id)
        assert started.payload["instance"] != first.payload["instance"]
        assert await events_of(bus, "dispatch.attempt_failed") == []
    finally:
        scp.server.shutdown()
