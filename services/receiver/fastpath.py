"""Event-driven replacements for pynetdicom's polling loops, installed per association.

Why: a plain pynetdicom SCP spends most of its time in two polling loops (see
docs/performance.md): the DUL thread sleeps `_run_loop_delay` (1 ms) whenever it finds nothing to
do, and the association thread sleeps 1 ms before every check for a complete DIMSE message; the
socket is read 4 KiB per `recv`. With a sender that waits for each C-STORE response, every image
pays these delays. Here:
- the DUL thread waits in `select()` on the peer socket *and* a wake-up socketpair written by
  `send_pdu` (so a response is sent as soon as the handler returns), instead of sleeping;
- the association thread blocks on the DIMSE message queue instead of sleeping;
- `recv` reads into one preallocated buffer with large `recv_into` calls.

The loops keep pynetdicom's state machine, timers and abort handling (the bodies follow
pynetdicom 3.0's `DULServiceProvider.run_reactor` and `Association._run_reactor`). They are
installed from EVT_CONN_OPEN, before the association thread starts; `CADUCEUS_RECEIVER_FASTPATH=0`
turns them off.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import types
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = ("3.0",)
IDLE_WAIT = 0.05       # upper bound for a select() when nothing happens (timers are checked then)
MESSAGE_WAIT = 0.005   # association thread: how long to block on the DIMSE queue per round
RECV_CHUNK = 1 << 20


def supported() -> bool:
    return pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM)


def install(assoc: Any) -> None:
    if not supported():
        return
    dul = assoc.dul
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)

    def wake() -> None:
        with contextlib.suppress(OSError):
            wake_w.send(b"\0")

    original_send_pdu = dul.send_pdu
    original_kill = dul.kill_dul
    original_stop = dul.stop_dul

    def send_pdu(primitive: Any) -> None:
        original_send_pdu(primitive)
        wake()

    def kill_dul() -> None:
        original_kill()
        wake()

    def stop_dul() -> bool:
        wake()
        return bool(original_stop())

    dul.send_pdu = send_pdu
    dul.kill_dul = kill_dul
    dul.stop_dul = stop_dul
    assoc.dimse.send_msg = _fast_send_msg(assoc, assoc.dimse.send_msg)
    dul._target = lambda: _dul_reactor(dul, wake_r, wake_w)
    dul.socket.recv = types.MethodType(_recv, dul.socket)
    assoc._run_reactor = types.MethodType(_association_reactor, assoc)


def _fast_send_msg(assoc: Any, original: Any) -> Any:
    """DIMSEServiceProvider.send_msg with a direct encoder for plain C-STORE responses.

    pynetdicom builds a pydicom Dataset for the response's command set and encodes it twice
    (group length, then the message): ~0.5 ms of Python per image. The bytes are the same
    (test_fastpath.py); anything else (requests, other messages, error comments, bound
    EVT_DIMSE_SENT handlers, a tiny peer max PDU) goes through pynetdicom.
    """
    dimse = assoc.dimse

    def send_msg(primitive: Any, context_id: int) -> None:
        command = store_response_command(primitive)
        max_pdu = dimse.maximum_pdu_size
        if (command is None or assoc.get_handlers(evt.EVT_DIMSE_SENT)
                or (max_pdu and len(command) + 6 > max_pdu)):
            original(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # command, last fragment
        dimse.dul.send_pdu(pdata)

    return send_msg


def _ui(element: int, value: Any) -> bytes:
    raw = str(value).encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(raw)) + raw


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def store_response_command(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR LE) as pynetdicom encodes it, or None if not plain."""
    if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
        return None
    if getattr(primitive, "OffendingElement", None) is not None or getattr(primitive, "ErrorComment", None):
        return None
    sop_class, sop_instance = primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID
    if primitive.Status is None or not sop_class or not sop_instance:
        return None
    try:
        body = b"".join((_ui(0x0002, sop_class), _us(0x0100, 0x8001),
                         _us(0x0120, int(primitive.MessageIDBeingRespondedTo)), _us(0x0800, 0x0101),
                         _us(0x0900, int(primitive.Status)), _ui(0x1000, sop_instance)))
    except (UnicodeError, struct.error):
        return None
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv: same contract (short result when the peer closed), fewer syscalls.

    `nr_bytes` comes from a PDU header, i.e. from the peer: a 6-byte header may claim 4 GB. The
    buffer starts at most RECV_CHUNK long and doubles only as data actually arrives, so memory
    follows what was received, not what was announced.
    """
    buffer = bytearray(min(nr_bytes, RECV_CHUNK))
    received = 0
    while received < nr_bytes:
        if received == len(buffer):
            buffer.extend(bytes(min(len(buffer), nr_bytes - received)))
        with memoryview(buffer) as view:
            count = self.socket.recv_into(view[received:], min(len(buffer) - received, RECV_CHUNK))
        if count == 0:
            break
        received += count
    if received < len(buffer):
        del buffer[received:]
    return buffer


def _wait(dul: Any, wake_r: socket.socket) -> None:
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is None or dul.socket._is_connected is False:
        select.select([wake_r], [], [], 0.001)
        _drain(wake_r)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    try:
        ready, _, _ = select.select([sock, wake_r], [], [], IDLE_WAIT)
    except (OSError, ValueError):
        return  # the socket went away: the transport check reports it
    if wake_r in ready:
        _drain(wake_r)


def _drain(wake_r: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while wake_r.recv(4096):
            pass


def _dul_reactor(dul: Any, wake_r: socket.socket, wake_w: socket.socket) -> None:
    dul._idle_timer.start()
    idle = False
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            if idle:
                _wait(dul, wake_r)
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - same recovery as pynetdicom: abort the association
                log.error("exception in the DUL reactor, aborting the association: %s", exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                with contextlib.suppress(Exception):
                    dul.socket.send(abort_pdu.encode())
                dul.assoc.is_aborted = True
                dul.assoc.is_established = False
                dul.assoc._kill = True
                dul._kill_thread = True
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            dul.state_machine.do_action(event)
            idle = False
    finally:
        wake_r.close()
        wake_w.close()


def _association_reactor(self: Any) -> None:
    messages = self.dimse.msg_queue
    self._is_paused = False
    while not self._kill:
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        try:
            context_id, msg = messages.get(timeout=MESSAGE_WAIT)
        except queue.Empty:
            msg = None
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            log.error("network timeout reached")
            self.abort()
            self.kill()
            return
