"""Dispatcher end to end against real peers: DCMTK storescp and Orthanc."""

from __future__ import annotations

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
