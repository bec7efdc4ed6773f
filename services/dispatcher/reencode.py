"""Implicit VR Little Endian copies for a peer that refuses a file's own transfer syntax.

Why: a Storage SCP must accept Implicit VR Little Endian, DICOM's default transfer syntax, for
every SOP class it supports (PS3.5 10.1), but older PACS and many workstations accept nothing
else. A file received as Explicit VR Little Endian (what most modalities send) or Deflated
Explicit VR Little Endian would then fail at every attempt and end in the error queue. So each
such file is also proposed as Implicit VR Little Endian, and, only when the peer accepted that
and not the file's own syntax, its data set is re-encoded on the way out: the same elements and
values, the same pixel bytes, only the VR fields dropped (and deflate undone). DCMTK's storescu
does the same. Values are copied as the file holds them, never decoded and encoded again: in
little endian a value's bytes do not depend on the VR being explicit, and text must keep its exact
bytes (a patient name in a character set the file misdeclares would otherwise be rewritten).
Only sequences are rebuilt, since their items carry VR fields of their own. Compressed syntaxes (JPEG, JPEG 2000, RLE...) are never converted: that would
decode pixel data, lossy ones would lose more, and that is not a router's decision to make.

Memory stays bounded for large files: the pixel data of a plain (not deflated) file are copied
from the file in blocks behind their new element header; pydicom decodes only the rest.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

FALLBACK_SYNTAX = str(ImplicitVRLittleEndian)
CONVERTIBLE_SYNTAXES = frozenset({str(ExplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian)})
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 1 << 20  # values above this stay in the file while the rest is read
# Text VRs pad an odd-length value with a space; the others (UI, binary) with a NUL byte.
SPACE_PADDED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
                              "UC", "UR", "UT"})


class ReencodeError(Exception):
    """The file could not be re-encoded (pydicom could not read or write it)."""


def fallback_syntax(transfer_syntax_uid: str) -> str | None:
    """The syntax to propose beside the file's own, None if the file is sent only as it is."""
    return FALLBACK_SYNTAX if transfer_syntax_uid in CONVERTIBLE_SYNTAXES else None


@dataclass
class DataSetStream:
    """The re-encoded data set as consecutive parts, read like a file: bytes, then file ranges."""

    size: int
    name: str
    parts: list[tuple[BinaryIO, int]] = field(default_factory=list)  # (positioned source, bytes to take)

    def read(self, count: int) -> bytes:
        while self.parts and self.parts[0][1] == 0:
            self.parts.pop(0)
        if not self.parts:
            return b""
        source, left = self.parts[0]
        data = source.read(min(count, left))
        if not data:
            raise OSError(f"{self.name} ended {left} bytes early")
        self.parts[0] = (source, left - len(data))
        return data


@contextmanager
def implicit_data_set(path: Path, transfer_syntax_uid: str) -> Iterator[DataSetStream]:
    """The data set of the Part 10 file at `path`, as Implicit VR Little Endian bytes."""
    deflated = transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    try:
        # A deflated file is inflated in memory, where deferred values could not be read back.
        dataset = dcmread(path, defer_size=None if deflated else DEFER_BYTES)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a file it cannot read
        raise ReencodeError(f"cannot read {path.name} to re-encode it: {exc}") from exc
    pixel = None if deflated else _pixel_data_in_file(dataset)
    if pixel is None:
        whole = _implicit_bytes(dataset, path)
        yield DataSetStream(len(whole), path.name, [(BytesIO(whole), len(whole))])
        return
    tail = _split_off_after_pixel_data(dataset)
    pad = pixel.length % 2  # an odd length is invalid DICOM; peers abort on odd PDV lengths
    head = _implicit_bytes(dataset, path) + struct.pack("<HHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF,
                                                        pixel.length + pad)
    after = b"\0" * pad + _implicit_bytes(tail, path)
    with open(path, "rb") as source:
        source.seek(pixel.value_tell)
        yield DataSetStream(len(head) + pixel.length + len(after), path.name,
                            [(BytesIO(head), len(head)), (source, pixel.length), (BytesIO(after), len(after))])


def decoded(path: Path, transfer_syntax_uid: str) -> Dataset:
    """The file as an Implicit VR Little Endian data set in memory, for pynetdicom's own sender.

    Read back from the bytes of `implicit_data_set`, so pynetdicom, which sees its encoding is
    already the one to send, writes every value as it stands.
    """
    with implicit_data_set(path, transfer_syntax_uid) as stream:
        data = b"".join(iter(lambda: stream.read(1 << 20), b""))
    try:
        dataset = read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for data it cannot read
        raise ReencodeError(f"cannot read {path.name} back after re-encoding it: {exc}") from exc
    return dataset


def _pixel_data_in_file(dataset: Dataset) -> RawDataElement | None:
    """The pixel data element if its value was left in the file (large, defined length)."""
    if PIXEL_DATA not in dataset:
        return None
    element = dataset.get_item(PIXEL_DATA, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.value is not None \
            or element.length == UNDEFINED_LENGTH:
        return None
    return element


def _split_off_after_pixel_data(dataset: Dataset) -> Dataset:
    """Remove the pixel data and what follows it (e.g. trailing padding); returns what followed."""
    tail = Dataset()
    for tag in [t for t in dataset.keys() if t > PIXEL_DATA]:
        tail[tag] = dataset.get_item(tag)  # still raw: its bytes are copied, not decoded
        del dataset[tag]
    del dataset[PIXEL_DATA]
    return tail


def _implicit_bytes(dataset: Dataset, path: Path) -> bytes:
    out = BytesIO()
    try:
        _write_implicit(dataset, out)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for values it cannot read or write
        raise ReencodeError(f"cannot re-encode {path.name} as Implicit VR Little Endian: {exc}") from exc
    return out.getvalue()


def _write_implicit(dataset: Dataset, out: BinaryIO) -> None:
    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # group lengths (retired) would be wrong once the VR fields are gone
        element = dataset.get_item(tag)
        header = struct.pack("<HH", tag.group, tag.element)
        if isinstance(element, RawDataElement) and not _holds_items(element):
            value = element.value or b""
            if len(value) % 2:  # invalid DICOM, padded as DCMTK's senders do
                value += b" " if element.VR in SPACE_PADDED_VRS else b"\0"
            out.write(header + struct.pack("<I", len(value)) + value)
        elif dataset[tag].VR == "SQ":
            items = BytesIO()
            for item in dataset[tag].value:
                body = BytesIO()
                _write_implicit(item, body)
                items.write(struct.pack("<HHI", 0xFFFE, 0xE000, body.tell()) + body.getvalue())
            out.write(header + struct.pack("<I", items.tell()) + items.getvalue())
        else:
            # Decoded before it came here (not by this module): pydicom encodes it.
            buffer = DicomBytesIO()
            buffer.is_implicit_VR = True
            buffer.is_little_endian = True
            write_data_element(buffer, dataset[tag], dataset.get("SpecificCharacterSet", default_encoding))
            out.write(buffer.getvalue())


def _holds_items(element: RawDataElement) -> bool:
    """A sequence, or a value of undefined length (an encapsulated or UN sequence): items with VR fields."""
    return element.VR == "SQ" or element.length == UNDEFINED_LENGTH
