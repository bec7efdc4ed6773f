"""The EVENTS stream's retention: applied by the bookkeeper from the configuration, never past what a reader needs."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig

from services.bookkeeper.retention import (
    ROUTER,
    OldestNeeded,
    next_max_age,
    oldest_needed,
    set_max_age,
    wanted_max_age,
)
from services.bookkeeper.tests.scenario import mixed_events, running, settings_for, wait_caught_up
from shared import subjects
from shared.bus import Bus, replay
from shared.config.model import DAY_SECONDS, CaduceusConfig, SettingsItem
from shared.config.state import fold, plan_changes, read_all

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = float(DAY_SECONDS)


def needed(age_days: float) -> OldestNeeded:
    return OldestNeeded(reader="dispatcher-normal", stream_seq=7, occurred_at=NOW - timedelta(days=age_days))


@pytest.mark.parametrize(("current", "wanted", "oldest", "expected"), [
    (90 * DAY, 90 * DAY, None, 90 * DAY),                 # nothing to do
    (90 * DAY, 365 * DAY, needed(80), 365 * DAY),         # lengthening: at once
    (3650 * DAY, 90 * DAY, None, 90 * DAY),               # shortening, nobody behind: at once
    (3650 * DAY, 90 * DAY, needed(30), 90 * DAY),         # the oldest needed event stays well inside
    (3650 * DAY, 90 * DAY, needed(200.5), 202 * DAY),     # only down to a day past it, in whole days
    (202 * DAY, 90 * DAY, needed(200.7), 202 * DAY),      # ... and no further while it is still needed
    (202 * DAY, 90 * DAY, needed(201.2), 202 * DAY),      # never lengthened for it either
])
def test_next_max_age(current: float, wanted: float, oldest: OldestNeeded | None, expected: float) -> None:
    assert next_max_age(current, wanted, oldest, NOW) == expected


def test_wanted_max_age_is_never_shorter_than_the_waits_need() -> None:
    # A configuration folded from events is not validated as a whole: the bookkeeper raises it itself.
    config = CaduceusConfig(settings=SettingsItem(events_retention_days=8, study_force_complete_seconds=20 * DAY))
    assert wanted_max_age(config) == 20 * DAY + 900 + 7 * DAY
    assert wanted_max_age(CaduceusConfig()) == 90 * DAY


async def test_oldest_needed_names_the_reader_that_holds_the_oldest_event(bus: Bus) -> None:
    assert await oldest_needed(bus.js) is None
    await bus.publish_many(mixed_events(images=3))
    # A work queue that has not acknowledged anything holds everything from sequence 1 on.
    await bus.js.add_consumer(subjects.EVENTS_STREAM, ConsumerConfig(
        durable_name="slow-worker", ack_policy=AckPolicy.EXPLICIT, filter_subject=f"{subjects.EVENTS_PREFIX}.>"))
    found = await oldest_needed(bus.js)
    assert found is not None and (found.reader, found.stream_seq) == ("slow-worker", 1)
    assert abs((found.occurred_at - datetime.now(UTC)).total_seconds()) < 60
    await bus.js.delete_consumer(subjects.EVENTS_STREAM, "slow-worker")

    # The router's checkpoint: the first event of its oldest open batch.
    kv = await bus.js.create_key_value(KeyValueConfig(bucket=subjects.ROUTER_STATE_BUCKET))
    await kv.put(subjects.ROUTER_CHECKPOINT_KEY, b"4")
    found = await oldest_needed(bus.js)
    assert found is not None and (found.reader, found.stream_seq) == (ROUTER, 4)
    # A checkpoint past the stream's end (nothing open) holds nothing back.
    await kv.put(subjects.ROUTER_CHECKPOINT_KEY, str(await bus.last_seq(subjects.EVENTS_STREAM) + 1).encode())
    assert await oldest_needed(bus.js) is None


async def max_age_days(bus: Bus) -> float:
    return float((await bus.js.stream_info(subjects.EVENTS_STREAM)).config.max_age or 0) / DAY


async def wait_max_age(bus: Bus, days: float, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while await max_age_days(bus) != pytest.approx(days):
        assert time.monotonic() < deadline, f"EVENTS max age {await max_age_days(bus)} days, want {days}"
        await asyncio.sleep(0.1)


async def test_bookkeeper_applies_the_configured_retention(bus: Bus, nats_url: str, data_dir: Path) -> None:
    # A stream from before the setting existed kept events ten years.
    await set_max_age(bus.js, 3650 * DAY)
    await bus.publish_many([event for event in mixed_events(images=3) if not event.type.startswith("config.")])
    database_url = f"sqlite:///{data_dir / 'bookkeeper.sqlite'}"
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        await wait_caught_up(bus, service.engine)
        await wait_max_age(bus, 90)   # nobody needs old events: shortened at once
        assert service.health_details()["events_retention_days"] == 90

        # Another process declaring the streams (every service does at start) keeps it.
        other = await Bus.connect(nats_url, actor="test")
        await other.close()
        assert await max_age_days(bus) == pytest.approx(90)

        # A configuration change is applied without waiting for the next round.
        config = CaduceusConfig(settings=SettingsItem(events_retention_days=400))
        await bus.publish_many(plan_changes(fold(await read_all(bus)), config, actor="user:test"))
        await wait_max_age(bus, 400, timeout=10)
        assert service.health_details()["events_retention_days"] == 400


async def test_a_reader_behind_by_half_the_retention_raises_one_warning_a_day(
        bus: Bus, nats_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.bookkeeper import service as bookkeeper_service

    behind = OldestNeeded(reader="dispatcher-normal", stream_seq=7,
                          occurred_at=datetime.now(UTC) - timedelta(days=50))

    async def fifty_days_behind(_js: object) -> OldestNeeded:
        return behind

    monkeypatch.setattr(bookkeeper_service, "oldest_needed", fifty_days_behind)
    database_url = f"sqlite:///{data_dir / 'bookkeeper.sqlite'}"
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        deadline = time.monotonic() + 20
        while not [e async for e in replay(bus, subjects.event_subject("alert.raised"))]:
            assert time.monotonic() < deadline, "no alert"
            await asyncio.sleep(0.2)
        details = service.health_details()
        assert details["events_oldest_needed"].startswith("dispatcher-normal@7 50.0")
        service.retention_changed.set()   # another round at once: no second alert within the day
        await asyncio.sleep(1)
    alerts = [e async for e in replay(bus, subjects.event_subject("alert.raised"))]
    assert len(alerts) == 1
    assert alerts[0].payload["severity"] == "warning" and alerts[0].payload["source"] == "bookkeeper"
    assert "dispatcher-normal has not consumed EVENTS sequence 7 for 50.0 days" in alerts[0].payload["message"]
    # The retention itself is not shortened past what that reader still needs (it was 90 already).
    assert await max_age_days(bus) == pytest.approx(90)
