"""The whole DICOM path with real peers: DCMTK storescu -> caduceus (`caduceus up`) -> Orthanc and
DCMTK storescp, with rules deciding who gets what.

Ledger: every SOP Instance UID storescu saw accepted ends at every destination its rules name,
with the same SOP Instance UID and the same pixel data, exactly once; a series no rule matched is
discarded (series.discarded) and its files are still in the blob store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.e2e.dicomfiles import (
    blob_path,
    dataset_bytes,
    pixel_bytes,
    real_world_files,
    recast_series,
    same_dataset,
)
from tests.harness import Caduceus, dicom_target, settings_doc, storescu, wait_for
from tests.peers import Orthanc, StoreScp, make_series

pytestmark = pytest.mark.slow

PROPOSE = {"1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw"}


def _series_of(files: list[Path]) -> dict[str, list[Path]]:
    by_series: dict[str, list[Path]] = {}
    for path in files:
        by_series.setdefault(str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID), []).append(path)
    return by_series


def _sops(files: list[Path]) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}


def test_rules_route_study_to_orthanc_and_storescp(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                                   orthanc: Orthanc, storescp: StoreScp) -> None:
    ct_files = make_series(tmp_path / "ct", 4, size=64, series_per_study=3)
    by_series = _series_of(ct_files)
    assert len(by_series) == 3
    ct_keep = [p for p in ct_files if dcmread(p, stop_before_pixels=True).SeriesDescription != "AXIAL 2"]
    ct_unmatched = [p for p in ct_files if p not in ct_keep]
    mr_files = recast_series(ct_files[:4], tmp_path / "mr", modality="MR", description="T2 AXIAL")

    config = {
        "settings": settings_doc(),
        "targets": {"orthanc": dicom_target(orthanc.dicom_port, orthanc.aet),
                    "storescp": dicom_target(storescp.port, storescp.aet)},
        "rules": {
            "ct-to-orthanc": {"filter": "@Modality@ == 'CT' and @SeriesDescription@ != 'AXIAL 2'",
                              "targets": ["orthanc"]},
            "all-but-axial-2": {"filter": "@SeriesDescription@ != 'AXIAL 2'", "targets": ["storescp"]},
        },
    }
    cad = caduceus_factory(config=config)
    sent = storescu(cad.dicom_port, [*ct_files, *mr_files])
    assert sent.returncode == 0, sent.output
    assert sent.accepted == _sops([*ct_files, *mr_files]), sent.output

    expected_orthanc = _sops(ct_keep)
    expected_storescp = _sops([*ct_keep, *mr_files])
    wait_for(lambda: orthanc.sop_uids() >= expected_orthanc, 90, "Orthanc has the CT series", cad.logs)
    wait_for(lambda: _sops(storescp.files()) >= expected_storescp, 90, "storescp has CT + MR", cad.logs)
    completed = cad.wait_events("dispatch.completed", lambda found: len(found) >= 5, 60, "5 dispatch.completed")

    # Exactly the expected instances, nothing of the unmatched series, nothing twice.
    assert orthanc.sop_uids() == expected_orthanc
    assert len(orthanc.instances()) == len(expected_orthanc)
    stored = Counter(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.files())
    assert set(stored) == expected_storescp and max(stored.values()) == 1, stored
    assert len(completed) == 5  # 2 CT series x 2 targets + MR x storescp

    # Same pixel data, same identity.
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in [*ct_files, *mr_files]}
    for sop, ds in storescp.datasets().items():
        assert bytes(ds.PixelData) == pixel_bytes(originals[sop]), sop
        assert str(ds.SeriesInstanceUID) == str(dcmread(originals[sop], stop_before_pixels=True).SeriesInstanceUID)
    for sop in expected_orthanc:
        assert pixel_bytes(orthanc.file_by_sop(sop)) == pixel_bytes(originals[sop]), sop

    # The series no rule matched: discarded, recorded, and its files are still in the blob store.
    unmatched_uid = str(dcmread(ct_unmatched[0], stop_before_pixels=True).SeriesInstanceUID)
    discarded = cad.wait_events("series.discarded", lambda found: any(e.series_uid == unmatched_uid
                                                                      for e in found), 30)
    assert [e.series_uid for e in discarded] == [unmatched_uid]
    decided = [e for e in cad.events("route.decided") if e.series_uid == unmatched_uid]
    assert len(decided) == 1 and decided[0].payload["discarded"] and decided[0].payload["matched_rules"] == []
    for path in ct_unmatched:
        assert same_dataset(blob_path(cad.blob_root, path), path), path


def test_real_world_encodings_pass_through_unchanged(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                                     storescp: StoreScp) -> None:
    files = real_world_files(tmp_path / "real")
    config = {"settings": settings_doc(),
              "targets": {"storescp": dicom_target(storescp.port, storescp.aet)},
              "rules": {"everything": {"filter": "True", "targets": ["storescp"]}}}
    cad = caduceus_factory(config=config)
    # storescu proposes compressed transfer syntaxes only when told (-xr RLE, -xv/-xw JPEG 2000),
    # and unusual SOP classes (Segmentation) only with -R: one association per group.
    label_of = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): label for label, p in files.items()}
    groups: dict[str, list[Path]] = {}
    for path in files.values():
        ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(PROPOSE.get(ts, "-x="), []).append(path)
    for option, paths in groups.items():
        sent = storescu(cad.dicom_port, paths, extra=["-R", option])
        refused = sorted(label_of[sop] for sop in sent.failed)
        assert sent.returncode == 0 and not sent.failed, f"not accepted: {refused}\n{sent.output}"

    expected = set(label_of)
    wait_for(lambda: _sops(storescp.files()) >= expected, 90, "storescp has every real-world file", cad.logs)
    assert not cad.events("image.quarantined")

    # image.received carries the tags as UTF-8 text, decoded with the file's character set.
    received = {e.sop_uid: e for e in cad.events("image.received")}
    assert set(received) == expected
    for label, path in files.items():
        ds = dcmread(path, stop_before_pixels=True)
        tags = received[str(ds.SOPInstanceUID)].payload["tags"]
        if "PatientName" in ds:
            assert tags["PatientName"] == str(ds.PatientName), label
        assert tags["SeriesInstanceUID"] == str(ds.SeriesInstanceUID), label
    assert received[str(dcmread(files["ISO 2022 IR 87 (Japanese)"]).SOPInstanceUID)] \
        .payload["tags"]["PatientName"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert received[str(dcmread(files["GB18030"]).SOPInstanceUID)].payload["tags"]["PatientName"] \
        == "Wang^XiaoDong=王^小东"

    # Delivered unchanged: the data set storescp wrote (+B: bit-preserving) is byte for byte what
    # caduceus stored, and that is what storescu sent; the transfer syntax is the original one.
    delivered = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in storescp.files()}
    assert len(storescp.files()) == len(expected)
    for label, path in files.items():
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        out = delivered[sop]
        assert dataset_bytes(out) == dataset_bytes(blob_path(cad.blob_root, path)), label
        assert dcmread(out).file_meta.TransferSyntaxUID == dcmread(path).file_meta.TransferSyntaxUID, label
        assert same_dataset(out, path), f"{label}: elements differ"


def test_host_sender_sends_the_series_back_to_the_node_that_sent_it(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus], storescp: StoreScp) -> None:
    """`host: sender`: the destination address is the association's peer, recorded in the task."""
    files = make_series(tmp_path / "ct", 3, size=32)
    config = {
        "settings": settings_doc(),
        "targets": {"back": dicom_target(storescp.port, storescp.aet, host="sender")},
        "rules": {"everything-back": {"filter": "True", "targets": ["back"]}},
    }
    cad = caduceus_factory(config=config)
    sent = storescu(cad.dicom_port, files)
    assert sent.returncode == 0, sent.output

    wait_for(lambda: _sops(storescp.files()) == _sops(files), 60, "storescp has the series back", cad.logs)
    requested = cad.wait_events("dispatch.requested", lambda found: len(found) >= 1, 30)
    assert [e.payload["peer_host"] for e in requested] == ["127.0.0.1"]
    completed = cad.wait_events("dispatch.completed", lambda found: len(found) >= 1, 30)
    assert completed[0].payload["sent"] == len(files)
