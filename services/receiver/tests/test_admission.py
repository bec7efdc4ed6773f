"""Connection admission (services/receiver/admission.py): a flood of idle connections is bounded,
the excess is closed at once, and the receiver serves again as soon as the flood ends. Each test
runs against one receiver process and against two (services/receiver/workers.py), where the
limits must hold for the whole receiver, not per process."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pynetdicom import AE

from bench.common import Peer, echoscu, start_receiver
from services.receiver.admission import HEADROOM, IDLE_GRACE_SECONDS
from services.receiver.tests.helpers import apply_settings
from services.receiver.workers import WORKERS_ENV
from shared.bus import Bus
from tests.peers import associate_rq, closed_by_peer, open_connections

MAXIMUM_ASSOCIATIONS = 200  # services/receiver/scp.py build_ae
LIMIT = MAXIMUM_ASSOCIATIONS + HEADROOM


@pytest.fixture(params=["1", "2"], ids=["one-process", "two-processes"])
def receiver(request: pytest.FixtureRequest, nats_url: str, data_dir: Path, tmp_path: Path) -> Iterator[Peer]:
    peer = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                          env={"CADUCEUS_RECEIVER_PUBLISH_TIMEOUT": "1.5", WORKERS_ENV: request.param})
    yield peer
    peer.stop()


def _held_by_process(receiver: Peer) -> list[int]:
    """Connections to the DICOM port that each receiver process holds (supervisor first)."""
    assert receiver.process is not None
    supervisor = psutil.Process(receiver.process.pid)
    counts = []
    for process in [supervisor, *supervisor.children()]:
        connections = process.net_connections(kind="tcp")
        counts.append(sum(1 for conn in connections
                          if conn.laddr and conn.laddr.port == receiver.port and conn.raddr))
    return counts


async def test_idle_flood_is_bounded_and_the_receiver_recovers_at_once(receiver: Peer) -> None:
    process = psutil.Process(receiver.process.pid) if receiver.process else None
    assert process is not None
    flood = await asyncio.to_thread(open_connections, receiver.port, LIMIT + 150, 30)
    try:
        assert len(flood) >= LIMIT + 100
        # The connections beyond the limit are closed by the receiver without an association.
        deadline = time.monotonic() + 30
        closed: list[socket.socket] = []
        while time.monotonic() < deadline:
            closed = [sock for sock in flood if closed_by_peer(sock)]
            if len(closed) >= len(flood) - LIMIT:
                break
            await asyncio.sleep(0.5)
        # Between maximum_associations and LIMIT stay open: once 200 are open, a new connection
        # ends one that has waited over IDLE_GRACE_SECONDS for its A-ASSOCIATE-RQ instead of being
        # refused, which happens here when opening the flood takes longer than that (a slow machine).
        assert len(flood) - LIMIT <= len(closed) <= len(flood) - MAXIMUM_ASSOCIATIONS, (len(flood), len(closed))
        held = _held_by_process(receiver)
        assert sum(held) <= LIMIT, held
        assert all(count > 0 for count in held), held  # with two processes, both serve
        # Two threads per association (association + DUL), plus the service's own.
        assert process.num_threads() < 2 * LIMIT + 40
        assert process.memory_info().rss < 500 * 2**20
    finally:
        for sock in flood:
            sock.close()
    # The dropped connections end their associations at once (not after the 30 s ACSE timeout).
    started = time.monotonic()
    while not (await asyncio.to_thread(echoscu, receiver.port)).returncode == 0:
        assert time.monotonic() - started < 10, "echo still refused 10 s after the flood ended"
        await asyncio.sleep(0.5)


def _echo_from(port: int, source: str) -> int | None:
    """C-ECHO status from a given loopback source address (None: no association)."""
    ae = AE(ae_title="OTHERHOST")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


async def test_per_host_limit_keeps_other_hosts_served(receiver: Peer, bus: Bus) -> None:
    await apply_settings(bus, max_connections_per_host=10)
    flood = await asyncio.to_thread(open_connections, receiver.port, 40, 30)  # from 127.0.0.1
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            closed = sum(1 for sock in flood if closed_by_peer(sock))
            if closed >= 30:
                break
            await asyncio.sleep(0.5)
        assert closed == 30, closed  # 10 kept, the rest closed at accept
        assert sum(_held_by_process(receiver)) == 10
        # Another address is still served while 127.0.0.1 holds its 10 connections.
        assert await asyncio.to_thread(_echo_from, receiver.port, "127.0.0.2") == 0
        assert await asyncio.to_thread(_echo_from, receiver.port, "127.0.0.1") is None
    finally:
        for sock in flood:
            sock.close()


async def test_held_idle_connections_make_room_for_a_real_sender(receiver: Peer) -> None:
    # Slow-loris: every slot taken by connections that never send an A-ASSOCIATE-RQ and stay open.
    flood = await asyncio.to_thread(open_connections, receiver.port, LIMIT + 20, 30)
    try:
        assert len(flood) >= LIMIT
        await asyncio.sleep(IDLE_GRACE_SECONDS + 1)
        # A real sender gets through at once: the longest-waiting idle connections are ended for it.
        started = time.monotonic()
        status = await asyncio.to_thread(_echo_from, receiver.port, "127.0.0.1")
        assert status == 0, "C-ECHO refused while idle connections held every slot"
        assert time.monotonic() - started < 5
        closed = [sock for sock in flood if closed_by_peer(sock)]
        # the 20 over the limit at accept, plus the ones ended to make room (not the others)
        assert len(flood) - LIMIT < len(closed) < len(flood) - LIMIT + HEADROOM + 5, len(closed)
    finally:
        for sock in flood:
            sock.close()


async def test_connections_stalled_inside_their_a_associate_rq_make_room(receiver: Peer) -> None:
    # Slow-loris inside a PDU: each connection sends the header of an A-ASSOCIATE-RQ and part of its
    # body, then holds the connection open. The receiver's reader waits for the rest of the PDU.
    request = associate_rq()

    def send_part(sock: socket.socket, n: int) -> None:
        sock.send(request[:len(request) // 2])

    flood = await asyncio.to_thread(open_connections, receiver.port, LIMIT + 20, 30, send_part)
    try:
        assert len(flood) >= LIMIT
        await asyncio.sleep(IDLE_GRACE_SECONDS + 1)
        started = time.monotonic()
        status = await asyncio.to_thread(_echo_from, receiver.port, "127.0.0.1")
        assert status == 0, "C-ECHO refused while half-sent A-ASSOCIATE-RQs held every slot"
        assert time.monotonic() - started < 5
    finally:
        for sock in flood:
            sock.close()
