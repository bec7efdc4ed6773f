"""SCU-side replacements for pynetdicom's polling loops (pynetdicom 3.0), installed per association.

Why (profiled, docs/performance.md "Dispatch hop"): per C-STORE, pynetdicom's SCU pays
- the DUL thread's 1 ms sleeps, between the PDUs of the data set and while waiting for the
  response (replaced by `shared.dicomnet`'s select-based DUL loop, as on the receiver side);
- the association thread's loop, which sleeps 1 ms per round and only reaches the pause
  checkpoint between sleeps, so `send_c_store()` waits for it before every request;
- the DIMSE/DUL machinery per PDU (a queue and a thread hand-over per P-DATA, pydicom encoding of
  the command set): with the fast path installed the dispatcher sends its C-STOREs with
  `cstore.send_c_store`, which writes the PDUs itself (this module provides the write lock).

The association thread of an SCU that sends C-STOREs and waits for each response itself has
little to do: notice a peer's A-RELEASE request, an abort, a dead DUL thread and the network
timeout. `_scu_reactor` does those checks every few milliseconds, reports itself paused at all
other times, and never takes messages off the DIMSE queue. The last point also removes the race
that `sender._settle_reactor` works around (pynetdicom's reactor, woken right after a send,
taking the next send's C-STORE response off the queue).

`FastAE` installs both at the moment pynetdicom creates the association's socket, before the DUL
thread starts. `CADUCEUS_DISPATCH_FASTPATH=0` (or another pynetdicom version) keeps pynetdicom's
own loops.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
import types
from typing import Any

from pynetdicom import AE

from shared import dicomnet

# Linux (4.1 and later): where struct tcp_info (getsockopt TCP_INFO) holds tcpi_bytes_acked, the
# bytes of the connection the peer has acknowledged so far (a u64, RFC 4898's ThruOctetsAcked).
# Elsewhere the timeouts run from the last write, as before.
TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
BYTES_ACKED_OFFSET = 120

CHECK_EVERY = 0.005  # seconds between the association thread's checks for release/abort/timeout


def enabled() -> bool:
    return dicomnet.supported() and os.environ.get("CADUCEUS_DISPATCH_FASTPATH", "1") != "0"


class FastAE(AE):
    """An AE whose requested associations run the fast loops (when `enabled()`)."""

    def _create_socket(self, assoc: Any, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        if enabled():
            dicomnet.install_dul(assoc.dul, sock)
            _install_write_lock(assoc, sock)
            _count_acknowledged_bytes_as_progress(assoc.dul)
            assoc._run_reactor = types.MethodType(_scu_reactor, assoc)
            assoc.caduceus_fastpath = True
        return sock


def _install_write_lock(assoc: Any, sock: Any) -> None:
    """One lock around every socket write: `cstore.send_c_store` writes P-DATA-TF PDUs from the
    sending thread while the DUL thread may write an A-ABORT or A-RELEASE; no PDU may interleave
    with another. `assoc.caduceus_write(data)` is the locked write."""
    write_lock = threading.Lock()
    original_write = sock.send

    def locked_write(data: bytes | bytearray) -> None:
        with write_lock:
            original_write(data)
        # The network timeout is for a silent peer; one taking a large data set (minutes over a slow
        # link) has nothing to say until it is complete, and only counts as silent once it stops
        # taking bytes (then writes block and the timer runs out as before).
        assoc.dul._idle_timer.restart()

    sock.send = locked_write
    assoc.caduceus_write = locked_write


def acknowledged_bytes(assoc: Any) -> int | None:
    """How many bytes the peer has acknowledged on the association's connection so far; None
    where the system does not tell (not Linux, a kernel before 4.1, no socket)."""
    sock = getattr(assoc.dul.socket, "socket", None) if assoc.dul.socket is not None else None
    if TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 256)
    except (OSError, ValueError):  # closed meanwhile
        return None
    if len(info) < BYTES_ACKED_OFFSET + 8:
        return None
    return int(struct.unpack_from("=Q", info, BYTES_ACKED_OFFSET)[0])


def _count_acknowledged_bytes_as_progress(dul: Any) -> None:
    """Make the network timeout mean "no progress for that long", not "that long since the last
    write returned or a PDU arrived".

    The last block of an instance is written into the socket's send buffer (up to ~4 MB, the
    kernel's tcp_wmem maximum) and the write returns at once; over a slow link (below ~35 KB/s for
    4 MB in 120 s) that buffer is still draining when the timer, restarted by the write, runs out,
    and the peer has nothing to say until it has the whole request. Likewise a write that blocks
    while a very slow link takes its block may outlast the timer. So when the timer runs out, the
    connection's acknowledged bytes are looked at: if the peer acknowledged any since the timer was
    (re)started, the transfer is moving and the timer starts again. A peer that takes nothing more
    for a whole timeout is given up as before (at most one more timeout later, when its last byte
    was acknowledged early in the period).
    """
    timer = dul._idle_timer
    assoc = dul.assoc
    restart = timer.restart
    acked_at_restart: list[int | None] = [None]

    def restart_noting_the_acknowledged_bytes() -> None:
        acked_at_restart[0] = acknowledged_bytes(assoc)
        restart()

    def idle_timer_expired() -> bool:
        if not timer.expired:
            return False
        before, now = acked_at_restart[0], acknowledged_bytes(assoc)
        if before is None or now is None or now <= before:
            return True
        restart_noting_the_acknowledged_bytes()  # the link is slow, the peer not silent
        return False

    timer.restart = restart_noting_the_acknowledged_bytes
    dul.idle_timer_expired = idle_timer_expired


def installed(assoc: Any) -> bool:
    return bool(getattr(assoc, "caduceus_fastpath", False))


def ended(assoc: Any, timeout: float = 1.0) -> bool:
    """From the sending thread, before a request: has the association ended (or is it ending)?

    The association thread notices a peer's abort or a closed connection within CHECK_EVERY; a
    request sent in that moment would go to a dead DUL and wait the whole DIMSE timeout. The abort
    primitive is already queued for the user, or the DUL thread gone, when the previous request
    returned, so look at those directly, then give the association thread the moment it needs to
    record how the association ended (`is_aborted`, for the error message).
    """
    if not assoc.is_established:
        return True
    if not assoc.acse.is_aborted() and assoc.dul.is_alive():
        return False
    deadline = time.monotonic() + timeout
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(CHECK_EVERY / 5)
    return True


def _scu_reactor(self: Any) -> None:
    """Association._run_reactor for a requestor that only sends requests and reads their responses.

    Pause handshake (what `send_c_store`/`release` expect): they clear `_reactor_checkpoint`, then
    wait for `_is_paused`. Here `_is_paused` is False only while the checks run, and it is set
    False *before* the checkpoint is looked at, so a sender that cleared the checkpoint and then
    reads `_is_paused` True knows the checks are not running and will not start.
    """
    self._is_paused = True
    checkpoint = self._reactor_checkpoint
    while not self._kill:
        time.sleep(CHECK_EVERY)
        if not checkpoint.is_set():
            continue
        self._is_paused = False
        if not checkpoint.is_set():
            self._is_paused = True
            continue
        try:
            finished = dicomnet.association_finished(self)
        finally:
            self._is_paused = True
        if finished:
            return
