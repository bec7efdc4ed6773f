"""The test peers themselves (tests/peers.py): DCMTK storescu into storescp and Orthanc."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.peers import Orthanc, StoreScp, make_series


def _storescu(files: list[Path], port: int, aet: str) -> None:
    subprocess.run(["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, timeout=60)


def test_storescp_and_orthanc_store_what_storescu_sends(tmp_path: Path, storescp: StoreScp,
                                                         orthanc: Orthanc) -> None:
    files = make_series(tmp_path / "series", 3)
    sent = {str(dcmread(f).SOPInstanceUID) for f in files}
    _storescu(files, storescp.port, storescp.aet)
    _storescu(files, orthanc.dicom_port, orthanc.aet)
    assert storescp.sop_uids() == sent
    assert orthanc.wait_for(3) == sent
    one = next(iter(sent))
    original = next(dcmread(f) for f in files if str(dcmread(f).SOPInstanceUID) == one)
    from io import BytesIO
    assert dcmread(BytesIO(orthanc.file_by_sop(one))).PixelData == original.PixelData
