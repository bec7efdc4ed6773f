"""Postgres goes away while events arrive: nothing is acked, then the log catches up without gaps."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from conftest import POSTGRES_ADMIN_URL
from services.bookkeeper.db import create_db_engine
from services.bookkeeper.models import EVENTS
from services.bookkeeper.rebuild import rebuild_database
from services.bookkeeper.service import BookkeeperService
from services.bookkeeper.tests.scenario import (
    mixed_events,
    projection_snapshot,
    running,
    settings_for,
    wait_caught_up,
)
from shared import subjects
from shared.bus import Bus


def admin(sql: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def cut_off(name: str) -> None:
    admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")


async def test_database_outage_naks_then_catches_up(bus: Bus, nats_url: str, postgres_url: str,
                                                    data_dir: Path) -> None:
    name = make_url(postgres_url).database
    assert name
    before, during = mixed_events(images=3), mixed_events(images=4)
    await bus.publish_many(before)
    async with running(settings_for(nats_url, postgres_url, data_dir), batch=10) as service:
        await wait_caught_up(bus, service.engine)
        cut_off(name)
        try:
            await bus.publish_many(during)
            deadline = time.monotonic() + 30
            while service.ingest_stats.db_failures < 2:
                assert time.monotonic() < deadline, "the database outage was not noticed"
                await asyncio.sleep(0.1)
            info = await bus.js.consumer_info(subjects.EVENTS_STREAM, subjects.BOOKKEEPER_EVENTS.name)
            # nothing of the outage batch was acked
            assert info.num_pending + info.num_ack_pending + info.num_redelivered > 0
            assert info.ack_floor.stream_seq < await bus.last_seq(subjects.EVENTS_STREAM)
        finally:
            admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await wait_caught_up(bus, service.engine, timeout=60)
        assert service.ingest_stats.last_error

    engine = create_db_engine(postgres_url)
    try:
        with engine.connect() as conn:
            seqs = list(conn.execute(select(EVENTS.c.stream_seq).where(EVENTS.c.stream == "EVENTS")
                                     .order_by(EVENTS.c.stream_seq)).scalars())
            ids = list(conn.execute(select(EVENTS.c.event_id)).scalars())
        assert seqs == list(range(1, len(seqs) + 1))  # no gaps
        assert len(ids) == len(set(ids))
        assert {e.event_id for e in before + during} <= set(ids)
        live = projection_snapshot(engine)
        rebuild_database(postgres_url)
        assert projection_snapshot(engine) == live
    finally:
        engine.dispose()


async def test_database_created_after_the_service_started(bus: Bus, nats_url: str, data_dir: Path) -> None:
    """The migration at start waits for the database; nothing is lost meanwhile."""
    name = f"caduceus_test_late_{uuid.uuid4().hex[:8]}"
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"  # plain postgresql:// on purpose
    events = mixed_events(images=2)
    await bus.publish_many(events)
    service = BookkeeperService(settings_for(nats_url, url, data_dir))
    task = asyncio.create_task(service.run())
    try:
        await asyncio.sleep(2)
        assert not task.done() and service.rpc is None  # still waiting for its database
        admin(f'CREATE DATABASE "{name}"')
        deadline = time.monotonic() + 60
        while service.rpc is None:
            assert time.monotonic() < deadline and not task.done(), "bookkeeper did not start"
            await asyncio.sleep(0.1)
        await wait_caught_up(bus, service.engine)
        total = await asyncio.to_thread(count_events, url)
        assert total == len(events) + 1
    finally:
        service.request_stop("test done")
        await asyncio.wait_for(task, 30)
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_events(url: str) -> int:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(EVENTS)).scalar_one()
    finally:
        engine.dispose()
    return int(total)
