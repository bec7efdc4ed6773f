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

import functools
import io
import mmap
import os
import re
import struct
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, data_element_generator, dcmread, read_preamble
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, STANDARD_VR

# Elements every caller needs whatever was configured.
IDENTITY_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                     "SpecificCharacterSet")
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}
BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}
_HEX_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")


# What the header readers walk: bytes, or a memory-mapped file (read in place).
Data = bytes | mmap.mmap


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


@dataclass(frozen=True)
class _Wanted:
    """The elements to read, parsed once per configured list (the receiver asks for the same list
    for every image). Shared between calls: never modified."""

    names: dict[BaseTag, str]  # tag -> its key in the results, the identity elements first
    # The same tags as plain ints: a set of BaseTags would call BaseTag.__eq__ (Python code) for
    # every element found; and int -> the BaseTag object, so that found elements are keyed by it.
    numbers: frozenset[int]
    by_number: dict[int, BaseTag]


def _wanted_tags(keywords: Iterable[str]) -> _Wanted:
    return _wanted_cached(tuple(keywords))


@functools.lru_cache(maxsize=64)
def _wanted_cached(keywords: tuple[str, ...]) -> _Wanted:
    names: dict[BaseTag, str] = {}
    for name in (*IDENTITY_KEYWORDS, *keywords):
        parsed = parse_tag_name(name)
        if parsed is not None:
            names.setdefault(parsed[0], parsed[1])
    return _Wanted(names, frozenset(int(tag) for tag in names), {int(tag): tag for tag in names})


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
            NotImplementedError, OverflowError, UnicodeError, struct.error, OSError, zlib.error,
            BytesLengthException) as exc:
        # OSError: pydicom's "No tag to read at file position ..." for data cut inside a sequence;
        # zlib.error: a cut deflated dataset; BytesLengthException (a RuntimeError): a File Meta
        # element whose length does not fit its VR.
        raise TagExtractionError(f"not a readable DICOM dataset: {exc}") from exc


_LONG_HEADER_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"}


