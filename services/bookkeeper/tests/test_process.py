"""`python -m services.bookkeeper` as a real process: migrates, stores, answers, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.bookkeeper.tests.scenario import mixed_events
from shared.bookkeeper_client import BookkeeperClient, BookkeeperUnavailable
from shared.bus import Bus

REPO = Path(__file__).resolve().parents[3]


async def test_process_stores_and_stops_on_sigterm(bus: Bus, nats_url: str, database_url: str,
                                                   data_dir: Path) -> None:
    events = mixed_events()
    await bus.publish_many(events)
    env = dict(os.environ, CADUCEUS_NATS_URL=nats_url, CADUCEUS_DATABASE_URL=database_url,
               CADUCEUS_DATA_DIR=str(data_dir), CADUCEUS_HEARTBEAT_SECONDS="1")
    proc = subprocess.Popen([sys.executable, "-m", "services.bookkeeper"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = BookkeeperClient(bus, timeout=2)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                stats = await client.stats()
                if stats.events_total >= len(events) + 1 and stats.projected_seq == stats.last_stored_seq:
                    break
            except BookkeeperUnavailable:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "bookkeeper process did not catch up"
            await asyncio.sleep(0.2)
        assert stats.ingest["batches"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert code == 0, output
    assert '"msg": "bookkeeper started"' in output
    stopped = await bus.get_last_for_subject("EVENTS", "caduceus.events.service.stopped")
    assert stopped is not None and stopped.payload["service"] == "bookkeeper"
