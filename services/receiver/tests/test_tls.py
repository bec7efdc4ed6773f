"""The receiver over TLS: DCMTK storescu with a client certificate gets in, plain TCP does not."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from bench.common import Peer, start_receiver, storescu
from services.receiver.scp import TLS_RETRY_SECONDS
from services.receiver.tests.helpers import apply_settings, read_events, wait_events
from shared.bus import Bus
from tests.peers import closed_by_peer, make_tls_files, open_connections


async def test_tls_with_client_certificates(receiver: Peer, bus: Bus, series5: Path, tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    await apply_settings(bus, tls_certificate=str(tls.server_cert), tls_key=str(tls.server_key),
                         tls_ca=str(tls.ca))

    secure = await asyncio.to_thread(storescu, receiver.port, series5, extra=[
        "+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca)])
    assert secure.returncode == 0, secure.output
    received = await wait_events(bus, "image.received", 5)
    assert len({e.sop_uid for e in received}) == 5

    plain = await asyncio.to_thread(storescu, receiver.port, series5)
    assert plain.returncode != 0

    anonymous = await asyncio.to_thread(storescu, receiver.port, series5, extra=["+tla", "+cf", str(tls.ca)])
    assert anonymous.returncode != 0, "a client without a certificate must be refused when a CA is configured"


async def test_an_idle_connection_does_not_hold_up_tls_senders(receiver: Peer, bus: Bus, series5: Path,
                                                               tmp_path: Path) -> None:
    """The TLS handshake runs on the connection's own thread: a peer that connects and sends
    nothing (no ClientHello) must not stop the acceptor, nor be served forever."""
    tls = make_tls_files(tmp_path / "tls")
    await apply_settings(bus, tls_certificate=str(tls.server_cert), tls_key=str(tls.server_key),
                         tls_ca=str(tls.ca))
    idle = await asyncio.to_thread(open_connections, receiver.port, 3, 10)
    try:
        assert len(idle) == 3
        await asyncio.sleep(0.5)
        started = time.monotonic()
        secure = await asyncio.to_thread(storescu, receiver.port, series5, extra=[
            "+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca)], timeout=60)
        assert secure.returncode == 0, secure.output
        assert time.monotonic() - started < 10
    finally:
        for sock in idle:
            sock.close()
    received = await wait_events(bus, "image.received", 5)
    assert len({e.sop_uid for e in received}) == 5


async def test_failed_handshakes_end_at_once_and_free_their_slots(receiver: Peer, bus: Bus, series5: Path,
                                                                  tmp_path: Path) -> None:
    """Plain DICOM bytes sent to the TLS port: the handshake fails, the connection is closed and
    stops counting against the per-host limit at once, in whichever process served it."""
    tls = make_tls_files(tmp_path / "tls")
    await apply_settings(bus, tls_certificate=str(tls.server_cert), tls_key=str(tls.server_key),
                         tls_ca=str(tls.ca), max_connections_per_host=3)
    def send_plain_pdu(sock: socket.socket, _n: int) -> None:
        sock.send(b"\x01\x00\x00\x00\x00\x44" + bytes(68))  # the start of an A-ASSOCIATE-RQ

    plain = await asyncio.to_thread(open_connections, receiver.port, 3, 10, send_plain_pdu)
    try:
        assert len(plain) == 3
        deadline = time.monotonic() + 5
        while not all(closed_by_peer(sock) for sock in plain):
            assert time.monotonic() < deadline, "connections that failed the TLS handshake stay open"
            await asyncio.sleep(0.1)
    finally:
        for sock in plain:
            sock.close()
    # Well before a worker's periodic reconcile (5 s), all 3 slots are free again.
    others = await asyncio.to_thread(open_connections, receiver.port, 3, 10)
    try:
        await asyncio.sleep(0.5)
        assert len(others) == 3 and not any(closed_by_peer(sock) for sock in others)
    finally:
        for sock in others:
            sock.close()
    secure = await asyncio.to_thread(storescu, receiver.port, series5, extra=[
        "+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca)], timeout=60)
    assert secure.returncode == 0, secure.output


async def test_unreadable_tls_files_close_every_connection_until_fixed(nats_url: str, data_dir: Path, bus: Bus,
                                                                       series5: Path, tmp_path: Path) -> None:
    """TLS configured with files that are not there (yet): the receiver stays up and listening but
    serves nobody, neither in plain TCP nor otherwise, says why in an alert and its heartbeat, and
    starts serving TLS once the files appear, without a restart. It used to exit at start, and
    the supervisor restarted it in a loop with the DICOM port closed."""
    ready = make_tls_files(tmp_path / "made")
    later = tmp_path / "installed-later"
    await apply_settings(bus, tls_certificate=str(later / ready.server_cert.name),
                         tls_key=str(later / ready.server_key.name), tls_ca=str(later / ready.ca.name),
                         wait=False)  # (before the receiver starts)
    peer = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log")
    try:
        [alert] = await wait_events(bus, "alert.raised", 1)
        assert "TLS is configured but not in force" in alert.payload["message"]
        assert f"settings.tls_certificate {later / ready.server_cert.name}" in alert.payload["message"]
        plain = await asyncio.to_thread(storescu, peer.port, series5)
        assert plain.returncode != 0 and peer.process is not None and peer.process.poll() is None
        assert await read_events(bus, "image.received") == []

        (tmp_path / "made").rename(later)
        deadline = time.monotonic() + 3 * TLS_RETRY_SECONDS
        while True:
            secure = await asyncio.to_thread(storescu, peer.port, series5, extra=[
                "+tls", str(later / ready.client_key.name), str(later / ready.client_cert.name),
                "+cf", str(later / ready.ca.name)], timeout=60)
            if secure.returncode == 0:
                break
            assert time.monotonic() < deadline, secure.output
            await asyncio.sleep(1)
        assert len({e.sop_uid for e in await wait_events(bus, "image.received", 5)}) == 5
        assert peer.process is not None and peer.process.poll() is None
    finally:
        peer.stop()