def _check_complete(fileobj: BinaryIO, total: int, ds: Dataset) -> None:
    """Raise if the data ends inside an element (pydicom path)."""
    pos = fileobj.tell()
    if pos > total:
        raise TagExtractionError(f"truncated: an element runs {pos - total} bytes past the end of the data")
    implicit, little = ds.original_encoding
    if str(getattr(ds.file_meta, "TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian \
            or implicit is None or little is None:
        return
    if pos < total:
        _check_tail(fileobj, pos, total, implicit, little)
        return
    # Read to the end: pydicom also stops there, without a word, at a cut element header.
    end = _last_element_end(fileobj, implicit, little)
    if end > total:
        raise TagExtractionError(f"truncated: an element runs {end - total} bytes past the end of the data")
    if end < total and not _is_zero_padding(_read_at(fileobj, end, total - end)):
        raise TagExtractionError("truncated: incomplete element header at the end of the data")


def _last_element_end(fileobj: BinaryIO, implicit: bool, little: bool) -> int:
    """Where the last whole top-level element of the data set ends."""
    fileobj.seek(0)
    try:
        read_preamble(fileobj, True)
        _read_file_meta_info(fileobj)
        end = fileobj.tell()
        for _ in data_element_generator(fileobj, implicit, little, defer_size=1):  # values are skipped
            end = fileobj.tell()
    except (EOFError, ValueError, KeyError, struct.error, OSError, InvalidDicomError) as exc:
        raise TagExtractionError(f"not a readable DICOM dataset: {exc}") from exc
    return end


def _read_at(fileobj: BinaryIO, pos: int, size: int) -> bytes:
    fileobj.seek(pos)
    return fileobj.read(size)


def _is_zero_padding(tail: bytes) -> bool:
    """Bytes after the last element that are padding, not a cut element header: at least two, all
    zero (no tag in a data set has group 0000, so a cut header never starts with two zero bytes;
    a single byte may be the first of a group like 0x6000 in either byte order)."""
    return len(tail) >= 2 and not tail.strip(b"\0")


def _check_tail(fileobj: BinaryIO, pos: int, total: int, implicit: bool, little: bool) -> None:
    """From the pixel data on (where reading stopped), walk the remaining top-level element headers:
    each length must fit in what is left.

    Before the pixel data, pydicom seeks past the elements it was not asked for, so a truncation
    there shows as a read position beyond the end (the fast reader checks every length itself).
    """
    order = "<" if little else ">"
    while pos < total:
        fileobj.seek(pos)
        head = fileobj.read(12)
        if len(head) < 8:
            if _is_zero_padding(head):
                return
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


# ---------------------------------------------------------------- fast header reader
#
# pydicom's dcmread costs ~1.4 ms for a CT header even with specific_tags (file-like reads, a
# generator and a RawDataElement per element). The receiver calls extract_tags for every image, so
# the common case -- a Part 10 file (preamble, file meta) in implicit or explicit VR little endian --
# is walked here directly on the bytes: element headers only, values sliced for the wanted tags.
# Everything else (big endian, deflate, no preamble, an unexpected VR, an undefined-length value
# that is not a sequence, anything truncated or odd) raises _Unusual and pydicom reads the data as
# before, so errors and odd cases keep pydicom's behaviour. The wanted elements are then converted
# by the same code (_element_text on a pydicom Dataset), so values are identical by construction;
# tests/test_dicomtags.py compares both readers on every pydicom test file.


class _Unusual(Exception):
    """The fast reader met something it leaves to pydicom."""


_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_VALID_VRS = frozenset(vr.encode() for vr in STANDARD_VR)
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)
# Raw explicit VR -> its name, for the VRs with a 2-byte length and those with a 4-byte one.
_SHORT_HEADER_VRS = {vr: vr.decode() for vr in _VALID_VRS - _LONG_VRS}
_LONG_HEADER_VR_NAMES = {vr: vr.decode() for vr in _VALID_VRS & _LONG_VRS}
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # where pydicom's stop_before_pixels stops
_UNDEFINED = 0xFFFFFFFF
_new_tuple = tuple.__new__
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_NOT_FAST_SYNTAXES = {ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}


def _element_header(data: Data, pos: int, total: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at `pos`."""
    if implicit:
        group, element, length = _IMPLICIT.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    group, element, raw_vr, length = _EXPLICIT.unpack_from(data, pos)
    if raw_vr not in _VALID_VRS:
        raise _Unusual("unknown VR")
    if raw_vr in _LONG_VRS:
        if pos + 12 > total:
            raise _Unusual("short header")
        return group << 16 | element, raw_vr.decode(), _U32.unpack_from(data, pos + 8)[0], pos + 12
    return group << 16 | element, raw_vr.decode(), length, pos + 8


def element_end(data: Data, pos: int, implicit: bool) -> int | None:
    """Where the element at `pos` ends, or None if that cannot be told from its header here (cut
    short, an unknown VR, an undefined length, a value past the end of `data`). `implicit`: an
    element without a VR is read as Implicit VR; one with a VR as explicit all the same."""
    total = len(data)
    if pos + 8 > total:
        return None
    try:
        _, _, length, value_at = _element_header(data, pos, total, implicit and _looks_implicit(data, pos))
    except _Unusual:
        return None
    if length == _UNDEFINED or value_at + length > total:
        return None
    return value_at + length


def _looks_implicit(data: Data, pos: int) -> bool:
    """pydicom's test (filereader._is_implicit_vr): a VR is two upper-case ASCII letters."""
    return not (0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B)


def _is_sequence(data: Data, start: int, tag: int, vr: str | None) -> bool:
    """An undefined-length element is a sequence to skip the way pydicom decides it is one."""
    if vr is not None:
        return vr in ("SQ", "UN")
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return bool(data[start:start + 4] == b"\xfe\xff\x00\xe0")  # private: is an item next?


def _skip_sequence(data: Data, pos: int, total: int, implicit: bool) -> int:
    """Offset after the sequence delimiter of the undefined-length sequence whose value starts at `pos`."""
    while True:
        if pos + 8 > total:
            raise _Unusual("sequence runs past the end")
        group, element, length = _IMPLICIT.unpack_from(data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _Unusual("not an item in a sequence")
        if length != _UNDEFINED:
            pos += length
            continue
        # Items of a sequence in an explicit VR dataset may be implicit VR (PS3.5 6.2.2, as pydicom reads them).
        item_implicit = implicit or (pos + 6 <= total and _looks_implicit(data, pos))
        pos = _skip_item(data, pos, total, item_implicit)


def _skip_item(data: Data, pos: int, total: int, implicit: bool) -> int:
    """Offset after the item delimiter of the undefined-length item whose elements start at `pos`."""
    while True:
        if pos + 8 > total:
            raise _Unusual("item runs past the end")
        group, element = struct.unpack_from("<HH", data, pos)
        if group == 0xFFFE:
            if element == 0xE00D:
                return pos + 8
            raise _Unusual("unexpected delimiter in an item")
        tag, vr, length, start = _element_header(data, pos, total, implicit)
        if length == _UNDEFINED:
            if not _is_sequence(data, start, tag, vr):
                raise _Unusual("undefined-length value that is not a sequence")
            pos = _skip_sequence(data, start, total, implicit)
        else:
            pos = start + length


def _read_file_meta(data: Data, total: int) -> tuple[str, int]:
    """(transfer syntax UID, offset of the dataset) of a Part 10 file; explicit VR LE by definition."""
    if total < 132 or data[128:132] != b"DICM":
        raise _Unusual("no preamble")
    pos, transfer_syntax = 132, None
    while pos + 8 <= total and data[pos:pos + 2] == b"\x02\x00":
        tag, _vr, length, start = _element_header(data, pos, total, implicit=False)
        if length == _UNDEFINED or start + length > total:
            raise _Unusual("odd file meta")
        if tag == 0x00020010:
            transfer_syntax = data[start:start + length].decode("ascii").rstrip("\0 ")
        pos = start + length
    if not transfer_syntax or "\\" in transfer_syntax or pos + 8 > total:
        raise _Unusual("no transfer syntax or no dataset")
    return transfer_syntax, pos


def _fast_read(data: Data, wanted: _Wanted) -> tuple[Dataset, str]:
    """The wanted elements of a little endian Part 10 file, as pydicom's reader would give them."""
    total = len(data)
    transfer_syntax, pos = _read_file_meta(data, total)
    if transfer_syntax in _NOT_FAST_SYNTAXES or transfer_syntax in PrivateTransferSyntaxes:
        raise _Unusual("transfer syntax left to pydicom")
    implicit = transfer_syntax == ImplicitVRLittleEndian
    if data[pos:pos + 2] == b"\x00\x00" or _looks_implicit(data, pos) != implicit:
        raise _Unusual("command elements or a VR encoding other than the transfer syntax says")
    found: dict[BaseTag, DataElement | RawDataElement] = {}
    numbers, tags_by_number = wanted.numbers, wanted.by_number
    # The element loop is written out (no helper call per element): a CT header has ~250 elements.
    # VR names come from dicts of interned strings (no bytes.decode per element).
    unpack = _IMPLICIT.unpack_from if implicit else _EXPLICIT.unpack_from
    u32 = _U32.unpack_from
    vr: str | None = None
    # Checks are ordered for the common element: a value running past the end ends the loop, so
    # that is checked once, after it.
    while pos < total:
        if total - pos < 8:
            if _is_zero_padding(data[pos:total]):
                pos = total
                break
            raise _Unusual("a cut element header")  # pydicom's path reports it, in its words
        if implicit:
            group, element, length = unpack(data, pos)
            start = pos + 8
        else:
            group, element, raw_vr, length = unpack(data, pos)
            vr = _SHORT_HEADER_VRS.get(raw_vr)
            if vr is not None:
                start = pos + 8
            else:
                vr = _LONG_HEADER_VR_NAMES.get(raw_vr)
                if vr is None:
                    raise _Unusual("unknown VR")
                if pos + 12 > total:
                    raise _Unusual("short header")
                length, start = u32(data, pos + 8)[0], pos + 12
        tag = group << 16 | element
        if group >= 0x7FE0:  # pixel data and the delimiters are the only tags from here on we act on
            if tag in _PIXEL_TAGS:
                break
            if group == 0xFFFE:
                raise _Unusual("delimiter at the top level")
        if length == _UNDEFINED:
            if not _is_sequence(data, start, tag, vr):
                raise _Unusual("undefined-length value that is not a sequence")
            pos = _skip_sequence(data, start, total, implicit)
            continue  # a sequence is never a rule value
        pos = start + length
        if tag in numbers:
            value = data[start:pos] if length else _empty_raw(vr)
            # Keyed by the caller's own BaseTag object: dict lookups then match by identity instead
            # of calling BaseTag.__eq__ (Python code) for each of the ~50 wanted tags.
            key = tags_by_number[tag]
            # (tuple.__new__: what the named tuple's own constructor, a Python lambda, calls.)
            found[key] = _new_tuple(RawDataElement, (key, vr, length, value, start, implicit, True, True, False))
    if pos > total:
        raise _Unusual("value runs past the end")
    if not found:
        raise _Unusual("none of the wanted elements")
    if pos < total:
        _check_tail(io.BytesIO(data) if isinstance(data, bytes) else _readable(data), pos, total, implicit, True)
    ds = Dataset(found)
    # As pydicom's reader: text values are decoded with the dataset's original character set.
    charset = found.get(tags_by_number[0x00080005]) if 0x00080005 in tags_by_number else None
    assert charset is None or isinstance(charset, RawDataElement)  # the loop keeps raw elements only
    ds.set_original_encoding(implicit, True, _character_set(charset))
    return ds, transfer_syntax


_EMPTY_RAW: dict[tuple[str | None, bool], Any] = {}


def _empty_raw(vr: str | None) -> Any:
    """pydicom's raw value for an empty element of `vr`, memoised: `empty_value_for_VR` builds a set
    difference on every call, and a header has several empty elements."""
    key = (vr, bool(pydicom_config.use_none_as_empty_text_VR_value))
    value = _EMPTY_RAW.get(key, _EMPTY_RAW)
    if value is _EMPTY_RAW:
        value = _EMPTY_RAW[key] = empty_value_for_VR(vr, raw=True)
    return value


def _character_set(raw: RawDataElement | None) -> list[str]:
    """pydicom's reading of a raw Specific Character Set element, memoised by its value.

    (Read from a copy: the caller's dataset keeps the raw element, which _cached_text uses as a key.)
    Every image of a series has the same value; building a pydicom Dataset to read it was a tenth of
    the fast reader's time.
    """
    key = (raw.VR, raw.value, raw.is_implicit_VR) if raw is not None else None
    hit = _CHARSET_MEMO.get(key)
    if hit is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hit = tuple(Dataset({raw.tag: raw} if raw is not None else {})._character_set)
        except Exception as exc:  # noqa: BLE001 - pydicom decides what an unusable charset element means
            raise _Unusual("character set") from exc
        # Bounded like _TEXT_MEMO, in entries and in the size of a key (a sender controls the value).
        if raw is None or raw.value is None or len(raw.value) <= 256:
            if len(_CHARSET_MEMO) >= _TEXT_MEMO_SIZE:
                _CHARSET_MEMO.clear()
            _CHARSET_MEMO[key] = hit
    return list(hit)


# (VR, raw value, implicit) of a raw Specific Character Set element, or None -> its encodings.
_CHARSET_MEMO: dict[tuple[str | None, bytes | None, bool] | None, tuple[str, ...]] = {}


def _cached_text(ds: Dataset, tag: BaseTag, charset: Any, notes: list[str]) -> str | None:
    """_element_text, memoised for short text values read by the fast reader.

    Decoding text through pydicom (charset, validation warnings) is the costly part of a header,
    and most text values repeat for every image of a series. The result depends only on the raw
    element and the character set element, which form the key (without their file offsets).
    """
    raw = ds._dict.get(tag)
    if raw is None:
        return None  # as _element_text: absent (a third of the configured tags, typically)
    if not isinstance(raw, RawDataElement) or raw.value is None or len(raw.value) > 256:
        return _element_text(ds, tag, notes)
    vr = raw.VR if raw.VR and raw.VR != "UN" else dictionary_vr(tag)
    if vr not in TEXT_VRS:
        # As _element_text for a raw element of the fast reader (always little endian, never cut short).
        return None if vr in BINARY_VRS else _raw_text(raw, vr, True)
    if charset is not None and not isinstance(charset, RawDataElement):
        return _element_text(ds, tag, notes)  # already converted: not a key
    key = (int(tag), vr, raw.value, raw.is_implicit_VR, charset.value if charset is not None else None)
    hit = _TEXT_MEMO.get(key)
    if hit is None:
        hit = _convert_text(raw, charset)
        if len(_TEXT_MEMO) >= _TEXT_MEMO_SIZE:
            _TEXT_MEMO.clear()  # bounded; refills with the current series' values
        _TEXT_MEMO[key] = hit
    text, new_notes = hit
    notes.extend(new_notes)
    return text


# (tag, VR, raw value, implicit, raw character set) -> (text, notes): a plain dict keyed by
# plain values, because an lru_cache on _convert_text (namedtuple._replace, hashing whole elements
# for its key) cost as much as the lookup saved.
_TEXT_MEMO: dict[tuple[int, str, bytes, bool, bytes | None], tuple[str | None, tuple[str, ...]]] = {}
_TEXT_MEMO_SIZE = 4096


def _convert_text(raw: RawDataElement, charset: RawDataElement | None) -> tuple[str | None, tuple[str, ...]]:
    elements: dict[BaseTag, DataElement | RawDataElement] = {raw.tag: raw}
    if charset is not None:
        elements[charset.tag] = charset
    ds = Dataset(elements)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.set_original_encoding(raw.is_implicit_VR, True, ds._character_set)
    notes: list[str] = []
    text = _element_text(ds, raw.tag, notes)
    return text, tuple(notes)


class _MappedReader:
    """A memory-mapped file read as a file object, without copying it: seekable past its end like
    a file or a BytesIO (an mmap's own seek refuses that), which is how pydicom's reader and
    _check_complete tell an element that runs past the end."""

    def __init__(self, view: mmap.mmap) -> None:
        self.view = view
        self.pos = 0

    def read(self, size: int | None = -1) -> bytes:
        end = len(self.view) if size is None or size < 0 else self.pos + size
        data = self.view[self.pos:end]
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def _readable(data: Data) -> BinaryIO:
    return cast(BinaryIO, _MappedReader(data)) if isinstance(data, mmap.mmap) else io.BytesIO(data)


def _read_with_pydicom(fileobj: BinaryIO, total: int, wanted: _Wanted) -> tuple[Dataset, str]:
    ds = _read_checked(fileobj, total, list(wanted.names))
    meta = getattr(ds, "file_meta", None)
    return ds, str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""


def extract_tags(source: bytes | bytearray | memoryview | mmap.mmap | str | Path,
                 keywords: Iterable[str] = (), *, fast: bool = True) -> ExtractedTags:
    """Read `keywords` (plus the identity UIDs) from a DICOM instance; see the module docstring.

    `fast=False` reads with pydicom only (the reference the fast reader is tested against). A
    memory-mapped file (the receiver's spooled instances) is read in place, never copied.
    """
    wanted = _wanted_tags(keywords)
    fast_read = False
    if isinstance(source, str | Path):
        with open(source, "rb") as handle:
            ds, transfer_syntax = _read_with_pydicom(handle, os.fstat(handle.fileno()).st_size, wanted)
    else:
        data = source if isinstance(source, bytes) or isinstance(source, mmap.mmap) else bytes(source)  # noqa: SIM101
        try:
            if not fast:
                raise _Unusual("pydicom requested")
            ds, transfer_syntax = _fast_read(data, wanted)
            fast_read = True
        except (_Unusual, struct.error, UnicodeDecodeError, IndexError):
            ds, transfer_syntax = _read_with_pydicom(_readable(data), len(data), wanted)
    notes: list[str] = []
    tags: dict[str, str] = {}
    charset = ds._dict.get(BaseTag(0x00080005)) if fast_read else None
    for tag, name in wanted.names.items():
        try:
            text = _cached_text(ds, tag, charset, notes) if fast_read else _element_text(ds, tag, notes)
        except TagExtractionError:
            raise
        except Exception as exc:  # noqa: BLE001 - one malformed value must not hide the others
            notes.append(f"{name}: unreadable value ({exc})")
            continue
        if text is not None:
            tags[name] = text
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

