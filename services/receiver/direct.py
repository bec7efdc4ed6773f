"""The direct C-STORE path: P-DATA PDUs become stored instances on the DUL thread.

Why: with pynetdicom's own path every received image crosses three threads and is copied four
times before the handler sees it: the DUL thread decodes the P-DATA-TF PDU into PDV objects (a copy
per fragment), hands them to DIMSE, which joins them into a BytesIO (a copy), decodes the command
set with pydicom, validates it into a C_STORE primitive and queues it for the association thread;
that thread builds an Event, the handler copies the data set into Part 10 bytes, and the response
goes back through a queue to the DUL thread. With one C-STORE in flight per association (no
asynchronous operations are negotiated) all of that is on the sender's critical path.

Here the DUL thread reads a P-DATA-TF PDU itself while the association is established (Sta6, where
pynetdicom's own action, DT-2, only passes the PDU to DIMSE and stays in Sta6), splits it into PDVs
without copying, decodes the command set of a C-STORE-RQ (implicit VR little endian, a handful of
elements), collects the data set fragments, calls the store callback, and writes the C-STORE-RSP
straight onto the socket, all on that one thread. The sender is waiting for the response, so
nothing else can arrive on this association meanwhile.

Anything that is not a plain C-STORE-RQ on an accepted presentation context (C-ECHO, another
message, a command this decoder cannot read, fragments out of order, UIDs that are not plain) is
handed to pynetdicom unchanged, PDV by PDV, from the start of that message, so pynetdicom's
behaviour (including its protocol errors and aborts) is kept for everything else. Every PDU other
than P-DATA-TF, and P-DATA-TF in any other state, takes pynetdicom's own route.

Large data sets (services/receiver/spool.py): from FIRST_WATCH on, a data set claims its share of
the process's memory budget as it grows (`LargeData.in_memory_until`, once per MB); once it passes
the spool threshold or the maximum instance size, or the budget is taken, `LargeData.outgrown`
takes over what was collected and gets every later fragment as it arrives (a spool file, or
nowhere once refused); the store callback then receives that sink instead of the fragments. A P-DATA-TF PDU longer than
STREAMED_PDU is read in pieces, so that an instance sent in one PDU is never held whole either.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pynetdicom import evt
from pynetdicom.pdu_primitives import P_DATA

from services.receiver import part10

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
# The largest PDU read outside data transfer (A-ASSOCIATE-RQ, A-RELEASE, A-ABORT, and P-DATA-TF
# before an association exists). pynetdicom reads such a PDU whole and copies it twice while
# decoding: a 200 MB A-ASSOCIATE-RQ from an unknown peer cost 600 MB of RSS, a P-DATA-TF before
# association 880 MB (kept). A real A-ASSOCIATE-RQ is a few KB: 128 contexts with several transfer
# syntaxes each and a 64 KB user identity stay well under this.
MAX_CONTROL_PDU = 1 << 20
# P-DATA-TF PDUs longer than this are read and passed on in pieces of STREAM_PIECE (_read_streamed).
# Senders use PDUs of 16-128 KB (DCMTK, dcm4che) up to a few MB; all of these are read whole.
STREAMED_PDU = 4 << 20
STREAM_PIECE = 1 << 20
NEVER = 1 << 62
# A data set is first measured against LargeData (its size limits and the memory budget, whose
# lock it takes) when it reaches this size (the smallest spool threshold and maximum): CT and MR
# never do, and never pay for the question.
FIRST_WATCH = 1 << 20
C_STORE_RQ = 0x0001
NO_DATA_SET = 0x0101
# Handlers bound to these would expect to see every PDU/message pass through pynetdicom.
OBSERVER_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_DATA_RECV, evt.EVT_DIMSE_RECV, evt.EVT_PDU_SENT,
                   evt.EVT_DATA_SENT, evt.EVT_DIMSE_SENT)


@dataclass(frozen=True)
class StoreRequest:
    """The C-STORE-RQ command elements the store callback needs."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    context_id: int
    transfer_syntax_uid: str


class Sink(Protocol):
    """Where the rest of a data set goes once it outgrew memory (a spool.Spool)."""

    def write(self, fragment: memoryview) -> None: ...
    def discard(self) -> None: ...


class Claim(Protocol):
    """A data set's share of the process's memory budget (a spool.Claim)."""

    def release(self) -> None: ...


class LargeData(Protocol):
    """What the direct path asks about a growing data set (StorageSCP, services/receiver/spool.py)."""

    def claim(self, assoc: Any) -> Claim: ...
    def in_memory_until(self, claim: Claim, size: int) -> int: ...
    def outgrown(self, assoc: Any, request: StoreRequest, fragments: list[memoryview], size: int) -> Sink: ...


