"""A peer that accepts only Implicit VR Little Endian (DCMTK storescp +xi): files in Explicit VR
Little Endian or deflated are re-encoded for it, compressed ones fail with a clear reason."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dsutils import encode

from bench.synthetic import write_series
from services.dispatcher import reencode
from services.dispatcher.reencode import PIXEL_DATA
from services.dispatcher.sender import MAX_CONTEXTS, Destination, SendItem, context_groups, send_items
from tests.e2e.dicomfiles import real_world_files, same_dataset
from tests.peers import StoreScp, make_series

IMPLICIT_ONLY = ["+xi"]  # after the harness's +xa: the last of the group wins


def _item(index: int, path: Path) -> SendItem:
    ds = dcmread(path, stop_before_pixels=True)
    return SendItem(index, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), path)


def _reencoded(path: Path) -> bytes:
    return _reencoded_syntax(path, str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID))


def _reencoded_syntax(path: Path, syntax: str) -> bytes:
    with reencode.implicit_data_set(path, syntax) as stream:
        data = b"".join(iter(lambda: stream.read(1 << 20), b""))
    assert len(data) == stream.size
    return data


def test_only_uncompressed_little_endian_files_get_a_fallback() -> None:
    assert reencode.fallback_syntax("1.2.840.10008.1.2.1") == ImplicitVRLittleEndian  # explicit VR LE
    assert reencode.fallback_syntax("1.2.840.10008.1.2.1.99") == ImplicitVRLittleEndian  # deflated
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5"):
        assert reencode.fallback_syntax(syntax) is None  # implicit already, big endian, JPEG, RLE


def test_large_pixel_data_are_streamed_and_the_bytes_match_a_full_conversion(tmp_path: Path) -> None:
    [path] = write_series(tmp_path, 1, size=2048)  # 8 MB of pixel data, trailing padding after them
    expected = encode(dcmread(path), True, True)
    tracemalloc.start()
    try:
        data = _reencoded(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data == expected
    # The joined result itself is 8 MB; a conversion in memory would have held two more copies.
    assert peak < 2.5 * len(data), peak


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "image_dfl.dcm"])
def test_small_and_deflated_files_keep_every_value(name: str) -> None:
    path = Path(str(get_testdata_file(name)))
    copy = read_dataset(BytesIO(_reencoded(path)), is_implicit_VR=True, is_little_endian=True)
    original = dcmread(path)
    assert set(copy.keys()) == set(original.keys())
    assert copy.PixelData == original.PixelData
    for tag in original.keys():
        if not tag.is_private:  # private values come back as UN bytes: no dictionary for their VR
            assert copy[tag].value == original[tag].value, tag


def _raw_values(dataset: Dataset) -> dict[str, bytes]:
    """Every value's bytes as stored, sequences item by item, keyed by tag path."""
    values: dict[str, bytes] = {}
    for tag in dataset.keys():
        element = dataset[tag]
        if element.VR == "SQ":
            for number, item in enumerate(element.value):
                values.update({f"{tag}[{number}]{key}": value for key, value in _raw_values(item).items()})
        else:
            values[str(tag)] = dataset.get_item(tag).value if tag != PIXEL_DATA else b"pixels"
    return values


def _with_raw_text(tmp_path: Path, charset: str, replacements: dict[bytes, bytes], size: int) -> Path:
    """An Explicit VR LE file whose text values hold bytes pydicom would not write (swapped in after)."""
    [path] = write_series(tmp_path, 1, size=size)
    ds = dcmread(path)
    ds.SpecificCharacterSet = charset
    ds.PatientName = "PLACEHOLDER_NAME"
    ds.SeriesDescription = "PLACEHOLDER_DESC"
    item = Dataset()
    item.CodeMeaning = "PLACEHOLDER_ITEM"
    item.CodeValue = "123"
    ds.ProcedureCodeSequence = [item]
    ds.save_as(path)
    data = path.read_bytes()
    for placeholder, value in replacements.items():
        assert len(value) <= len(placeholder) and data.count(placeholder) == 1
        data = data.replace(placeholder, value.ljust(len(placeholder)))
    path.write_bytes(data)
    return path


