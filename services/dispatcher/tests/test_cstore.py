"""The dispatcher's own C-STORE writer (services/dispatcher/cstore.py) against pydicom and DCMTK."""

from __future__ import annotations

import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_dataset
from pynetdicom.dsutils import split_dataset

from services.dispatcher import cstore
from services.dispatcher.sender import Destination, SendItem, send_items
from tests.peers import StoreScp, make_series

# Plain files, big endian, deflated, nested sequences, no file meta, file meta without a transfer syntax.
TEST_FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle_32bit.dcm", "rtplan.dcm", "rtdose.dcm",
              "SC_rgb_small_odd_big_endian.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm", "nested_priv_SQ.dcm",
              "no_meta.dcm", "meta_missing_tsyntax.dcm"]


def _testdata(name: str) -> Path:
    found = get_testdata_file(name)
    assert found, f"pydicom test file {name} missing"
    return Path(str(found))


def _dataset_bytes(path: Path) -> bytes:
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


@pytest.mark.parametrize("name", TEST_FILES)
def test_file_meta_matches_pydicom(name: str) -> None:
    path = _testdata(name)
    try:
        expected, offset = split_dataset(path)
    except Exception as exc:  # noqa: BLE001 - a file pynetdicom cannot send must not be sent by us either
        with pytest.raises(type(exc)):
            cstore.read_file_meta(path)
        return
    if "TransferSyntaxUID" not in expected:
        with pytest.raises(AttributeError):
            cstore.read_file_meta(path)
        return
    meta = cstore.read_file_meta(path)
    assert meta == cstore.FileMeta(str(expected.MediaStorageSOPClassUID), str(expected.MediaStorageSOPInstanceUID),
                                   str(expected.TransferSyntaxUID), offset)


def test_file_meta_of_a_file_without_preamble_comes_from_pydicom(tmp_path: Path) -> None:
    source = _testdata("CT_small.dcm")
    stripped = tmp_path / "nopreamble.dcm"
    stripped.write_bytes(source.read_bytes()[128:])  # starts with "DICM"
    assert cstore._walk_file_meta(stripped.read_bytes()) is None
    try:
        expected, offset = split_dataset(stripped)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc)):
            cstore.read_file_meta(stripped)
        return
    assert cstore.read_file_meta(stripped).offset == offset
    assert cstore.read_file_meta(stripped).sop_instance_uid == str(expected.MediaStorageSOPInstanceUID)


def test_command_set_is_what_pydicom_reads() -> None:
    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.55"  # the instance UID has odd length
    encoded = cstore.encode_c_store_rq(7, sop_class, sop_instance)
    ds = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(encoded) - 12
    assert ds.AffectedSOPClassUID == sop_class and ds.AffectedSOPInstanceUID == sop_instance
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType) == (0x0001, 7, 0x0000, 0x0001)
    assert len(encoded) % 2 == 0


def test_small_peer_pdus_many_instances_bit_preserved(tmp_path: Path,
                                                      storescp_factory: Callable[..., StoreScp]) -> None:
    """A peer with the smallest maximum PDU (4096): every data set spans many PDUs, some end on a
    fragment boundary; message ids count up; storescp writes exactly the bytes of the source."""
    peer = storescp_factory(extra_args=["--max-pdu", "4096"])
    files = make_series(tmp_path / "series", 12, size=64)
    files += [_testdata(n) for n in ("JPEG2000.dcm", "SC_rgb_small_odd_big_endian.dcm")]
    items = []
    for index, path in enumerate(files):
        ds = dcmread(path, stop_before_pixels=True)
        items.append(SendItem(index, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                              str(ds.file_meta.TransferSyntaxUID), path))
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"), items,
                        lambda index, status: None, threading.Event())
    assert sorted(result.delivered) == list(range(len(files))) and not result.failed and not result.errors
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in peer.files()}
    for item in items:
        assert _dataset_bytes(received[item.sop_uid]) == _dataset_bytes(item.path), item.path.name


def test_fragment_size_follows_the_peer_maximum_within_bounds() -> None:
    from types import SimpleNamespace

    def assoc(maximum: int) -> SimpleNamespace:
        return SimpleNamespace(acceptor=SimpleNamespace(maximum_length=maximum))

    assert cstore._fragment_size(assoc(16384)) == 16378
    assert cstore._fragment_size(assoc(0)) == cstore.UNLIMITED_FRAGMENT  # 0: the peer has no limit
    assert cstore._fragment_size(assoc(0xFFFFFFFF)) == cstore.UNLIMITED_FRAGMENT  # memory stays bounded
    with pytest.raises(ValueError):
        cstore._fragment_size(assoc(6))