# The store callback: (association, request, data set fragments, or the sink of a data set that
# outgrew memory) -> (DIMSE status, error comment or "").
StoreCallback = Callable[[Any, StoreRequest, "list[memoryview] | Sink"], tuple[int, str]]
# Decides, once the command is known, whether the callback takes the message (else pynetdicom).
AcceptCallback = Callable[[Any, StoreRequest], bool]


class CommandError(ValueError):
    pass


def decode_command(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Element number -> raw value of a group 0000 command set (implicit VR little endian)."""
    view = memoryview(data)
    elements: dict[int, bytes] = {}
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise CommandError("truncated command element header")
        group, element, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        if group != 0x0000 or length > end - offset:
            raise CommandError(f"unexpected element ({group:04X},{element:04X}) of length {length}")
        elements[element] = bytes(view[offset:offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    raw = elements.get(element)
    if raw is None or len(raw) != 2:
        return None
    return int(struct.unpack("<H", raw)[0])


def _uid(elements: dict[int, bytes], element: int) -> str:
    raw = elements.get(element, b"").rstrip(b"\x00 ")
    text = raw.decode("ascii", "strict")
    if not part10.plain_uid(text):  # the UIDs the File Meta writer accepts
        raise CommandError(f"not a plain UID in (0000,{element:04X}): {text!r}")
    return text


def store_request(elements: dict[int, bytes], context_id: int, transfer_syntax_uid: str) -> StoreRequest | None:
    """The C-STORE-RQ in a decoded command set, or None when it is anything else."""
    if _us(elements, 0x0100) != C_STORE_RQ:
        return None
    message_id = _us(elements, 0x0110)
    data_set_type = _us(elements, 0x0800)
    if message_id is None or data_set_type is None or data_set_type == NO_DATA_SET:
        return None
    try:
        return StoreRequest(message_id, _uid(elements, 0x0002), _uid(elements, 0x1000), context_id,
                            transfer_syntax_uid)
    except (CommandError, UnicodeError):
        return None


def _ui(element: int, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def error_comment_text(comment: str) -> str:
    """An Error Comment value: LO, at most 64 characters of the default repertoire, no backslash."""
    text = comment.encode("ascii", "replace").decode("ascii").replace("\\", "/")
    return " ".join(text.split())[:64].strip()


def _error_comment(comment: str) -> bytes:
    if not comment:
        return b""
    raw = error_comment_text(comment).encode("ascii")
    raw += b" " * (len(raw) % 2)
    return struct.pack("<HHI", 0x0000, 0x0902, len(raw)) + raw


def _us_element(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def store_response(sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int,
                   error_comment: str = "") -> bytes:
    """The C-STORE-RSP command set (implicit VR LE), byte for byte as pynetdicom encodes it; an
    Error Comment (0000,0902) tells the sender why a failure status was given."""
    body = b"".join((_ui(0x0002, sop_class_uid), _us_element(0x0100, 0x8001),
                     _us_element(0x0120, message_id), _us_element(0x0800, NO_DATA_SET),
                     _us_element(0x0900, status), _error_comment(error_comment), _ui(0x1000, sop_instance_uid)))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying `command` as a single, last command fragment."""
    item_length = 2 + len(command)
    return struct.pack(">BBIIBB", P_DATA_TF, 0, 4 + item_length, item_length, context_id, 0x03) + command


@dataclass
class _Message:
    """The message being assembled: its PDVs (for a hand-over) and, once known, its request."""

    pdvs: list[tuple[int, memoryview]] = field(default_factory=list)
    command: list[memoryview] = field(default_factory=list)
    command_done: bool = False
    request: StoreRequest | None = None
    data: list[memoryview] = field(default_factory=list)
    size: int = 0  # of `data`
    watch_at: int = FIRST_WATCH  # past this size, _outgrow asks LargeData what to do
    claim: Claim | None = None  # its share of the memory budget, from FIRST_WATCH on
    sink: Sink | None = None  # where the data set goes once it did


class DirectStore:
    """Per-association state of the direct path; `install()` wires it into a DUL."""

    def __init__(self, assoc: Any, accept: AcceptCallback, store: StoreCallback,
                 large: LargeData | None = None) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.accept = accept
        self.store = store
        self.large = large
        self.message: _Message | None = None
        self.passthrough = False  # pynetdicom's DIMSE owns the current message

    # ------------------------------------------------------------ PDU level

    def read_pdu(self) -> None:
        """DULServiceProvider._read_pdu_data, with P-DATA-TF in Sta6 handled here."""
        dul = self.dul
        try:
            header = bytes(dul.socket.recv(6))
        except (OSError, TimeoutError):
            log.error("connection closed before the entire PDU was received")
            dul.event_queue.put("Evt17")
            return
        if len(header) != 6:
            dul.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type != P_DATA_TF or dul.state_machine.current_state != "Sta6":
            self._pynetdicom_pdu(header, pdu_type, length)
            return
        if length > STREAMED_PDU:
            self._read_streamed(length)
            return
        try:
            body = dul.socket.recv(length)
        except (OSError, TimeoutError):
            log.error("connection closed before the entire PDU was received")
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            log.error("the received PDU is shorter than expected (%d of %d bytes)", len(body), length)
            dul.event_queue.put("Evt17")
            return
        pdvs = _split_pdvs(memoryview(body))
        if pdvs is None:
            log.error("unable to decode the received P-DATA-TF PDU")
            dul.event_queue.put("Evt19")  # as pynetdicom: invalid PDU, the state machine aborts
            return
        for context_id, pdv in pdvs:
            self.on_pdv(context_id, pdv)

    def _read_streamed(self, length: int) -> None:
        """A P-DATA-TF PDU longer than STREAMED_PDU, read and passed on in pieces of at most
        STREAM_PIECE: a long PDV becomes several fragments of its kind, only the last with the
        "last fragment" bit it had, as a sender with smaller PDUs would have sent it.

        Why: a sender may put a whole instance into one PDU (pynetdicom's SCU does when the
        receiver offers an unlimited PDU size, caduceus's default `max_pdu`); read whole, it was
        held whole, whatever the spool threshold. Unlike a PDU read whole, PDVs before a malformed
        one are passed on before the association is aborted.
        """
        dul = self.dul
        left = length
        while left > 0:
            header = self._recv_exactly(6) if left >= 6 else b""
            if header is None:
                dul.event_queue.put("Evt17")
                return
            item_length, context_id, control = struct.unpack(">IBB", header) if header else (0, 0, 0)
            value_left = item_length - 2
            if item_length < 2 or value_left > left - 6:  # (also: fewer than 6 bytes left for a header)
                log.error("unable to decode the received P-DATA-TF PDU")
                dul.event_queue.put("Evt19")  # as for a PDU read whole: invalid, the state machine aborts
                return
            left -= 6 + value_left
            while True:
                size = min(value_left, STREAM_PIECE)
                piece = self._recv_exactly(size) if size else b""
                if piece is None:
                    dul.event_queue.put("Evt17")
                    return
                value_left -= size
                flags = control if value_left == 0 else control & ~0x02
                self.on_pdv(context_id, memoryview(bytes((flags,)) + piece))
                dul._idle_timer.restart()  # a peer still sending a long PDU is not idle
                if value_left == 0:
                    break

    def _recv_exactly(self, size: int) -> bytes | bytearray | None:
        """`size` bytes from the peer, or None once the connection is gone."""
        try:
            data = self.dul.socket.recv(size)
        except (OSError, TimeoutError):
            return None
        if len(data) != size:
            log.error("connection closed before the entire PDU was received")
            return None
        return data  # type: ignore[no-any-return]

    def _pynetdicom_pdu(self, header: bytes, pdu_type: int, length: int) -> None:
        """The rest of pynetdicom's _read_pdu_data for a PDU whose header was already read."""
        dul = self.dul
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("unknown PDU type received 0x%02X", pdu_type)
            dul.event_queue.put("Evt19")
            return
        if length > MAX_CONTROL_PDU and not (pdu_type == P_DATA_TF and self.assoc.is_established):
            log.error("PDU of type 0x%02X claiming %d bytes refused (at most %d outside data transfer)",
                      pdu_type, length, MAX_CONTROL_PDU)
            dul.event_queue.put("Evt19")  # invalid PDU: the state machine aborts, the body is never read
            return
        try:
            body = dul.socket.recv(length)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            dul.event_queue.put("Evt17")
            return
        try:
            pdu, event = dul._decode_pdu(bytearray(header) + body)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: invalid PDU
            log.error("unable to decode the received PDU data: %s", exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    # ------------------------------------------------------------ DIMSE level

    def on_pdv(self, context_id: int, pdv: memoryview) -> None:
        """One presentation data value (its first byte is the message control header)."""
        if self.passthrough:
            self._to_pynetdicom(context_id, pdv)
            return
        control = pdv[0]  # _split_pdvs guarantees at least the control header
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        message = self.message or _Message()
        self.message = message
        if message.sink is not None:
            self._to_sink(message, context_id, pdv, is_command, is_last)
            return
        message.pdvs.append((context_id, pdv))
        if message.pdvs[0][0] != context_id:
            self._hand_over()
            return
        if not message.command_done:
            if not is_command:
                self._hand_over()
                return
            message.command.append(pdv[1:])
            if is_last:
                message.command_done = True
                self._command_complete(message, context_id)
            return
        if is_command:  # a command fragment after the command ended: let pynetdicom judge it
            self._hand_over()
            return
        message.data.append(pdv[1:])
        message.size += len(pdv) - 1
        if message.size > message.watch_at:
            self._outgrow(message)
        if is_last:
            self.message = None
            self._serve(message)

    def _outgrow(self, message: _Message) -> None:
        """The data set passed `watch_at`: it claims more of the memory budget and is watched again
        further on (`LargeData.in_memory_until`), or, past its size limit or the budget,
        `LargeData.outgrown` takes what was collected, and from now on every fragment as it arrives."""
        large = self.large
        if large is None:
            message.watch_at = NEVER
            return
        if message.claim is None:
            message.claim = large.claim(self.assoc)
        until = large.in_memory_until(message.claim, message.size)
        if until:
            message.watch_at = until
            return
        assert message.request is not None
        message.sink = large.outgrown(self.assoc, message.request, message.data, message.size)
        message.data, message.pdvs = [], []
        message.claim.release()

    def _to_sink(self, message: _Message, context_id: int, pdv: memoryview, is_command: bool,
                 is_last: bool) -> None:
        """A PDV of a data set that outgrew memory. What would otherwise go to pynetdicom (a
        fragment on another context, a command fragment) cannot: the start of the message is no
        longer held. Such a peer is broken or hostile, and the association is aborted."""
        sink, request = message.sink, message.request
        assert sink is not None and request is not None
        if is_command or context_id != request.context_id:
            log.error("%s inside a large data set: aborting the association",
                      "a command fragment" if is_command else f"a fragment on context {context_id}",
                      extra={"sop_uid": request.sop_instance_uid})
            sink.discard()
            self.message = None
            self.dul.event_queue.put("Evt19")
            return
        sink.write(pdv[1:])
        if is_last:
            self.message = None
            self._serve(message)

    def _command_complete(self, message: _Message, context_id: int) -> None:
        assoc = self.assoc
        context = assoc._accepted_cx.get(context_id)
        request = None
        if context is not None and assoc.is_established and not assoc._sent_release:
            try:
                elements = decode_command(b"".join(message.command))
            except CommandError:
                elements = {}
            request = store_request(elements, context_id, str(context.transfer_syntax[0]))
        if request is None or not self.accept(assoc, request):
            self._hand_over()
            return
        message.request = request

    def _serve(self, message: _Message) -> None:
        request = message.request
        assert request is not None
        message.pdvs = []  # (complete: never handed over now) the store callback may free the fragments
        try:
            status, comment = self.store(self.assoc, request, message.data if message.sink is None else message.sink)
        finally:
            if message.claim is not None:
                message.claim.release()
        response = store_response(request.sop_class_uid, request.sop_instance_uid, request.message_id, status,
                                  comment)
        # Sent from the DUL thread, the only thread that writes this socket; the state stays Sta6,
        # as after pynetdicom's own DT-1 (send P-DATA-TF).
        self.dul.socket.send(p_data_pdu(request.context_id, response))

    def _hand_over(self) -> None:
        """Give the current message, from its first PDV, to pynetdicom's DIMSE (which claims its
        own share of the memory budget: spool.watch_dimse)."""
        message, self.message = self.message, None
        if message is not None and message.claim is not None:
            message.claim.release()
        self.passthrough = True
        for context_id, pdv in message.pdvs if message else []:
            if not self.passthrough:
                # pynetdicom finished that message with an earlier PDV: the rest starts a new one.
                self.on_pdv(context_id, pdv)
            else:
                self._to_pynetdicom(context_id, pdv)

    def _to_pynetdicom(self, context_id: int, pdv: memoryview) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, bytes(pdv)))
        dimse = self.assoc.dimse
        dimse.receive_primitive(primitive)
        if dimse.message is None:  # the message is complete (or was dropped): back to the direct path
            self.passthrough = False


def _split_pdvs(body: memoryview) -> list[tuple[int, memoryview]] | None:
    """PDV items of a P-DATA-TF body as (context id, control header + value) views; None if malformed."""
    pdvs = []
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            return None
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or length > end - offset - 4:
            return None
        context_id = body[offset + 4]
        pdvs.append((context_id, body[offset + 5:offset + 4 + length]))
        offset += 4 + length
    return pdvs or None


def install(assoc: Any, accept: AcceptCallback, store: StoreCallback,
            large: LargeData | None = None) -> DirectStore | None:
    """Wire the direct path into `assoc`'s DUL (before its thread starts); None if it cannot apply."""
    if any(assoc.get_handlers(event) for event in OBSERVER_EVENTS):
        return None
    direct = DirectStore(assoc, accept, store, large)
    assoc.dul._read_pdu_data = direct.read_pdu
    return direct
