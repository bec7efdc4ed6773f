"""The query API over NATS request/reply, through shared.bookkeeper_client, on both backends."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.bookkeeper.tests.scenario import (
    SERIES_DISCARD,
    SERIES_DONE,
    SERIES_ERROR,
    STUDY_A,
    mixed_events,
    running,
    settings_for,
    wait_caught_up,
)
from shared.bookkeeper_client import BookkeeperClient, BookkeeperError, BookkeeperUnavailable, EventsRequest
from shared.bus import Bus
from shared.subjects import rpc_subject

REPO = Path(__file__).resolve().parents[3]


async def test_queries(bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    events = mixed_events(images=6)
    await bus.publish_many(events)
    client = BookkeeperClient(bus)
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        await wait_caught_up(bus, service.engine)

        page = await client.events(series_uid=SERIES_DONE)
        done_events = [e for e in events if e.series_uid == SERIES_DONE]
        assert [e.event_id for e in page.events] == [e.event_id for e in done_events]
        assert [e.stream_seq for e in page.events] == sorted(e.stream_seq for e in page.events)
        assert page.next_since_seq is None
        assert page.events[0].payload["tags"]["PatientID"] == "PID-1"

        # paging by stream sequence
        first = await client.events(stream="EVENTS", limit=4)
        second = await client.events(stream="EVENTS", limit=4, since_seq=first.next_since_seq)
        assert first.next_since_seq == first.events[-1].stream_seq
        assert second.events[0].stream_seq > first.events[-1].stream_seq
        everything = await client.all_events(limit=7)
        assert len(everything) == len(events) - 5 + 1  # minus config events, plus service.started
        # the newest ones (the tail of the log), still in stream order
        newest = await client.events(stream="EVENTS", limit=3, newest=True)
        assert [e.stream_seq for e in newest.events] == [e.stream_seq for e in everything[-3:]]
        assert newest.next_since_seq is None

        dispatch = await client.events(type="dispatch.*")
        assert {e.type for e in dispatch.events} == {"dispatch.requested", "dispatch.attempt_failed",
                                                     "dispatch.completed", "dispatch.failed"}
        task_id = dispatch.events[0].task_id
        assert all(e.task_id == task_id for e in (await client.events(task_id=task_id)).events)
        correlation = events[0].correlation_id
        assert (await client.events(correlation_id=correlation)).events
        assert len((await client.events(study_uid=STUDY_A, type="image.received")).events) == 12

        listing = await client.series()
        assert listing.total == 3
        assert {s.series_uid for s in listing.series} == {SERIES_DONE, SERIES_ERROR, SERIES_DISCARD}
        assert [s.series_uid for s in (await client.series(status="error")).series] == [SERIES_ERROR]
        assert (await client.series(study_uid=STUDY_A)).total == 2
        assert (await client.series(search="doe^jane2")).total == 1
        assert (await client.series(search="100%")).total == 0
        paged = await client.series(limit=2, offset=2)
        assert paged.total == 3 and len(paged.series) == 1

        history = await client.series_history(SERIES_ERROR)
        assert history.series is not None and history.series.status == "error"
        assert [t.state for t in history.tasks] == ["error"]
        assert [e.type for e in history.events][-3:] == ["dispatch.requested", "dispatch.attempt_failed",
                                                         "dispatch.failed"]
        assert (await client.series_history("1.2.3.unknown")).series is None

        assert (await client.tasks(state="done")).tasks[0].series_uid == SERIES_DONE
        assert (await client.tasks(target="pacs")).total == 2
        assert (await client.tasks(series_uid=SERIES_DISCARD)).total == 0

        counts = await client.count()
        assert counts.counts["image.received"] == 18
        assert counts.counts["config.item.created"] == 3
        assert counts.total == len(events) + 1
        assert (await client.count(series_uid=SERIES_DONE)).counts["image.received"] == 6

        items = await client.config_items(kind="targets")
        assert [i.name for i in items.items] == ["pacs"]
        assert len((await client.config_items(kind="targets", include_deleted=True)).items) == 2
        assert {s.service for s in (await client.services()).services} == {"bookkeeper", "dispatcher"}

        stats = await client.stats()
        assert stats.database in ("sqlite", "postgresql")
        assert stats.events_total == len(events) + 1
        assert stats.projected_seq == stats.last_stored_seq
        assert stats.series_by_status == {"dispatched": 1, "error": 1, "discarded": 1}
        assert stats.ingest["stored"] >= stats.events_total
        assert stats.oldest_event_at is not None

        # The contract rejects bad requests with a clear message instead of a timeout.
        raw = await bus.nc.request(rpc_subject("bookkeeper", "events"), b'{"limit": 0}', timeout=5)
        assert json.loads(raw.data)["ok"] is False and "limit" in json.loads(raw.data)["error"]
        with pytest.raises(BookkeeperError, match="unknown method"):
            await client.call("nope", EventsRequest(), type(page))

        # The CLI reads through the same API.
        env = dict(os.environ, CADUCEUS_NATS_URL=nats_url)
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", "bookkeeper", "events",
                                                       "--series", SERIES_DONE, "--json"],
                                      cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert [json.loads(line)["event_id"] for line in out.stdout.splitlines()] == \
            [e.event_id for e in done_events]
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cli.main", "bookkeeper", "history",
                                                       SERIES_ERROR], cwd=REPO, env=env, capture_output=True,
                                      text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Status   error" in out.stdout and "dispatch.failed" in out.stdout
        assert "connection refused" in out.stdout


async def test_client_says_when_bookkeeper_is_not_running(bus: Bus) -> None:
    with pytest.raises(BookkeeperUnavailable, match="not running"):
        await BookkeeperClient(bus, timeout=2).events()


def test_cli_without_bookkeeper(nats_url: str) -> None:
    env = dict(os.environ, CADUCEUS_NATS_URL=nats_url)
    out = subprocess.run([sys.executable, "-m", "cli.main", "bookkeeper", "events"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "bookkeeper is not running" in out.stderr
