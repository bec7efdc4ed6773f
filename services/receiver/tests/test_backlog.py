"""A burst of connections is queued by the kernel, not dropped, while the acceptor catches up."""

from __future__ import annotations

import asyncio
import socket
import subprocess

from bench.common import Peer, echoscu


def _connect_burst(port: int, count: int) -> tuple[int, list[socket.socket]]:
    failures, sockets = 0, []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        except OSError:
            failures += 1
    return failures, sockets


def _listen_backlog(port: int) -> int:
    """The accept queue length of the listening socket (`ss` shows it as Send-Q)."""
    out = subprocess.run(["/usr/bin/ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return max(int(line.split()[2]) for line in out.splitlines())


async def test_connection_burst_is_not_dropped(receiver: Peer) -> None:
    # socketserver's default queue of 5 drops SYNs of a burst while the acceptor is busy starting
    # association threads; the senders then wait for SYN retransmits (1 s, 3 s, ...).
    assert _listen_backlog(receiver.port) >= 512
    failures, sockets = await asyncio.to_thread(_connect_burst, receiver.port, 100)
    try:
        assert failures == 0, f"{failures} of 100 connection attempts failed"
    finally:
        for sock in sockets:
            sock.close()
    # Idle connections count against the association limit (200) until the ACSE timeout (30 s)
    # ends them; below the limit a real sender is served at once.
    result = await asyncio.to_thread(echoscu, receiver.port)
    assert result.returncode == 0, result.output
