"""`caduceus study complete`: an administrator's request completes an open study through the router."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from services.router.tests.helpers import (
    FAST,
    TARGETS,
    apply_config,
    of_type,
    running_router,
    send_series,
    wait_for,
)
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.events import StudyCompleted

ROOT = Path(__file__).resolve().parents[3]


async def _cli(nats_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", *args, cwd=ROOT, env=dict(os.environ, CADUCEUS_NATS_URL=nats_url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


async def test_study_complete_command_forces_completion(bus: Bus, nats_url: str, data_dir: Path) -> None:
    store = LocalBlobStore(data_dir / "blobs")
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["pacs"],
                     "study_required_series": "'never sent'"}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "9.1", "9.1.1", 2, {"Modality": "MR"})
        await asyncio.sleep(2)  # the series completes; the study waits for a series that never comes
        code, out = await _cli(nats_url, "study", "complete", "9.1", "--comment", "scanner crashed")
        assert code == 0, out
        # dispatch.requested follows study.completed: wait for both before looking at either.
        events = await wait_for(bus, lambda ev: len(of_type(ev, "study.completed")) == 1
                                and len(of_type(ev, "dispatch.requested")) >= 1, timeout=20)
    [request] = of_type(events, "study.complete_requested")
    assert request.actor.startswith("user:") and request.payload["reason"] == "scanner crashed"
    [completed] = of_type(events, "study.completed")
    assert StudyCompleted.model_validate(completed.payload).trigger == "forced"
    assert completed.causation_id == request.event_id and completed.study_uid == "9.1"
    [dispatch] = of_type(events, "dispatch.requested")
    assert dispatch.payload["target"] == "pacs"


async def test_study_complete_without_nats_says_so(tmp_path: Path) -> None:
    code, out = await _cli("nats://127.0.0.1:1", "study", "complete", "1.2.3")
    assert code == 3 and "could not publish" in out
