"""Read the routing tags of a DICOM instance without decoding its pixel data.

Used by the receiver for every instance it accepts and by `caduceus rule test --file`.

- Input: the encoded bytes (with or without preamble/file meta) or a file path.
- Parsing stops before Pixel Data (and the other bulk pixel elements) and only the requested
  elements are kept (`specific_tags`), so a 500 KiB CT costs about as much as its header.
- Values are strings, as rules see them (like mercure): multi-valued elements are joined with
  '\\', person names are their DICOM string form, numbers keep their text form.
- Text is decoded with the dataset's Specific Character Set. A missing, unknown or wrong character
  set never raises: the value is decoded with a fallback (UTF-8, then Latin-1) and a note is made in
  `ExtractedTags.warnings`. Only data that is not DICOM at all raises `TagExtractionError`.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

# Elements every caller needs whatever was configured.
IDENTITY_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                     "SpecificCharacterSet")
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
_HEX_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


class TagExtractionError(ValueError):
    """The data is not a readable DICOM dataset."""


@dataclass
class ExtractedTags:
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    tags: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_tag_name(name: str) -> tuple[BaseTag, str] | None:
    """A keyword ('PatientName') or a hex tag ('(0019,10A1)', '001910A1') -> (tag, key in results)."""
    name = name.strip()
    match = _HEX_TAG.match(name)
    if match:
        return Tag(int(match.group(1) + match.group(2), 16)), name
    number = tag_for_keyword(name)
    if number is None:
        return None
    return Tag(number), name


def _wanted_tags(keywords: Iterable[str]) -> dict[BaseTag, str]:
    wanted: dict[BaseTag, str] = {}
    for name in (*IDENTITY_KEYWORDS, *keywords):
        parsed = parse_tag_name(name)
        if parsed is not None:
            wanted.setdefault(parsed[0], parsed[1])
    return wanted


def _fallback_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_to_text(v) for v in value)
    if isinstance(value, bytes):
        return _fallback_text(value).rstrip("\x00 ")
    return str(value)


_BINARY_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "UV": "Q", "SV": "q",
                   "AT": "H"}


def _raw_text(raw: RawDataElement, vr: str, little: bool) -> str | None:
    """Fast path for non-text VRs: the raw bytes already are the DICOM string form."""
    value = raw.value or b""
    if vr in _BINARY_NUMBERS:
        code = _BINARY_NUMBERS[vr]
        size = struct.calcsize(code)
        count = len(value) // size
        numbers = struct.unpack(("<" if little else ">") + code * count, value[:count * size])
        if vr == "AT":
            pairs = zip(numbers[0::2], numbers[1::2], strict=False)
            return "\\".join(f"({g:04X},{e:04X})" for g, e in pairs)
        return "\\".join(repr(n) if isinstance(n, float) else str(n) for n in numbers)
    return value.decode("ascii", "replace").strip(" \x00")


def _element_text(ds: Dataset, tag: BaseTag, notes: list[str]) -> str | None:
    """The string form of one element; None when absent, binary or a sequence (not rule material)."""
    raw = ds._dict.get(tag)  # the raw element, before pydicom converts it in place
    if raw is None:
        return None
    if isinstance(raw, RawDataElement):
        if raw.length not in (0xFFFFFFFF, None) and raw.value is not None and len(raw.value) < raw.length:
            raise TagExtractionError(f"truncated: {keyword_of(tag)} declares {raw.length} bytes, "
                                     f"{len(raw.value)} present")
        # Explicit VR "UN" for a standard element (as GDCM writes after some conversions) still
        # holds the standard encoding: read it by its dictionary VR, as pydicom itself does.
        vr = raw.VR if raw.VR and raw.VR != "UN" else dictionary_vr(tag)
        if vr in BINARY_VRS:
            return None
        if vr not in TEXT_VRS:
            return _raw_text(raw, vr, ds.original_encoding[1] is not False)
    try:
        with warnings.catch_warnings():
            # pydicom warns and guesses on unknown or wrong charsets; we want to know and fall back.
            warnings.simplefilter("error")
            elem = ds[tag]
    except Exception as exc:  # noqa: BLE001 - bad charsets are data problems, never fatal
        notes.append(f"{keyword_of(tag)}: text not decodable with {ds.get('SpecificCharacterSet')!r} "
                     f"({exc}); fallback decoding used")
        return _to_text(raw.value).rstrip(" \x00") if isinstance(raw, RawDataElement) else None
    if elem.VR in BINARY_VRS or isinstance(elem.value, Sequence):
        return None
    return _to_text(elem.value)


def dictionary_vr(tag: BaseTag) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"  # private or unknown tag in implicit VR: no way to know, keep it opaque


def _read(fileobj: BinaryIO, wanted: list[BaseTag]) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dcmread(fileobj, stop_before_pixels=True, specific_tags=wanted, force=True)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, IndexError,
            NotImplementedError, OverflowError, UnicodeError, struct.error) as exc:
        raise TagExtractionError(f"not a readable DICOM dataset: {exc}") from exc


_LONG_HEADER_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"}


def _check_complete(fileobj: BinaryIO, total: int, ds: Dataset) -> None:
    """Raise if the data ends inside an element.

    pydicom seeks past the elements it was not asked for, so a truncation before the pixel data
    shows as a read position beyond the end. From the pixel data on (where pydicom stopped), the
    remaining top-level element headers are walked: each length must fit in what is left.
    """
    pos = fileobj.tell()
    if pos > total:
        raise TagExtractionError(f"truncated: an element runs {pos - total} bytes past the end of the data")
    if pos >= total or str(getattr(ds.file_meta, "TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian:
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    order = "<" if little else ">"
    while pos < total:
        fileobj.seek(pos)
        head = fileobj.read(12)
        if len(head) < 8:
            raise TagExtractionError("truncated: incomplete element header at the end of the data")
        if implicit:
            length, header = struct.unpack(order + "I", head[4:8])[0], 8
        elif head[4:6] in _LONG_HEADER_VRS:
            if len(head) < 12:
                raise TagExtractionError("truncated: incomplete element header at the end of the data")
            length, header = struct.unpack(order + "I", head[8:12])[0], 12
        else:
            length, header = struct.unpack(order + "H", head[6:8])[0], 8
        if length == 0xFFFFFFFF:
            group, element = struct.unpack(order + "HH", head[:4])
            if group != 0x7FE0:
                return  # an undefined-length sequence after the pixel data: rare, not walked
            pos = _check_fragments(fileobj, pos + header, total, order)
        else:
            pos += header + length
    if pos > total:
        raise TagExtractionError(f"truncated: the last element runs {pos - total} bytes past the end of the data")


def _check_fragments(fileobj: BinaryIO, offset: int, total: int, order: str) -> int:
    """Walk the items of encapsulated pixel data; return the offset after them.

    A missing sequence delimiter at the very end is tolerated (some real files lack it).
    """
    while offset + 8 <= total:
        fileobj.seek(offset)
        group, element, length = struct.unpack(order + "HHI", fileobj.read(8))
        if (group, element) == (0xFFFE, 0xE0DD):
            return offset + 8
        if (group, element) != (0xFFFE, 0xE000):
            return total  # not an item: not ours to judge
        offset += 8 + length
    if offset > total:
        raise TagExtractionError(f"truncated: a pixel data fragment runs {offset - total} bytes past the end")
    if offset != total:
        raise TagExtractionError("truncated: incomplete item header in encapsulated pixel data")
    return offset


def _read_checked(fileobj: BinaryIO, total: int, wanted: list[BaseTag]) -> Dataset:
    ds = _read(fileobj, wanted)
    # force=True reads anything as implicit VR; data with none of the wanted elements is not DICOM.
    if not any(tag in ds for tag in wanted):
        raise TagExtractionError("no DICOM elements found")
    _check_complete(fileobj, total, ds)
    return ds


def extract_tags(source: bytes | bytearray | memoryview | str | Path,
                 keywords: Iterable[str] = ()) -> ExtractedTags:
    """Read `keywords` (plus the identity UIDs) from a DICOM instance; see the module docstring."""
    wanted = _wanted_tags(keywords)
    if isinstance(source, str | Path):
        with open(source, "rb") as handle:
            ds = _read_checked(handle, os.fstat(handle.fileno()).st_size, list(wanted))
    else:
        ds = _read_checked(io.BytesIO(source), len(source), list(wanted))
    notes: list[str] = []
    tags: dict[str, str] = {}
    for tag, name in wanted.items():
        try:
            text = _element_text(ds, tag, notes)
        except TagExtractionError:
            raise
        except Exception as exc:  # noqa: BLE001 - one malformed value must not hide the others
            notes.append(f"{name}: unreadable value ({exc})")
            continue
        if text is not None:
            tags[name] = text
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    return ExtractedTags(
        study_uid=tags.get("StudyInstanceUID", ""),
        series_uid=tags.get("SeriesInstanceUID", ""),
        sop_uid=tags.get("SOPInstanceUID", ""),
        sop_class_uid=tags.get("SOPClassUID", ""),
        transfer_syntax_uid=transfer_syntax,
        tags=tags,
        warnings=notes,
    )


def keyword_of(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"

