"""Event-driven replacements for pynetdicom's polling loops, installed per association.

Why: a plain pynetdicom SCP spends most of its time in two polling loops (see
docs/performance.md): the DUL thread sleeps `_run_loop_delay` (1 ms) whenever it finds nothing to
do, and the association thread sleeps 1 ms before every check for a complete DIMSE message; the
socket is read 4 KiB per `recv`. With a sender that waits for each C-STORE response, every image
pays these delays. Here:
- the DUL thread waits in `select()` on the peer socket *and* a wake-up socketpair written by
  `send_pdu` (so a response is sent as soon as the handler returns), instead of sleeping;
- the association thread blocks on the DIMSE message queue instead of sleeping;
- `recv` reads with large `recv_into` calls.
The DUL loop and `recv` live in shared/dicomnet.py (the dispatcher's SCU uses them too).

The loops keep pynetdicom's state machine, timers and abort handling (the bodies follow
pynetdicom 3.0's `DULServiceProvider.run_reactor` and `Association._run_reactor`). They are
installed from EVT_CONN_OPEN, before the association thread starts; `CADUCEUS_RECEIVER_FASTPATH=0`
turns them off.
"""

from __future__ import annotations

import queue
import struct
import types
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

from services.receiver import direct
from shared import dicomnet

# Association thread: how long to block on the DIMSE queue per round. The DUL thread wakes it for
# every state change (release, abort, close), so this only bounds how late timers and kill() are seen.
MESSAGE_WAIT = 0.25


def supported() -> bool:
    return dicomnet.supported()


def install(assoc: Any) -> None:
    if not supported():
        return
    # The DUL loop and recv are the same for SCP and SCU (shared.dicomnet); the association loop
    # below is the SCP's own: it serves requests.
    messages = assoc.dimse.msg_queue

    def on_state_event() -> None:
        messages.put((None, None))  # the association reactor re-checks release/abort/DUL state
        if not assoc.is_established and assoc.dul.state_machine.current_state == "Sta1":
            # The connection ended before an A-ASSOCIATE-RQ (a probe, a hung or hostile peer):
            # pynetdicom's association thread would wait the whole ACSE timeout for the request
            # (and the DUL thread idle-loop meanwhile). None is what that wait returns on timeout.
            assoc.dul.to_user_queue.put(None)

    dicomnet.install_dul(assoc.dul, assoc.dul.socket, on_state_event=on_state_event)
    assoc.dimse.send_msg = _fast_send_msg(assoc, assoc.dimse.send_msg)
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
        return direct.store_response(str(sop_class), str(sop_instance),
                                     int(primitive.MessageIDBeingRespondedTo), int(primitive.Status))
    except (UnicodeError, struct.error):
        return None


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

        if dicomnet.association_finished(self):
            return
