"""How fast the bookkeeper stores a backlog (batches of 200, one transaction each), on both backends."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import func, select

from services.bookkeeper.models import EVENTS, SERIES
from services.bookkeeper.tests.scenario import image, running, settings_for, wait_caught_up
from shared.bus import Bus

N_SERIES, PER_SERIES = 20, 150  # 3000 image.received events


async def test_backlog_throughput(bus: Bus, nats_url: str, database_url: str, data_dir: Path) -> None:
    events = [image(f"1.2.3.{s % 4}", f"1.2.3.{s % 4}.{s}", n) for s in range(N_SERIES) for n in range(PER_SERIES)]
    for i in range(0, len(events), 500):
        await bus.publish_many(events[i:i + 500])
    async with running(settings_for(nats_url, database_url, data_dir)) as service:
        started = time.monotonic()
        await wait_caught_up(bus, service.engine, timeout=120)
        seconds = time.monotonic() - started
        with service.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(EVENTS)).scalar_one()
            counts = set(conn.execute(select(SERIES.c.instance_count)).scalars())
    rate = len(events) / seconds
    print(f"\n{database_url.split(':')[0]}: {len(events)} events stored and projected in {seconds:.2f}s "
          f"= {rate:.0f} events/s")
    assert stored == len(events) + 1
    assert counts == {PER_SERIES}
