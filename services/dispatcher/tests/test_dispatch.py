"""Dispatcher end to end against real peers: DCMTK storescp and Orthanc."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from pydicom import dcmread

from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from tests.peers import Orthanc, StoreScp, make_series

from .conftest import (
    FAST_RETRIES,
    apply_config,
    dicom_target,
    events_of,
    request_dispatch,
    run_cli,
    running_dispatcher,
    stage_files,
    wait_events,
)


async def test_delivers_series_to_storescp_and_orthanc(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                       blob_store: LocalBlobStore, storescp: StoreScp,
                                                       orthanc: Orthanc) -> None:
    files = make_series(tmp_path / "series", 8)
    manifest, key = await stage_files(blob_store, files)
    await apply_config(bus, {"settings": FAST_RETRIES, "targets": {
        "dcmtk": dicom_target(storescp.port, storescp.aet),
        "orthanc": dicom_target(orthanc.dicom_port, orthanc.aet, parallel_associations=2)}})
    async with running_dispatcher(nats_url, data_dir):
        to_dcmtk = await request_dispatch(bus, manifest, key, "dcmtk")
        to_orthanc = await request_dispatch(bus, manifest, key, "orthanc", priority="urgent")
        done = await wait_events(bus, "dispatch.completed", count=2)
    by_task = {e.payload["task_id"]: e for e in done}
    for request in (to_dcmtk, to_orthanc):
        completed = by_task[request.task_id or ""]
        assert completed.payload["sent"] == 8 and completed.payload["skipped_already_sent"] == 0
        assert completed.series_uid == manifest.series_uids[0]
        assert completed.causation_id == request.event_id
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    # storescp wrote the data sets bit-preserved: same UIDs, same pixel bytes.
    received = storescp.datasets()
    assert set(received) == set(originals)
    for uid, ds in received.items():
        assert ds.PixelData == originals[uid].PixelData
        assert ds.file_meta.TransferSyntaxUID == originals[uid].file_meta.TransferSyntaxUID
    assert orthanc.sop_uids() == set(originals)
    for uid, orthanc_id in orthanc.instances_by_sop().items():
        assert dcmread(BytesIO(orthanc.file(orthanc_id))).PixelData == originals[uid].PixelData
    assert await events_of(bus, "dispatch.attempt_failed") == []


async def test_target_down_fails_after_attempts_then_cli_retry_delivers(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(start=False)  # a port nobody listens on yet
    files = make_series(tmp_path / "series", 5)
    manifest, key = await stage_files(blob_store, files)
    await apply_config(bus, {"settings": FAST_RETRIES, "targets": {"pacs": dicom_target(peer.port, peer.aet)}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        task_id = request.task_id or ""
        failed = await wait_events(bus, "dispatch.failed", task_id)
        attempts = await events_of(bus, "dispatch.attempt_failed", task_id)
        assert [e.payload["attempt"] for e in attempts] == [1, 2, 3]
        assert [e.payload["retry_in_seconds"] for e in attempts] == [0.2, 0.4, 0.0]
        assert all("could not connect" in e.payload["error"] for e in attempts)
        assert failed[0].payload["attempts"] == 3
        assert sorted(failed[0].payload["failed_sop_uids"]) == sorted(i.sop_uid for i in manifest.instances)
        alerts = await events_of(bus, "alert.raised", task_id)
        assert [a.payload["severity"] for a in alerts] == ["error"]
        assert alerts[0].series_uid == manifest.series_uids[0]
        # The files stay in the blob store: the error state is in the events.
        assert all([await blob_store.exists(i.blob_key) for i in manifest.instances])

        peer.start()
        result = await asyncio.to_thread(run_cli, nats_url, "retry", "--series", manifest.series_uids[0],
                                         "--comment", "PACS is back")
        assert result.returncode == 0, result.stderr
        assert task_id in result.stdout
        completed = await wait_events(bus, "dispatch.completed", task_id)
    retry = (await events_of(bus, "dispatch.retry_requested", task_id))[0]
    assert retry.actor == f"user:{getpass.getuser()}" and retry.payload["reason"] == "PACS is back"
    assert completed[0].payload["sent"] == 5 and completed[0].payload["attempt"] == 1
    assert completed[0].causation_id == retry.event_id
    assert peer.sop_uids() == {i.sop_uid for i in manifest.instances}
    # A completed task is not retried again.
    again = await asyncio.to_thread(run_cli, nats_url, "retry", task_id)
    assert again.returncode == 1 and "already completed" in again.stderr
