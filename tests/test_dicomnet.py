"""shared/dicomnet.py: reading a PDU from a peer that stops sending in the middle of it."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from pynetdicom.timer import Timer

from shared import dicomnet


@pytest.mark.parametrize("give_up", ["killed", "artim expired", "network timeout"])
def test_a_read_stalled_inside_a_pdu_ends_when_the_association_is_given_up(give_up: str) -> None:
    # The peer announced 1000 bytes, sent 10 and holds the connection open. Before the fix the
    # read blocked for good: neither the ARTIM timer, the network timeout nor a kill ended it.
    ours, peer = socket.socketpair()
    artim, idle = Timer(30), Timer(120)
    artim.start()
    idle.start()
    dul = SimpleNamespace(_kill_thread=False, artim_timer=artim, _idle_timer=idle,
                          idle_timer_expired=lambda: idle.expired)
    assoc_socket = SimpleNamespace(socket=ours, assoc=SimpleNamespace(dul=dul))
    peer.sendall(b"x" * 10)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(dicomnet._recv(assoc_socket, 1000))
        except TimeoutError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
        assert reader.is_alive(), outcome  # still waiting for the rest, as it should
        if give_up == "killed":
            dul._kill_thread = True
        elif give_up == "artim expired":
            artim.timeout = 0  # what the admission's eviction of an idle connection does
        else:
            idle.timeout = 0
        reader.join(2)
        assert not reader.is_alive(), "the read did not give up"
        assert isinstance(outcome[0], TimeoutError), outcome
    finally:
        ours.close()
        peer.close()


def test_a_read_returns_what_arrives_and_stops_at_a_close() -> None:
    ours, peer = socket.socketpair()
    dul = SimpleNamespace(_kill_thread=False, artim_timer=Timer(None), _idle_timer=Timer(None),
                          idle_timer_expired=lambda: False)
    assoc_socket = SimpleNamespace(socket=ours, assoc=SimpleNamespace(dul=dul))
    try:
        peer.sendall(b"a" * 3000)
        threading.Timer(0.3, lambda: (peer.sendall(b"b" * 1000), peer.close())).start()
        assert bytes(dicomnet._recv(assoc_socket, 4000)) == b"a" * 3000 + b"b" * 1000
        assert bytes(dicomnet._recv(assoc_socket, 10)) == b""  # closed: a short result, as before
    finally:
        ours.close()


def test_a_pdu_still_arriving_is_not_cut_off_by_the_network_timeout() -> None:
    # A large P-DATA-TF (max PDU 0 = unlimited: a sender may put a whole WSI or cine in one PDU) over
    # a slow link takes longer than the network timeout while bytes keep coming. The timeout is for
    # a silent peer: the read gave up at the first pause once the timer, started at the last whole
    # PDU, ran out, and every retry of that instance failed the same way.
    ours, peer = socket.socketpair()
    idle = Timer(0.6)
    idle.start()
    dul = SimpleNamespace(_kill_thread=False, artim_timer=Timer(None), _idle_timer=idle,
                          idle_timer_expired=lambda: idle.expired)
    assoc_socket = SimpleNamespace(socket=ours, assoc=SimpleNamespace(dul=dul))

    def trickle() -> None:
        for _ in range(8):  # 2.4 s in all, a pause longer than RECV_WAIT between parts
            peer.sendall(b"x" * 10)
            time.sleep(0.3)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        assert bytes(dicomnet._recv(assoc_socket, 80)) == b"x" * 80
    finally:
        sender.join()
        ours.close()
        peer.close()
