"""C-STORE requests written straight to an association's socket (with `fastpath` installed).

Why (profiled, docs/performance.md "Dispatch hop"): with the polling loops gone, most of the
dispatcher's CPU per image went to pynetdicom's generic DIMSE path: reading the file meta with
pydicom, building and encoding the command set with pydicom (twice, for its group length),
and one P-DATA primitive object, queue item and thread hand-over per PDU. A C-STORE request
is a fixed command set plus the file's bytes after its meta header, so it is written here:

- the file meta is read with a small explicit-VR-LE walker (pynetdicom's `split_dataset` for
  anything it does not understand, e.g. a file without preamble);
- the command set is encoded directly (implicit VR little endian, PS3.7 9.3.1.1);
- the data set goes out as stored, in P-DATA-TF PDUs no larger than the peer's maximum, read
  from the file in blocks of several PDUs and written with one call per block (re-encoded by
  `reencode` only for a peer that refused the file's own transfer syntax).

Negotiation, the response (decoded by pynetdicom's DUL/DIMSE threads), release and abort stay
pynetdicom's. Message ids count up per association, and a response must answer the request.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom.uid import UID
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset

from . import fastpath, reencode

log = logging.getLogger(__name__)

BLOCK_BYTES = 1 << 20  # file bytes read (and PDUs written) per call
UNLIMITED_FRAGMENT = 1 << 20  # largest fragment per PDU (the peer's maximum may be 0 = none, or huge)
PRIORITY_MEDIUM = 0x0000
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_META_READ = 8 * 1024  # enough for a usual file meta (~200-400 bytes); longer ones go to split_dataset


@dataclass(frozen=True)
class FileMeta:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    offset: int  # where the data set starts


class _Readable(Protocol):
    def read(self, count: int, /) -> bytes: ...


class NotSent(Exception):
    """The association ended before the request went out: try the instance on a fresh one."""


def read_file_meta(path: Path) -> FileMeta:
    with open(path, "rb") as file:
        return _file_meta(file, path)


def _file_meta(file: BinaryIO, path: Path) -> FileMeta:
    file.seek(0)
    meta = _walk_file_meta(file.read(_META_READ))
    if meta is not None:
        return meta
    dataset, offset = split_dataset(path)  # no preamble, odd lengths, a very long meta: pydicom decides
    missing = [kw for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if kw not in dataset]
    if missing:
        raise AttributeError(f"{path}: file meta lacks {', '.join(missing)}")
    return FileMeta(str(dataset.MediaStorageSOPClassUID), str(dataset.MediaStorageSOPInstanceUID),
                    str(dataset.TransferSyntaxUID), offset)


def _walk_file_meta(head: bytes) -> FileMeta | None:
    """Group 0002 of a Part 10 file (explicit VR LE); None if this is not the plain case."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    values: dict[int, str] = {}
    pos = 132
    while True:
        if pos + 8 > len(head):
            return None  # the meta may go on past what was read
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            length = struct.unpack_from("<I", head, pos + 8)[0]
            pos += 12
        else:
            if not vr.isalpha() or not vr.isupper():
                return None
            length = struct.unpack_from("<H", head, pos + 6)[0]
            pos += 8
        if pos + length > len(head):
            return None
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = head[pos:pos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    if len(values) != 3:
        return None
    return FileMeta(values[0x0002], values[0x0003], values[0x0010], pos)


def _element(tag_element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, tag_element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def encode_c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str,
                      priority: int = PRIORITY_MEDIUM) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1), implicit VR little endian, group length first."""
    body = b"".join((
        _element(0x0002, _uid(sop_class_uid)),        # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", 0x0001)),  # Command Field: C-STORE-RQ
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", priority)),
        _element(0x0800, struct.pack("<H", 0x0001)),  # Command Data Set Type: a data set follows
        _element(0x1000, _uid(sop_instance_uid)),     # Affected SOP Instance UID
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _pdu_header(context_id: int, control: int, fragment: bytes | memoryview) -> bytes:
    """A P-DATA-TF PDU with one PDV item: PDU header, item length, context id, control header."""
    return struct.pack(">BBIIBB", 0x04, 0x00, len(fragment) + 6, len(fragment) + 2, context_id, control)


def _fragment_size(assoc: Any) -> int:
    """Bytes of message per PDU: within the peer's maximum PDV list length (PDV item header: 6
    bytes), and never above UNLIMITED_FRAGMENT, which bounds what is read into memory at once."""
    maximum = int(assoc.acceptor.maximum_length or 0)
    if not maximum:
        return UNLIMITED_FRAGMENT
    if maximum <= 6:
        raise ValueError(f"peer's maximum PDU length {maximum} leaves no room for data")
    return min(maximum - 6, UNLIMITED_FRAGMENT)


def _write_command(assoc: Any, context_id: int, command: bytes, fragment: int) -> None:
    out = bytearray()
    for start in range(0, len(command), fragment):
        piece = command[start:start + fragment]
        last = start + fragment >= len(command)
        out += _pdu_header(context_id, 0x03 if last else 0x01, piece) + piece
    assoc.caduceus_write(out)


def _write_data_set(assoc: Any, context_id: int, data: _Readable, size: int, name: str, fragment: int) -> None:
    per_block = max(1, BLOCK_BYTES // fragment) * fragment
    if size <= 0:
        assoc.caduceus_write(_pdu_header(context_id, 0x02, b""))
        return
    remaining = size
    while remaining > 0:
        block = data.read(min(per_block, remaining))
        if not block:
            raise OSError(f"{name} ended {remaining} bytes early")
        remaining -= len(block)
        parts: list[bytes | memoryview] = []
        with memoryview(block) as view:
            for start in range(0, len(block), fragment):
                piece = view[start:start + fragment]
                last = remaining == 0 and start + fragment >= len(block)
                parts.append(_pdu_header(context_id, 0x02 if last else 0x00, piece))
                parts.append(piece)
            data_out = b"".join(parts)  # one allocation and copy for the whole block
            parts.clear()
        assoc.caduceus_write(data_out)


def _next_message_id(assoc: Any) -> int:
    message_id = getattr(assoc, "caduceus_message_id", 0) % 0xFFFF + 1
    assoc.caduceus_message_id = message_id
    return message_id


@dataclass(frozen=True)
class Stored:
    status: int | None  # None: no response came
    reencoded: bool  # sent as Implicit VR Little Endian instead of the file's own syntax
    comment: str = ""  # the response's Error Comment (0000,0902), if the peer sent one


def send_c_store(assoc: Any, path: Path) -> Stored:
    """Send one file as a C-STORE request and wait for the response.

    The file goes out as stored if the peer accepted its SOP class in its transfer syntax, else
    re-encoded as Implicit VR Little Endian if `reencode` converts its syntax and the peer accepted
    that. Raises ValueError when no accepted presentation context fits the file, ReencodeError when
    the re-encoding failed (nothing was sent in both cases), NotSent when the association is no longer
    in data transfer, OSError/AttributeError for a file that cannot be read before anything went
    out; a failure after the first PDU aborts the association (the peer holds half a message) and
    re-raises.
    """
    with open(path, "rb") as file:
        meta = _file_meta(file, path)
        context, reencoded = _context_for(assoc, meta)
        with ExitStack() as stack:
            data: _Readable = file
            if reencoded:
                stream = stack.enter_context(reencode.implicit_data_set(path, meta.transfer_syntax_uid))
                data, size = stream, stream.size
            else:
                file.seek(meta.offset)
                size = os.fstat(file.fileno()).st_size - meta.offset
            message_id = _send_request(assoc, context.context_id, meta, data, size, path.name)
    response = _response(assoc)
    status = _status(assoc, response, message_id)
    return Stored(status, reencoded, str(response.ErrorComment or "") if status is not None else "")


def _context_for(assoc: Any, meta: FileMeta) -> tuple[Any, bool]:
    """The accepted context for the file as it is, else for its re-encoded form (True)."""
    accepted = _accepted_contexts(assoc)
    context = accepted.get((meta.sop_class_uid, meta.transfer_syntax_uid))
    if context is not None:
        return context, False
    fallback = reencode.fallback_syntax(meta.transfer_syntax_uid)
    context = accepted.get((meta.sop_class_uid, fallback)) if fallback else None
    if context is not None:
        return context, True
    # pynetdicom's lookup is not used for the search: it logs an error for every miss.
    message = (f"No presentation context for '{UID(meta.sop_class_uid).name}' has been accepted by the peer "
               f"with '{UID(meta.transfer_syntax_uid).name}' transfer syntax")
    raise ValueError(message + (f" nor with '{UID(fallback).name}'" if fallback else ""))


def _accepted_contexts(assoc: Any) -> dict[tuple[str, str], Any]:
    """(SOP class, transfer syntax) -> accepted context for sending, once per association."""
    accepted = getattr(assoc, "caduceus_accepted_contexts", None)
    if accepted is None:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx
                    for cx in assoc.accepted_contexts if cx.as_scu}
        assoc.caduceus_accepted_contexts = accepted
    return accepted


def _send_request(assoc: Any, context_id: int, meta: FileMeta, data: _Readable, size: int, name: str) -> int:
    """Write the C-STORE-RQ and its data set; returns the request's message id."""
    if not assoc.is_established or assoc.dul.state_machine.current_state != "Sta6":
        raise NotSent()
    message_id = _next_message_id(assoc)
    command = encode_c_store_rq(message_id, meta.sop_class_uid, meta.sop_instance_uid)
    fragment = _fragment_size(assoc)
    try:
        _write_command(assoc, context_id, command, fragment)
        _write_data_set(assoc, context_id, data, size, name, fragment)
    except Exception:
        assoc.abort()
        raise
    return message_id


