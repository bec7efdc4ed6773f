"""`caduceus retry` and a dispatcher find tasks in the bookkeeper's log (beyond the stream's retention), else on the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from cli import retry_cmd
from conftest import expire_events
from services.bookkeeper.retention import set_max_age
from services.bookkeeper.service import BookkeeperService
from services.bookkeeper.tests.scenario import running, series_events, settings_for, wait_caught_up
from services.dispatcher.handlers import Dispatcher
from services.dispatcher.progress import ProgressStore
from shared import subjects
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.events import DispatchFailed, DispatchRequested, Event, deterministic_event_id, make_event

STUDY = "1.2.826.0.1.3680043.10.543.77"
FAILED, DONE = f"{STUDY}.1", f"{STUDY}.2"


def task_of(series_uid: str) -> str:
    return deterministic_event_id(f"batch-{series_uid}", "rule-ct", "pacs")


async def publish_story(bus: Bus) -> None:
    await bus.publish_many(series_events(STUDY, FAILED, 2, "error") + series_events(STUDY, DONE, 2, "done"))


@asynccontextmanager
async def story_in_the_log_only(bus: Bus, nats_url: str,
                                data_dir: Path) -> AsyncIterator[tuple[BookkeeperService, int]]:
    """A running bookkeeper that stored the story, which then expired from the stream; and the
    stream's last sequence before the expiry."""
    database_url = f"sqlite:///{data_dir / 'bookkeeper.sqlite'}"
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        # Its retention applied (90 days), the bookkeeper looks again only in a minute: long
        # enough for a stream that keeps events a second.
        while "events_retention_days" not in service.health_details():
            await asyncio.sleep(0.05)
        await publish_story(bus)
        await wait_caught_up(bus, service.engine)
        last = await bus.last_seq(subjects.EVENTS_STREAM)
        await expire_events(bus, last)
        yield service, last


async def test_without_a_bookkeeper_the_stream_is_read(bus: Bus) -> None:
    await publish_story(bus)
    tasks = await retry_cmd.read_tasks(bus, [], FAILED)
    assert tasks[task_of(FAILED)].state == "error"
    assert tasks[task_of(DONE)].state == "done"   # the stream is read whole
    chosen = retry_cmd._choose(tasks, [], FAILED)
    assert [view.request.payload["task_id"] for view in chosen] == [task_of(FAILED)]


def study_task_events() -> list[Event]:
    """A study rule's dispatch task (no series UID) that failed."""
    task_id = deterministic_event_id("batch-study", "rule-study", "pacs")
    requested = make_event("dispatch.requested", "router", DispatchRequested(
        task_id=task_id, rule="rule-study", target="pacs", manifest_key="manifests/study.json", instance_count=4),
        task_id=task_id, study_uid=STUDY)
    failed = requested.caused("dispatch.failed", "dispatcher", DispatchFailed(
        task_id=task_id, target="pacs", attempts=3, error="connection refused"))
    return [requested, failed]


async def test_a_study_retries_its_study_tasks_and_those_of_its_series(bus: Bus, nats_url: str,
                                                                     data_dir: Path) -> None:
    study_task = study_task_events()[0].payload["task_id"]
    await bus.publish_many(study_task_events())
    # On the stream (no bookkeeper), and from the log (one running).
    for reading in ("stream", "log"):
        if reading == "stream":
            await publish_story(bus)
            tasks = await retry_cmd.read_tasks(bus, [], None, STUDY)
        else:
            database_url = f"sqlite:///{data_dir / 'bookkeeper.sqlite'}"
            async with running(settings_for(nats_url, database_url, data_dir)) as service:
                await wait_caught_up(bus, service.engine)
                tasks = await retry_cmd.read_tasks(bus, [], None, STUDY)
        chosen = retry_cmd._choose(tasks, [], None, STUDY)
        assert sorted(view.request.payload["task_id"] for view in chosen) == sorted([study_task, task_of(FAILED)])
        # --series alone does not reach a study rule's task.
        assert [v.request.payload["task_id"] for v in retry_cmd._choose(tasks, [], FAILED)] == [task_of(FAILED)]


async def test_tasks_whose_events_expired_from_the_stream_are_found_in_the_log(
        bus: Bus, nats_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with story_in_the_log_only(bus, nats_url, data_dir) as (service, last):
        tasks = await retry_cmd.read_tasks(bus, [], FAILED)
        assert set(tasks) == {task_of(FAILED)}   # one series asked, one series read
        assert tasks[task_of(FAILED)].state == "error"
        assert tasks[task_of(FAILED)].error == "connection refused"
        tasks = await retry_cmd.read_tasks(bus, [task_of(DONE)], None)
        assert tasks[task_of(DONE)].state == "done"

        # Events the bookkeeper has not stored yet come from the stream's tail; one it stored
        # meanwhile comes from both and is folded once.
        await set_max_age(bus.js, 90 * 86400.0)
        retry = series_events(STUDY, FAILED, 2, "error")[-1].caused(
            "dispatch.retry_requested", "user:test", {"task_id": task_of(FAILED), "reason": "back"},
            task_id=task_of(FAILED))
        await bus.publish(retry)
        await wait_caught_up(bus, service.engine)

        async def stored_until_before(_bus: Bus) -> int:
            return last

        monkeypatch.setattr(retry_cmd, "_bookkeeper_stored_until", stored_until_before)
        tasks = await retry_cmd.read_tasks(bus, [], FAILED)
        assert tasks[task_of(FAILED)].state == "queued"

        from_log = retry_cmd._dispatch_events_from_bookkeeper

        async def not_stored_yet(*args: object) -> dict[str, Event]:
            found = await from_log(*args)  # type: ignore[arg-type]
            return {key: event for key, event in found.items() if event.type != "dispatch.retry_requested"}

        monkeypatch.setattr(retry_cmd, "_dispatch_events_from_bookkeeper", not_stored_yet)
        tasks = await retry_cmd.read_tasks(bus, [], FAILED)
        assert tasks[task_of(FAILED)].state == "queued"


async def test_a_dispatcher_finds_a_task_request_gone_from_the_stream_in_the_log(
        bus: Bus, nats_url: str, data_dir: Path) -> None:
    """What a retry of a task no dispatcher has a record of needs (Dispatcher.handle_retry): its request."""
    dispatcher = Dispatcher(bus, await ProgressStore.open(bus.js), LocalBlobStore(data_dir / "blobs"),
                            CaduceusConfig, 15.0, {})
    async with story_in_the_log_only(bus, nats_url, data_dir):
        found = await dispatcher.find_request(task_of(FAILED))
        assert found is not None and found.type == "dispatch.requested" and found.series_uid == FAILED
    # No bookkeeper, and nothing on the stream: not found, and no error.
    assert await dispatcher.find_request(task_of(FAILED)) is None
