"""services.receiver.part10 writes the same File Meta bytes as pynetdicom."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from services.receiver.part10 import PREAMBLE, file_meta, without_file_meta_elements


@pytest.mark.parametrize("length", range(10, 65))
def test_same_bytes_as_pynetdicom(length: int) -> None:
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50",
                   "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.201"):
        sop_class = "1.2.840.10008.5.1.4.1.1.2"
        instance = (generate_uid() + "1234567890" * 7)[:length].rstrip(".")
        expected = encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance),
                                                     transfer_syntax=UID(syntax)))
        assert file_meta(sop_class, instance, syntax) == expected


@pytest.mark.parametrize("bad", ["", "1.2.x", "1.2.3 ", "ü", "1" * 65])
def test_unusual_values_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        file_meta("1.2.3", bad, "1.2.840.10008.1.2")


def _file(syntax: str, data_set: bytes) -> bytes:
    return PREAMBLE + file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", syntax) + data_set


def _data_set(syntax: str, elements: list[tuple[int, str, bytes | str | int]]) -> bytes:
    with BytesIO() as out:
        fp = DicomFileLike(out)
        fp.is_little_endian, fp.is_implicit_VR = True, syntax == "1.2.840.10008.1.2"
        ds = Dataset()
        for tag, vr, value in elements:
            ds.add(DataElement(tag, vr, value))
        write_dataset(fp, ds)
        return out.getvalue()


PATIENT: tuple[int, str, bytes | str | int] = (0x00100020, "LO", "ID1")
INJECTED: list[tuple[int, str, bytes | str | int]] = [
    (0x00020001, "OB", b"\x00\x01"), (0x00020003, "UI", "1.2.3"), (0x00020010, "UI", "1.2.840.10008.1.2.4.50")]


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
def test_file_meta_elements_in_the_data_set_are_dropped(syntax: str) -> None:
    clean = _file(syntax, _data_set(syntax, [PATIENT]))
    data, dropped = without_file_meta_elements(_file(syntax, _data_set(syntax, [*INJECTED, PATIENT])), syntax)
    assert data == clean and dropped > 0
    assert without_file_meta_elements(clean, syntax) == (clean, 0)


def test_what_cannot_be_walked_is_left_as_it_is() -> None:
    explicit = "1.2.840.10008.1.2.1"
    undefined = _file(explicit, b"\x02\x00\x10\x00UN\x00\x00\xff\xff\xff\xff" + b"x" * 20)
    truncated = _file(explicit, b"\x02\x00\x10\x00UI\x40\x00" + b"1.2")
    deflated = _file("1.2.840.10008.1.2.1.99", b"\x02\x00\x10\x00UI\x02\x001\x00")
    for data, syntax in ((undefined, explicit), (truncated, explicit), (deflated, "1.2.840.10008.1.2.1.99")):
        assert without_file_meta_elements(data, syntax) == (data, 0)


def test_explicit_file_meta_in_an_implicit_data_set_is_dropped_whole() -> None:
    """A sender that writes a whole Part 10 file into the data set writes its File Meta as Explicit
    VR Little Endian (PS3.10 7.1) whatever the negotiated syntax: read as implicit, '(0002,0000) UL'
    gave a length of 0x44C55 and cut 281 KB out of the data set (or left the header in place)."""
    implicit, explicit = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
    pixels: tuple[int, str, bytes | str | int] = (0x7FE00010, "OW", b"\x00" * 300_000)
    clean = _file(implicit, _data_set(implicit, [PATIENT, pixels]))
    injected = _data_set(explicit, [(0x00020000, "UL", 80), *INJECTED])
    data, dropped = without_file_meta_elements(
        _file(implicit, injected + _data_set(implicit, [PATIENT, pixels])), implicit)
    assert (data == clean, dropped) == (True, len(injected))
