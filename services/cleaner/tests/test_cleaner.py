"""The first cleaner: counts blobs past retention (by age) and deletes nothing."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from services.cleaner.scan import scan_blobs
from services.cleaner.service import CleanerService
from shared import subjects
from shared.bus import Bus
from shared.config.model import CaduceusConfig, SettingsItem
from shared.config.state import plan_changes
from shared.settings import Settings

DAY = 86400


def _blob(root: Path, name: str, size: int, age_days: float) -> Path:
    path = root / "blobs" / "instances" / "study" / "series" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_days * DAY
    os.utime(path, (stamp, stamp))
    return path


def test_scan_counts_blobs_older_than_retention(tmp_path: Path) -> None:
    _blob(tmp_path, "new.dcm", 10, 0.5)
    _blob(tmp_path, "old1.dcm", 100, 4)
    _blob(tmp_path, "old2.dcm", 200, 10)
    result = scan_blobs(tmp_path / "blobs" / "instances", retention_days=3, now=time.time())
    assert (result.total, result.older, result.older_bytes) == (3, 2, 300)
    assert scan_blobs(tmp_path / "nothing-here", 3, time.time()).total == 0


async def test_cleaner_reports_in_heartbeat_and_keeps_every_blob(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    # retention 1 day, applied through the CONFIG stream like `caduceus config apply`
    for event in plan_changes({}, CaduceusConfig(settings=SettingsItem(retention_days=1)), "user:test"):
        await bus.publish(event)
    blobs = [_blob(tmp_path, "a.dcm", 10, 0), _blob(tmp_path, "b.dcm", 20, 2), _blob(tmp_path, "c.dcm", 30, 5)]
    cleaner = CleanerService(Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=0.3))
    running = asyncio.create_task(cleaner.run())
    subject = subjects.status_subject("cleaner", cleaner.instance)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        beat = await bus.get_last_for_subject(subjects.STATUS_STREAM, subject)
        if beat is not None and "blobs_total" in beat.payload["details"]:
            break
        assert asyncio.get_running_loop().time() < deadline, beat
        await asyncio.sleep(0.1)
    details = beat.payload["details"]
    assert details["retention_days"] == 1
    assert (details["blobs_total"], details["blobs_older_than_retention"], details["bytes_older_than_retention"]) \
        == (3, 2, 50)
    assert details["deletes_blobs"] is False
    cleaner.request_stop("test over")
    await asyncio.wait_for(running, 15)
    assert all(path.exists() for path in blobs)
