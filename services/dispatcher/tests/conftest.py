"""Helpers for dispatcher tests: stage DICOM files + manifest in a blob store, apply a config,
request a dispatch, run dispatchers in-process or as subprocesses, wait for events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.dispatcher.service import DispatcherService
from shared.blobstore import LocalBlobStore
from shared.bus import Bus, replay
from shared.config.model import CaduceusConfig
from shared.config.state import fold, plan_changes, read_all
from shared.events import DispatchRequested, Event, make_event
from shared.manifest import Manifest
from shared.settings import Settings
from tests.harness import dicom_target

REPO = Path(__file__).resolve().parents[3]
FAST_RETRIES = {"dispatch_retries": 3, "dispatch_retry_wait_seconds": 0.2,
                "dispatch_retry_max_wait_seconds": 0.5}


@pytest.fixture
def blob_store(data_dir: Path) -> LocalBlobStore:
    # Where a dispatcher with CADUCEUS_DATA_DIR=data_dir and the local blob store looks.
    return LocalBlobStore(data_dir / "blobs", fsync=False)




async def apply_config(bus: Bus, document: dict[str, Any]) -> None:
    current = fold(await read_all(bus))
    await bus.publish_many(plan_changes(current, CaduceusConfig.parse(document), actor="test"))


async def apply_pacs_config(bus: Bus, port: int, aet: str, **settings: Any) -> None:
    """One DICOM target `pacs` on 127.0.0.1, with FAST_RETRIES and `settings` over them."""
    await apply_config(bus, {"settings": {**FAST_RETRIES, **settings}, "targets": {"pacs": dicom_target(port, aet)}})


async def request_dispatch(bus: Bus, manifest: Manifest, manifest_key: str, target: str,
                           priority: str = "normal", task_id: str | None = None, **extra: Any) -> Event:
    task_id = task_id or uuid.uuid4().hex
    event = make_event("dispatch.requested", "router", DispatchRequested(
        task_id=task_id, rule="test-rule", target=target, manifest_key=manifest_key,
        instance_count=len(manifest.instances), priority=priority, **extra),  # type: ignore[arg-type]
        study_uid=manifest.study_uid, series_uid=manifest.series_uids[0], task_id=task_id,
        correlation_id=manifest.batch_id)
    await bus.publish(event)
    return event


async def events_of(bus: Bus, type_: str, task_id: str | None = None) -> list[Event]:
    subject = f"caduceus.events.{type_}" + (".>" if type_ == "dispatch.requested" else "")
    return [e async for e in replay(bus, subject)
            if task_id is None or e.payload.get("task_id") == task_id or e.task_id == task_id]


async def wait_events(bus: Bus, type_: str, task_id: str | None = None, count: int = 1,
                      timeout: float = 30.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    while True:
        found = await events_of(bus, type_, task_id)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(found)} of {count} {type_} events after {timeout}s")
        await asyncio.sleep(0.1)


def dispatcher_settings(nats_url: str, data_dir: Path, **extra: Any) -> Settings:
    return Settings(nats_url=nats_url, data_dir=data_dir, heartbeat_seconds=1,
                              dispatch_ack_wait_seconds=extra.pop("dispatch_ack_wait_seconds", 5), **extra)


@contextlib.asynccontextmanager
async def running_dispatcher(nats_url: str, data_dir: Path, **extra: Any) -> AsyncIterator[DispatcherService]:
    service = DispatcherService(dispatcher_settings(nats_url, data_dir, **extra))
    task = asyncio.create_task(service.run())
    try:
        deadline = time.monotonic() + 15
        while not hasattr(service, "dispatcher"):
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("dispatcher did not start")
            await asyncio.sleep(0.05)
        yield service
    finally:
        service.request_stop("test done")
        await asyncio.wait_for(task, 30)


def start_dispatcher_process(nats_url: str, data_dir: Path, log_file: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "CADUCEUS_NATS_URL": nats_url, "CADUCEUS_DATA_DIR": str(data_dir),
                   "CADUCEUS_HEARTBEAT_SECONDS": "1", "PYTHONPATH": str(REPO), **env}
    with open(log_file, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "services.dispatcher"], cwd=REPO, env=environment,
                                stdout=log, stderr=subprocess.STDOUT)


def run_cli(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CADUCEUS_NATS_URL": nats_url, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=60)