TEXT_CASES = {
    # Latin-1 bytes under a UTF-8 label (common from older modalities): not valid UTF-8.
    "ISO_IR 192": {b"PLACEHOLDER_NAME": b"M\xfcller^J\xf6rg", b"PLACEHOLDER_DESC": b"Desc\xc3 head",
                   b"PLACEHOLDER_ITEM": b"\xff\xfe item"},
    # Valid ISO 2022 IR 87 with escapes pydicom would write differently (a leading ESC ( B).
    "\\ISO 2022 IR 87": {b"PLACEHOLDER_NAME": b"\x1b(BYamada^Taro", b"PLACEHOLDER_DESC": b"\x1b$B;3ED\x1b(B head",
                          b"PLACEHOLDER_ITEM": b"code meaning"},
}


@pytest.mark.parametrize("size", [64, 1024])  # in memory, and with the pixel data streamed from the file
@pytest.mark.parametrize("charset", sorted(TEXT_CASES))
def test_text_values_keep_their_exact_bytes(tmp_path: Path, charset: str, size: int) -> None:
    path = _with_raw_text(tmp_path, charset, TEXT_CASES[charset], size)
    original = _raw_values(dcmread(path))
    streamed = _reencoded(path)
    assert _raw_values(read_dataset(BytesIO(streamed), is_implicit_VR=True, is_little_endian=True)) == original
    for value in TEXT_CASES[charset].values():
        assert value in streamed
    # pynetdicom's own sender (CADUCEUS_DISPATCH_FASTPATH=0) gets the same bytes.
    assert encode(reencode.decoded(path, str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)),
                  True, True) == streamed


def test_a_file_that_cannot_be_read_is_a_reencode_error(tmp_path: Path) -> None:
    # pydicom reads damaged data sets leniently; what it cannot do is read a file that is gone.
    with pytest.raises(reencode.ReencodeError, match="cannot read gone.dcm"):
        _reencoded_syntax(tmp_path / "gone.dcm", "1.2.840.10008.1.2.1")


def test_fallback_contexts_count_towards_the_association_limit(tmp_path: Path) -> None:
    [path] = make_series(tmp_path / "s", 1)
    items = [SendItem(i, f"1.2.{i}", f"1.2.840.99.{i}", "1.2.840.10008.1.2.1", path) for i in range(100)]
    groups = context_groups(items)
    assert [len(g) for g in groups] == [MAX_CONTEXTS // 2, 100 - MAX_CONTEXTS // 2]  # two contexts each


@pytest.mark.parametrize("fastpath", ["1", "0"])  # 0: pynetdicom's own loops and its conversion
def test_implicit_only_peer_receives_every_uncompressed_file(tmp_path: Path, fastpath: str,
                                                             storescp_factory: Callable[..., StoreScp],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CADUCEUS_DISPATCH_FASTPATH", fastpath)
    peer = storescp_factory(extra_args=IMPLICIT_ONLY)
    world = real_world_files(tmp_path / "world")
    files = make_series(tmp_path / "series", 6) + write_series(tmp_path / "large", 2, size=1024) \
        + list(world.values()) + [Path(str(get_testdata_file(n))) for n in ("image_dfl.dcm", "rtplan.dcm")]
    items = [_item(i, p) for i, p in enumerate(files)]
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"), items,
                        lambda index, status: None, threading.Event())

    compressed = {i.index for i in items if dcmread(i.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
                  .is_compressed}
    assert compressed and set(result.failed) == compressed and not result.errors, (result.failed, result.errors)
    for index in compressed:  # (refused among other contexts, then alone: for good)
        assert result.failed[index].endswith("(transfer syntax not supported)"), result.failed[index]
    assert result.context_refused == compressed
    convertible = {i.index for i in items if reencode.fallback_syntax(i.transfer_syntax_uid)}
    assert result.reencoded == len(convertible) >= 6 + 2 + 1
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in peer.files()}
    assert set(received) == {items[i].sop_uid for i in result.delivered}
    for index in result.delivered:
        copy, source = received[items[index].sop_uid], items[index].path
        assert dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert dcmread(copy).PixelData == dcmread(source).PixelData if "PixelData" in dcmread(source) else True
        if not any(tag.is_private for tag in dcmread(source, stop_before_pixels=True).keys()):
            assert same_dataset(copy, source), source.name
