"""An event-driven DUL reactor for pynetdicom 3.0 associations, for both the SCP and the SCU side.

Why: pynetdicom's DUL thread (`DULServiceProvider.run_reactor`) sleeps `_run_loop_delay` (1 ms)
whenever it finds nothing to do, and reads the socket 4 KiB per `recv`. Every PDU that a sender
hands over while the thread sleeps, and every response the peer sends, waits for the end of that
sleep; with one C-STORE in flight at a time this is paid several times per image (see
docs/performance.md, "Ingest" and "Dispatch hop"). Here the DUL thread instead waits in
`select()` on the peer socket *and* a wake-up socketpair written by `send_pdu`, `kill_dul` and
`stop_dul`, and the socket is read with large `recv_into` calls.

The loop keeps pynetdicom's state machine, timers and abort handling (its body follows pynetdicom
3.0's `DULServiceProvider.run_reactor`). `install_dul(dul, sock)` must run before the DUL thread
starts: on the SCP side from EVT_CONN_OPEN (the association thread starts the DUL later), on the
SCU side when the association's socket is created (before `Association.request()`).

This module is the common part of the receiver's and the dispatcher's fast paths (the association
reactors differ: an SCP serves requests, an SCU only waits for its own responses).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import types
from collections.abc import Callable
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)

SUPPORTED_PYNETDICOM = ("3.0",)
IDLE_WAIT = 0.05  # upper bound for a select() when nothing happens (timers are checked then)
RECV_CHUNK = 1 << 20
# A read waiting for the rest of a PDU checks this often whether to give up (_wait_readable).
RECV_WAIT = 0.2


def supported() -> bool:
    """The replaced loops follow pynetdicom 3.0's internals; other versions keep their own loops."""
    return pynetdicom.__version__.startswith(SUPPORTED_PYNETDICOM)


# State machine events that only move data; the others (association, release, abort, close,
# invalid PDU) are what an association thread must react to.
DATA_EVENTS = frozenset({"Evt9", "Evt10"})


def install_dul(dul: Any, sock: Any, on_state_event: Callable[[], None] | None = None) -> None:
    """Replace the DUL thread's loop (before it starts) and `sock`'s (an AssociationSocket) recv.

    `on_state_event` is called on the DUL thread after every state machine event other than data
    transfer, and when the DUL thread ends: an association thread that blocks instead of polling
    (the receiver's) is woken by it.
    """
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
    dul._target = lambda: _dul_reactor(dul, wake_r, wake_w, on_state_event)
    sock.recv = types.MethodType(_recv, sock)


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
            count = _recv_into(self, view[received:], min(len(buffer) - received, RECV_CHUNK))
        if count == 0:
            break
        received += count
        if received < nr_bytes:
            # The network timeout is for a silent peer: one still sending a large PDU (a whole
            # instance in one P-DATA-TF over a slow link) is not, however long the PDU takes.
            self.assoc.dul._idle_timer.restart()
    if received < len(buffer):
        del buffer[received:]
    return buffer


def _recv_into(assoc_socket: Any, view: memoryview, size: int) -> int:
    """recv_into that does not block for good while the peer stalls inside a PDU."""
    sock = assoc_socket.socket
    if sock is not None and not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() is None:
        # Most of a PDU is already waiting: take it without a select() first (one syscall per
        # read instead of two on the receiver's hot path).
        try:
            return int(sock.recv_into(view, size, socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass
    _wait_readable(assoc_socket)
    return int(sock.recv_into(view, size))


def _wait_readable(assoc_socket: Any) -> None:
    """Block until the peer's socket has data, or raise TimeoutError (the caller's "connection
    closed") once the association is given up while the peer stalls inside a PDU.

    Why: a peer that sends part of a PDU (a header claiming more than follows, half an
    A-ASSOCIATE-RQ) and holds the connection open would otherwise keep the DUL thread in a
    blocking recv for good: neither the ARTIM timer (A-ASSOCIATE-RQ not complete in time, or the
    admission's eviction of idle connections), nor the network timeout, nor a kill could end it,
    and the association thread waits for that DUL forever. Enough such connections took every
    slot of the receiver, for as long as their peers liked.
    """
    sock = assoc_socket.socket
    if sock is None or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
        return  # no socket: recv_into fails as before; TLS: decrypted bytes already waiting
    dul = assoc_socket.assoc.dul
    while True:
        try:
            ready, _, _ = select.select([sock], [], [], RECV_WAIT)
        except (OSError, ValueError):
            return  # the socket went away: recv_into reports it
        if ready:
            return
        if dul._kill_thread or dul.artim_timer.expired or dul.idle_timer_expired():
            raise TimeoutError("the peer stopped sending in the middle of a PDU")


def _wait(dul: Any, wake_r: socket.socket) -> bool:
    """Block until the peer sent something, a primitive or event is queued, or IDLE_WAIT passed.

    True when the peer's socket is known to be readable, so the caller can read the PDU without
    pynetdicom's own readiness check (a second select per PDU, and a second GIL hand-over).
    """
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return False
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is None or dul.socket._is_connected is False:
        select.select([wake_r], [], [], 0.001)
        _drain(wake_r)
        return False
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        ready, _, _ = select.select([sock, wake_r], [], [], IDLE_WAIT)
    except (OSError, ValueError):
        return False  # the socket went away: the transport check reports it
    if wake_r in ready:
        _drain(wake_r)
    return sock in ready


def _drain(wake_r: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while wake_r.recv(4096):
            pass


def _dul_reactor(dul: Any, wake_r: socket.socket, wake_w: socket.socket,
                 on_state_event: Callable[[], None] | None) -> None:
    dul._idle_timer.start()
    idle = False
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            readable = _wait(dul, wake_r) if idle else False
            if dul._kill_thread:
                break
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif not dul.event_queue.empty():
                    # The state machine first: a new connection's Evt5 starts ARTIM (Sta2), which
                    # bounds the wait for its A-ASSOCIATE-RQ even when the peer stalls inside it.
                    pass
                elif readable and dul.state_machine.current_state != "Sta13":
                    dul._read_pdu_data()  # what _is_transport_event does once its select agrees
                    dul._idle_timer.restart()
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
            if on_state_event is not None and event not in DATA_EVENTS:
                on_state_event()
    finally:
        wake_r.close()
        wake_w.close()
        if on_state_event is not None:
            on_state_event()


def association_finished(assoc: Any) -> bool:
    """pynetdicom's association-reactor checks, without serving DIMSE messages: answer a peer's
    release request, take an abort, notice a dead DUL or the network timeout. True when the
    association ended (the caller's reactor returns). Shared by the receiver's SCP reactor and the
    dispatcher's SCU reactor."""
    if assoc.is_established and assoc.acse.is_release_requested():
        assoc.acse.send_release(is_response=True)
        assoc.is_released = True
        assoc.is_established = False
        evt.trigger(assoc, evt.EVT_RELEASED, {})
        assoc.kill()
        return True
    if assoc.acse.is_aborted():
        # State first, then take the primitive: the dispatcher's sending thread (fastpath.ended())
        # sees one or the other.
        assoc.is_aborted = True
        assoc.is_established = False
        assoc.dul.receive_pdu(wait=False)
        evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
        return True
    if not assoc.dul.is_alive():
        assoc.kill()
        return True
    if assoc.dul.idle_timer_expired():
        log.error("network timeout reached")
        # Read by the dispatcher's error message: the abort is ours, not the peer's.
        assoc.caduceus_aborted_because = f"nothing received from the peer for {assoc.network_timeout:g} s"
        assoc.abort()
        assoc.kill()
        return True
    return False
