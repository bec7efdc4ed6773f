"""A large instance through the whole DICOM path: DCMTK storescu -> caduceus (`caduceus up`) ->
DCMTK storescp, with the receiver's memory measured while it arrives (services/receiver/spool.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from services.receiver import part10
from tests.e2e.dicomfiles import blob_path, dataset_bytes, write_large_instance
from tests.harness import Caduceus, PeakRss, route_all_config, sop_uid_of, storescu
from tests.peers import StoreScp

pytestmark = pytest.mark.slow

MB = 1024 * 1024


def test_a_large_instance_is_stored_routed_and_delivered_byte_identical(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus], storescp: StoreScp) -> None:
    big = write_large_instance(tmp_path / "tomo.dcm", 256)
    cad = caduceus_factory(config=route_all_config(storescp.port, storescp.aet))
    rss = PeakRss(cad.pid("receiver"))
    with rss.sampling():
        sent = storescu(cad.dicom_port, [big], extra=["-R"])
    print(rss.report())
    assert sent.accepted == {sop_uid_of(big)}, sent.output

    # Stored as the receiver always wrote it: its File Meta, the data set as it came.
    header = dcmread(big, stop_before_pixels=True)
    blob = blob_path(cad.blob_root, big)
    expected = part10.PREAMBLE + part10.file_meta(str(header.SOPClassUID), str(header.SOPInstanceUID),
                                                  str(header.file_meta.TransferSyntaxUID))
    with open(blob, "rb") as stored:
        assert stored.read(len(expected)) == expected
    assert dataset_bytes(blob) == dataset_bytes(big)

    completed = cad.wait_events("dispatch.completed", lambda found: len(found) >= 1, 120, "dispatch.completed")
    assert len(completed) == 1
    (delivered,) = storescp.files()
    assert dataset_bytes(delivered) == dataset_bytes(big)
    (received,) = cad.events("image.received")
    assert received.payload["size"] == blob.stat().st_size and received.payload["tags"]["Modality"] == "MG"
    assert list((cad.blob_root / ".tmp").iterdir()) == []
    assert rss.peak - rss.baseline < 96 * MB, rss.report()
