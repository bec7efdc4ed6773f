"""Implicit VR Little Endian copies for a peer that refuses a file's own transfer syntax.

Why: a Storage SCP must accept Implicit VR Little Endian, DICOM's default transfer syntax, for
every SOP class it supports (PS3.5 10.1), but older PACS and many workstations accept nothing
else. A file received as Explicit VR Little Endian (what most modalities send) or Deflated
Explicit VR Little Endian would then fail at every attempt and end in the error queue. So each
such file is also proposed as Implicit VR Little Endian, and, only when the peer accepted that
and not the file's own syntax, its data set is re-encoded on the way out: the same elements and
values, the same pixel bytes, only the VR fields dropped (and deflate undone). DCMTK's storescu
does the same. Compressed syntaxes (JPEG, JPEG 2000, RLE...) are never converted: that would
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
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

FALLBACK_SYNTAX = str(ImplicitVRLittleEndian)
CONVERTIBLE_SYNTAXES = frozenset({str(ExplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian)})
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFER_BYTES = 1 << 20  # values above this stay in the file while the rest is decoded


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
    charset = dataset.get("SpecificCharacterSet", default_encoding)
    tail = _split_off_after_pixel_data(dataset, path)
    pad = pixel.length % 2  # an odd length is invalid DICOM; peers abort on odd PDV lengths
    head = _implicit_bytes(dataset, path) + struct.pack("<HHI", PIXEL_DATA >> 16, PIXEL_DATA & 0xFFFF,
                                                        pixel.length + pad)
    after = b"\0" * pad + _implicit_bytes(tail, path, charset)
    with open(path, "rb") as source:
        source.seek(pixel.value_tell)
        yield DataSetStream(len(head) + pixel.length + len(after), path.name,
                            [(BytesIO(head), len(head)), (source, pixel.length), (BytesIO(after), len(after))])


def decoded(path: Path) -> Dataset:
    """The whole file decoded in memory, odd-length values padded: for pynetdicom's own conversion."""
    try:
        dataset = dcmread(path)
        dataset.walk(_pad_odd_binary_value)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a file it cannot read
        raise ReencodeError(f"cannot read {path.name} to re-encode it: {exc}") from exc
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


def _split_off_after_pixel_data(dataset: Dataset, path: Path) -> Dataset:
    """Remove the pixel data and what follows it (e.g. trailing padding); returns what followed."""
    tail = Dataset()
    try:
        for tag in [t for t in dataset.keys() if t > PIXEL_DATA]:
            tail.add(dataset[tag])  # decoded here, with the data set's own encoding and character set
            del dataset[tag]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for values it cannot read
        raise ReencodeError(f"cannot read {path.name} to re-encode it: {exc}") from exc
    del dataset[PIXEL_DATA]
    return tail


def _pad_odd_binary_value(_: Dataset, element: DataElement) -> None:
    """Pad an odd-length binary value (invalid DICOM) as DCMTK's senders do; pydicom writes it as it is."""
    if isinstance(element.value, bytes) and len(element.value) % 2:
        element.value += b"\0"


def _implicit_bytes(dataset: Dataset, path: Path, charset: str | list[str] = default_encoding) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR = True
    out.is_little_endian = True
    try:
        dataset.walk(_pad_odd_binary_value)
        write_dataset(out, dataset, charset)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for values it cannot write
        raise ReencodeError(f"cannot re-encode {path.name} as Implicit VR Little Endian: {exc}") from exc
    return out.getvalue()
