"""Audit log contract, run on SQLite and Postgres (`database_url` is parametrized in conftest.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import func, select

from services.bookkeeper.db import create_db_engine, open_database
from services.bookkeeper.ingest import record_from_msg
from services.bookkeeper.models import DUPLICATES, EVENTS
from services.bookkeeper.rebuild import rebuild_database
from services.bookkeeper.store import write_batch
from services.bookkeeper.tests.scenario import (
    SERIES_DISCARD,
    SERIES_DONE,
    SERIES_ERROR,
    STUDY_A,
    mixed_events,
    projection_snapshot,
    running,
    settings_for,
    wait_caught_up,
)
from shared import subjects
from shared.bus import Bus, replay
from shared.events import Event


def event_ids_and_counts(url: str) -> tuple[list[str], int, int]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            ids = list(conn.execute(select(EVENTS.c.event_id)).scalars())
            total = conn.execute(select(func.count()).select_from(EVENTS)).scalar_one()
            dups = conn.execute(select(func.count()).select_from(DUPLICATES)).scalar_one()
    finally:
        engine.dispose()
    return ids, total, dups


async def test_every_event_stored_once_even_when_published_twice(bus: Bus, nats_url: str, database_url: str,
                                                                 data_dir: Path) -> None:
    events = mixed_events()
    await bus.publish_many(events)
    # Same event ids again: inside the dedup window JetStream drops them ...
    await bus.publish_many(events[:5])
    # ... beyond it (simulated with a different Nats-Msg-Id) they reach the stream a second time.
    for event in events[5:8]:
        await bus.js.publish(bus.subject_for(event), event.to_json(), headers={"Nats-Msg-Id": "x" + event.event_id})
    # Not an event at all: kept as 'unreadable', and it does not stall the projections.
    await bus.js.publish("caduceus.events.garbage", b"\x00 not json", headers={"Nats-Msg-Id": "garbage-1"})
    settings = settings_for(nats_url, database_url, data_dir)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
        ids, total, dups = event_ids_and_counts(database_url)
    assert len(ids) == len(set(ids)) == total
    assert set(ids) >= {e.event_id for e in events} | {"garbage-1"}
    # our events + the garbage + service.started (the stop event arrives after we stopped reading)
    assert total == len(events) + 2
    assert dups == 3


async def test_projections(bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    await bus.publish_many(mixed_events(images=4))
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        await wait_caught_up(bus, service.engine)
        snap = projection_snapshot(service.engine)
    series = {r["series_uid"]: r for r in snap["series"]}
    assert series[SERIES_DONE]["status"] == "dispatched"
    assert series[SERIES_DONE]["instance_count"] == 4
    assert series[SERIES_DONE]["patient_id"] == "PID-1"
    assert series[SERIES_DONE]["modality"] == "CT"
    assert series[SERIES_DONE]["sender"] == "MODALITY1"
    assert series[SERIES_DONE]["study_uid"] == STUDY_A
    assert (series[SERIES_DONE]["tasks_total"], series[SERIES_DONE]["tasks_done"]) == (1, 1)
    assert series[SERIES_ERROR]["status"] == "error"
    assert series[SERIES_ERROR]["tasks_failed"] == 1
    assert series[SERIES_DISCARD]["status"] == "discarded"
    assert series[SERIES_DONE]["first_received"] <= series[SERIES_DONE]["last_received"]
    tasks = {t["series_uid"]: t for t in snap["tasks"]}
    assert tasks[SERIES_DONE]["state"] == "done" and tasks[SERIES_DONE]["attempts"] == 2
    assert tasks[SERIES_DONE]["priority"] == "urgent" and tasks[SERIES_DONE]["target"] == "pacs"
    assert tasks[SERIES_ERROR]["state"] == "error" and tasks[SERIES_ERROR]["last_error"] == "connection refused"
    assert SERIES_DISCARD not in tasks
    config = {(c["kind"], c["name"]): c for c in snap["config_items"]}
    assert config[("targets", "pacs")]["version"] == 2 and config[("targets", "pacs")]["item"]["port"] == 11113
    assert config[("targets", "old")]["deleted"] and config[("targets", "old")]["item"] is None
    assert config[("settings", "settings")]["updated_by"] == "admin"
    services = {s["service"]: s for s in snap["services"]}
    assert services["bookkeeper"]["state"] == "running" and services["bookkeeper"]["starts"] == 1
    assert services["dispatcher"]["state"] == "crashed" and services["dispatcher"]["crashes"] == 1


async def test_rebuild_equals_live(bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    await bus.publish_many(mixed_events())
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        await wait_caught_up(bus, service.engine)
        live = projection_snapshot(service.engine)
    counts = rebuild_database(database_url)
    assert counts[subjects.EVENTS_STREAM] > 0 and counts[subjects.CONFIG_STREAM] == 5
    engine = create_db_engine(database_url)
    try:
        rebuilt = projection_snapshot(engine)
    finally:
        engine.dispose()
    assert rebuilt == live
    assert live["series"] and live["tasks"] and live["config_items"] and live["services"]


async def test_redelivery_after_commit_without_ack(bus: Bus, nats_url: str, database_url: str,
                                                   data_dir: Path) -> None:
    """A bookkeeper that committed a batch and died before acking: the messages come back, stored once."""
    events = mixed_events()
    await bus.publish_many(events)
    engine = open_database(database_url)
    await bus.declare_durable(subjects.BOOKKEEPER_EVENTS)
    sub = await bus.js.pull_subscribe_bind(durable=subjects.BOOKKEEPER_EVENTS.name,
                                           stream=subjects.BOOKKEEPER_EVENTS.stream)
    msgs = await sub.fetch(10, timeout=5)
    await asyncio.to_thread(write_batch, engine, [record_from_msg(m) for m in msgs])
    for msg in msgs:
        await msg.nak()  # stands in for the lost ack: JetStream delivers them again
    await sub.unsubscribe()
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        await wait_caught_up(bus, service.engine)
        live = projection_snapshot(service.engine)
    ids, total, dups = event_ids_and_counts(database_url)
    assert len(ids) == len(set(ids)) == total == len(events) + 1
    assert dups == 0
    rebuild_database(database_url)
    assert projection_snapshot(engine) == live
    engine.dispose()


async def test_two_bookkeepers_share_the_durable(bus: Bus, nats_url: str, database_url: str,
                                                 data_dir: Path) -> None:
    """Two processes on one durable and one database: exactly once, and projections equal a rebuild."""
    first = settings_for(nats_url, database_url, data_dir, instance="bk-1")
    second = settings_for(nats_url, database_url, data_dir, instance="bk-2")
    async with running(first, batch=7) as one, running(second, batch=5) as two:
        published = []
        for round_ in range(4):
            batch = mixed_events(images=3 + round_)
            published += batch
            await bus.publish_many(batch)
        await wait_caught_up(bus, one.engine, timeout=60)
        assert one.ingest_stats.batches > 0 and two.ingest_stats.batches > 0
    ids, total, _ = event_ids_and_counts(database_url)
    assert len(ids) == len(set(ids)) == total
    assert set(ids) >= {e.event_id for e in published}
    engine = create_db_engine(database_url)
    try:
        # The tables as the two live processes left them (one may have stored the other's stop event).
        live = projection_snapshot(engine)
        rebuild_database(database_url)
        assert projection_snapshot(engine) == live
    finally:
        engine.dispose()


async def test_restart_resumes_from_the_durable(bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    settings = settings_for(nats_url, database_url, data_dir)
    first, second = mixed_events(images=2), mixed_events(images=3)
    await bus.publish_many(first)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
    await bus.publish_many(second)  # while the bookkeeper is down (its service.stopped is in between)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
        stored_now = service.ingest_stats.stored
    ids, total, dups = event_ids_and_counts(database_url)
    assert len(ids) == len(set(ids)) == total
    assert {e.event_id for e in first + second} <= set(ids)
    # started, stopped, started: the second run read only what was new
    assert total == len(first) + len(second) + 3
    assert stored_now == len(second) - 5 + 2 + 5  # domain events + stopped/started + config events
    assert dups == 0


async def test_events_published_while_it_stops_do_not_stall_the_next_bookkeeper(
        bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    """The other services' `service.stopped` reach the stream just as the bookkeeper stops. A
    bookkeeper that cancelled its fetch left them with a pull request nobody read: the next one got
    them only after the ack wait (60 s), and its projections, which advance in stream order,
    waited as long."""
    settings = settings_for(nats_url, database_url, data_dir)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
        await asyncio.sleep(0.3)  # its fetch is waiting at the server now
        service.request_stop("test: stop while events arrive")
        for _ in range(10):  # during the stop, as when `caduceus up` stops all services
            await bus.publish_many(mixed_events(images=1))
            await asyncio.sleep(0.05)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine, timeout=20)  # well inside the 60 s ack wait


async def test_a_stream_created_anew_is_stored_from_its_start_and_the_old_one_archived(
        bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    # The NATS store was wiped (or NATS moved) while the database was kept: EVENTS starts again at
    # sequence 1. Its events used to meet the old rows' sequences and were dropped as "stored".
    settings = settings_for(nats_url, database_url, data_dir)
    old, new = mixed_events(images=3), mixed_events(images=2)
    await bus.publish_many(old)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
    await bus.js.delete_stream(subjects.EVENTS_STREAM)
    await bus.declare_streams()
    await bus.publish_many(new)
    async with running(settings) as service:
        await wait_caught_up(bus, service.engine)
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as conn:
            streams: dict[str, str] = dict(conn.execute(select(EVENTS.c.event_id, EVENTS.c.stream)).tuples().all())
    finally:
        engine.dispose()
    domain = [e for e in new if not e.type.startswith("config.")]  # (CONFIG was kept)
    assert {streams[e.event_id] for e in domain} == {subjects.EVENTS_STREAM}
    archived = {streams[e.event_id] for e in old if not e.type.startswith("config.")}
    assert len(archived) == 1 and archived.pop().startswith(f"{subjects.EVENTS_STREAM}~")
    alerts = [e for e in await read_stream(bus) if e.type == "alert.raised"]
    assert any("EVENTS stream was created anew" in a.payload["message"] for a in alerts)


async def read_stream(bus: Bus) -> list[Event]:
    return [event async for event in replay(bus, f"{subjects.EVENTS_PREFIX}.>")]