def _response(assoc: Any) -> Any:
    """The next DIMSE message, None after the DIMSE timeout (or once the association ended).

    The DIMSE timeout is for a peer that has the request and does not answer: while the end of
    the request is still draining from the socket's send buffer over a slow link (the peer
    acknowledged bytes during the wait), the wait starts again (fastpath's network timeout does
    the same)."""
    while True:
        before = fastpath.acknowledged_bytes(assoc)
        waited = time.monotonic()
        _, response = assoc.dimse.get_msg(block=True)
        # (None also comes at once as the marker of an abort or a closed connection)
        timed_out = assoc.dimse_timeout is not None and time.monotonic() - waited >= assoc.dimse_timeout
        if response is not None or not timed_out or before is None or not assoc.is_established:
            return response
        now = fastpath.acknowledged_bytes(assoc)
        if now is None or now <= before:
            return None
        log.info("no C-STORE response within %g s, but the peer is still taking the request "
                 "(%d bytes acknowledged meanwhile); waiting on", assoc.dimse_timeout, now - before)


def _status(assoc: Any, response: Any, message_id: int) -> int | None:
    if response is None:
        # pynetdicom's reaction: an abort or a closed connection is already known; else a timeout.
        if assoc.is_established and not assoc.acse.is_aborted():
            log.error("no C-STORE response within the DIMSE timeout; aborting the association")
            aborted_because(assoc, f"no C-STORE response within {assoc.dimse_timeout:g} s")
        return None
    if not isinstance(response, C_STORE) or response.MessageIDBeingRespondedTo != message_id \
            or response.Status is None:
        # Out of step with the peer: nothing later on this association can be trusted.
        log.error("unexpected DIMSE message instead of the C-STORE response to message %d: %s",
                  message_id, type(response).__name__)
        aborted_because(assoc, f"the peer answered {type(response).__name__} instead of the C-STORE response")
        return None
    return int(response.Status)


def aborted_because(assoc: Any, reason: str) -> None:
    """Abort from our side, noting why: the task's error must not blame the peer for our abort."""
    assoc.caduceus_aborted_because = reason
    assoc.abort()
