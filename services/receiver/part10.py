"""Part 10 framing of a received dataset without pydicom: preamble, 'DICM', File Meta group.

pynetdicom's `Event.encoded_dataset(include_meta=True)` builds the File Meta with pydicom
(a FileMetaDataset, validated and written element by element): ~0.35 ms per image, for six short
elements. This writes the same bytes directly; tests/test_part10.py checks them against
pynetdicom's for many UIDs. Values that are not plain ASCII UIDs go back to pynetdicom.
"""

from __future__ import annotations

import struct
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

PREAMBLE = b"\x00" * 128 + b"DICM"
_UID_CHARS = frozenset("0123456789.")


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def plain_uid(value: str) -> bool:
    """Digits and dots, 1-64 characters: what file_meta() writes itself."""
    return bool(value) and len(value) <= 64 and _UID_CHARS.issuperset(value)


def _uid(value: str) -> bytes:
    if not plain_uid(value):
        raise ValueError(f"not a plain UID: {value!r}")
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _short_string(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


_TAIL = (_element(0x0012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID)))
         + _element(0x0013, b"SH", _short_string(PYNETDICOM_IMPLEMENTATION_VERSION)))


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """The File Meta group exactly as pynetdicom's create_file_meta + encode_file_meta write it."""
    body = b"".join((
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _uid(sop_class_uid)),
        _element(0x0003, b"UI", _uid(sop_instance_uid)),
        _element(0x0010, b"UI", _uid(transfer_syntax_uid)),
        _TAIL,
    ))
    return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def encoded_dataset(event: Any) -> bytes:
    """`event.encoded_dataset(include_meta=True)` for a C-STORE request, without pydicom."""
    request = event.request
    try:
        meta = file_meta(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                         str(event.context.transfer_syntax))
    except (ValueError, UnicodeError):
        return bytes(event.encoded_dataset(include_meta=True))
    return b"".join((PREAMBLE, meta, request.DataSet.getbuffer()))
