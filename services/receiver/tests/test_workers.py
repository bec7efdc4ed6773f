"""Receiver worker processes (services/receiver/workers.py): spread, restart, exit with the supervisor."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import Peer, echoscu, make_series, start_receiver, storescu
from services.receiver.tests.helpers import apply_settings, wait_events
from shared import subjects
from shared.bus import Bus
from shared.config.applied import wait_applied
from tests.peers import closed_by_peer, open_connections

WORKER_STARTED = re.compile(r"receiver worker (\d+) started \(pid (\d+)\)")


@pytest.fixture
def two_process_receiver(nats_url: str, data_dir: Path, tmp_path: Path) -> Iterator[Peer]:
    peer = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                          env={"CADUCEUS_RECEIVER_WORKERS": "2", "CADUCEUS_RECEIVER_TIMING": "1"})
    yield peer
    peer.stop()


def _wait_log(peer: Peer, text: str, count: int = 1, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = peer.log_text()
        if log.count(text) >= count:
            return log
        assert time.monotonic() < deadline, f"{text!r} x{count} not in the log:\n{log[-3000:]}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_parallel_senders_are_spread_over_the_processes(two_process_receiver: Peer, bus: Bus,
                                                              tmp_path: Path) -> None:
    peer = two_process_receiver
    _wait_log(peer, "receiver worker ready")
    # Enough images that the four associations are open at the same time: journaled small images
    # are answered so fast that associations of 5 could end before the next sender connects.
    folders = [make_series(tmp_path / f"s{i}", 60, size=64) for i in range(4)]
    results = await asyncio.gather(*(asyncio.to_thread(storescu, peer.port, f) for f in folders))
    assert all(r.returncode == 0 for r in results), [r.output[-1000:] for r in results]
    events = await wait_events(bus, "image.received", 240)
    assert len({e.sop_uid for e in events}) == 240
    log = _wait_log(peer, "association timing", 4)
    pids = re.findall(r'"association timing \(ms per image\)".*?"pid": (\d+)', log)
    assert len(set(pids)) == 2, log[-3000:]  # both processes served associations
    assert sorted(pids.count(p) for p in set(pids)) == [2, 2]  # fewest open connections wins


async def test_a_dead_worker_is_replaced(two_process_receiver: Peer, bus: Bus, tmp_path: Path) -> None:
    peer = two_process_receiver
    log = _wait_log(peer, "receiver worker ready")
    worker_pid = int(WORKER_STARTED.findall(log)[0][1])
    os.kill(worker_pid, signal.SIGKILL)
    log = _wait_log(peer, "receiver worker ready", 2)
    assert "receiver worker 1 exited" in log
    folders = [make_series(tmp_path / f"s{i}", 3, size=64) for i in range(2)]
    results = await asyncio.gather(*(asyncio.to_thread(storescu, peer.port, f) for f in folders))
    assert all(r.returncode == 0 for r in results), [r.output[-1000:] for r in results]
    assert len(await wait_events(bus, "image.received", 6)) == 6


async def test_a_silent_worker_is_replaced(nats_url: str, data_dir: Path, tmp_path: Path, bus: Bus) -> None:
    """SIGSTOP: the worker keeps its pid and its connections but does nothing; its supervisor kills it
    once it has sent no report for CADUCEUS_RECEIVER_WORKER_HUNG_SECONDS."""
    peer = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                          env={"CADUCEUS_RECEIVER_WORKERS": "2", "CADUCEUS_RECEIVER_WORKER_HUNG_SECONDS": "5"})
    try:
        log = _wait_log(peer, "receiver worker ready")
        worker_pid = int(WORKER_STARTED.findall(log)[0][1])
        os.kill(worker_pid, signal.SIGSTOP)
        log = _wait_log(peer, "receiver worker ready", 2, timeout=30)
        assert f"receiver worker 1 (pid {worker_pid}) silent for" in log
        assert not _alive(worker_pid)
        folders = [make_series(tmp_path / f"s{i}", 3, size=64) for i in range(2)]
        results = await asyncio.gather(*(asyncio.to_thread(storescu, peer.port, f) for f in folders))
        assert all(r.returncode == 0 for r in results), [r.output[-1000:] for r in results]
        assert len(await wait_events(bus, "image.received", 6)) == 6
    finally:
        peer.stop()


async def test_the_receiver_reports_a_configuration_only_once_every_process_uses_it(
        two_process_receiver: Peer, bus: Bus) -> None:
    """Connections go to the supervisor or a worker, each with its own configuration follower: the
    receiver's heartbeat reports the oldest configuration any of them uses."""
    peer = two_process_receiver
    log = _wait_log(peer, "receiver worker ready")
    worker_pid = int(WORKER_STARTED.findall(log)[0][1])
    await apply_settings(bus, max_connections_per_host=10)
    os.kill(worker_pid, signal.SIGSTOP)   # (well before the 60 s after which a silent worker is replaced)
    try:
        seq = await apply_settings(bus, max_connections_per_host=12, wait=False)
        report = await wait_applied(bus, seq, timeout=2, services=["receiver"])
        [receiver] = report.instances
        assert receiver.state == "pending" and receiver.config_seq == seq - 1, report
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    report = await wait_applied(bus, seq, timeout=10, services=["receiver"])
    assert report.confirmed and [i.config_seq for i in report.instances] == [seq], report


async def test_a_dead_workers_connections_stop_counting(two_process_receiver: Peer, bus: Bus) -> None:
    """The per-host limit holds for the whole receiver; a worker's connections die with it and
    make room at once (the supervisor forgets them)."""
    peer = two_process_receiver
    log = _wait_log(peer, "receiver worker ready")
    worker_pid = int(WORKER_STARTED.findall(log)[0][1])
    await apply_settings(bus, max_connections_per_host=10)
    first = await asyncio.to_thread(open_connections, peer.port, 10, 30)
    second: list = []
    try:
        await asyncio.sleep(1)
        assert len(first) == 10 and not any(closed_by_peer(sock) for sock in first)
        os.kill(worker_pid, signal.SIGKILL)
        await asyncio.sleep(1)
        survivors = [sock for sock in first if not closed_by_peer(sock)]
        assert len(survivors) == 5, len(survivors)  # one connection each in turn: 5 were the worker's
        second = await asyncio.to_thread(open_connections, peer.port, 10, 30)
        await asyncio.sleep(1)
        assert sum(1 for sock in second if not closed_by_peer(sock)) == 5  # room for 10 - 5
    finally:
        for sock in first + second:
            sock.close()


async def test_the_heartbeat_counts_the_workers(nats_url: str, data_dir: Path, tmp_path: Path, bus: Bus) -> None:
    """Associations and journal counters of the whole receiver, the worker's included."""
    from shared.health import read_heartbeats

    peer = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                          env={"CADUCEUS_RECEIVER_WORKERS": "2", "CADUCEUS_HEARTBEAT_SECONDS": "1",
                               "CADUCEUS_RECEIVER_TIMING": "1"})
    try:
        _wait_log(peer, "receiver worker ready")
        folders = [make_series(tmp_path / f"s{i}", 40, size=64) for i in range(2)]
        results = await asyncio.gather(*(asyncio.to_thread(storescu, peer.port, f) for f in folders))
        assert all(r.returncode == 0 for r in results), [r.output[-1000:] for r in results]
        log = _wait_log(peer, "association timing", 2)
        pids = re.findall(r'"association timing \(ms per image\)".*?"pid": (\d+)', log)
        assert len(set(pids)) == 2  # one association each
        deadline = time.monotonic() + 20
        details: dict = {}
        while time.monotonic() < deadline:
            beats = [b for b in await read_heartbeats(bus) if b.type == "service.heartbeat"
                     and b.payload["service"] == "receiver"]
            details = beats[-1].payload["details"] if beats else {}
            # (published and applied are separate steps, reported by each process on its own beat)
            if details.get("journal_published") == 80 and details.get("journal_unapplied") == 0:
                break
            await asyncio.sleep(0.5)
        assert details.get("journal_published") == 80, details  # 40 by each process
        assert details["workers"] == 2 and details["open_associations"] == 0
        assert details["journal_unapplied"] == 0
        # Each process, idle after its association, gave its free memory back once (memory.py).
        while details.get("memory_releases") != 2 and time.monotonic() < deadline + 15:
            await asyncio.sleep(0.5)
            beats = [b for b in await read_heartbeats(bus) if b.type == "service.heartbeat"
                     and b.payload["service"] == "receiver"]
            details = beats[-1].payload["details"] if beats else {}
        assert details.get("memory_releases") == 2, details
    finally:
        peer.stop()


def _kill_supervisor_after(peer: Peer, line: str, what: str) -> None:
    """Wait for `line` in the log, kill -9 the supervisor, and require its worker to be gone in 30 s."""
    log = _wait_log(peer, line)
    worker_pid = int(WORKER_STARTED.findall(log)[0][1])
    assert peer.process is not None
    peer.process.kill()
    peer.process.wait()
    deadline = time.monotonic() + 30
    while _alive(worker_pid):
        assert time.monotonic() < deadline, f"{what} outlived its supervisor"
        time.sleep(0.1)


def test_workers_exit_when_the_supervisor_is_killed(two_process_receiver: Peer) -> None:
    _kill_supervisor_after(two_process_receiver, "receiver worker ready", "worker")


def test_sigterm_stops_supervisor_and_workers(two_process_receiver: Peer) -> None:
    peer = two_process_receiver
    log = _wait_log(peer, "receiver worker ready")
    worker_pid = int(WORKER_STARTED.findall(log)[0][1])
    peer.stop(timeout=40)
    assert peer.process is not None and peer.process.returncode == 0
    assert not _alive(worker_pid)


def test_a_starting_worker_exits_when_the_supervisor_is_killed(two_process_receiver: Peer) -> None:
    """Killed before its worker was ready (e.g. still connecting to NATS): no orphan stays behind."""
    _kill_supervisor_after(two_process_receiver, "receiver worker 1 started", "starting worker")


def test_a_worker_reports_connections_that_ended_without_a_close_event() -> None:
    """HandedOverServer.reconcile: the supervisor's count must not drift if pynetdicom ends an
    association without EVT_CONN_CLOSE."""
    from pynetdicom import AE

    from services.receiver.workers import HandedOverServer

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client, server_end = socket.socketpair()
    server = HandedOverServer(AE(), ("127.0.0.1", 0), b"CADUCEUS", [])
    server.channel = theirs
    try:
        order = json.dumps({"key": 7, "host": "127.0.0.1", "port": 40000}).encode()
        socket.send_fds(ours, [order], [server_end.fileno()])
        handed, address = server.get_request()
        assert address == ("127.0.0.1", 40000)
        server.reconcile()  # still starting up: not reported
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(64)
        server.reconcile(older_than=0)  # no association for it: ended
        assert ours.recv(64) == b"E7"
        server.reconcile(older_than=0)  # reported once
        with pytest.raises(BlockingIOError):
            ours.recv(64)
        handed.close()
        # Orders that are not connections, or unreadable, are skipped without ending the acceptor.
        for message in (b'{"end": [7, 8]}', b"not json", b'{"host": "x"}'):
            ours.send(message)
            with pytest.raises(OSError):
                server.get_request()
    finally:
        for sock in (ours, theirs, client, server_end):
            sock.close()
        server.server_close()


async def _receiver_beat(bus: Bus) -> dict:
    from shared.health import read_heartbeats

    beats = [b for b in await read_heartbeats(bus) if b.type == "service.heartbeat"
             and b.payload["service"] == "receiver"]
    return beats[-1].payload if beats else {}


async def _echoes(port: int, calling_aet: str, count: int = 4) -> list[int]:
    """Return codes of `count` echoes in turn (connections go to either process)."""
    return [(await asyncio.to_thread(echoscu, port, calling_aet=calling_aet)).returncode for _ in range(count)]


async def test_the_receiver_follows_a_config_stream_created_anew_and_keeps_its_allow_list_until_then(
        two_process_receiver: Peer, bus: Bus) -> None:
    """The NATS store lost under a running receiver (it is not restarted: it does not follow EVENTS)
    and the streams declared again: each of its processes kept the old fold and never saw the new
    stream's changes, while its heartbeat said it applied them. Now every process folds the new
    stream; until it has items, the allow-list stays in force (no opening up to the defaults)."""
    from shared.config.state import config_stream_id

    peer = two_process_receiver
    _wait_log(peer, "receiver worker ready")
    for n in range(3):   # the old stream gets further than the new one will
        await apply_settings(bus, allowed_calling_aets=["GOOD"], max_connections_per_host=10 + n)
    old_stream = await config_stream_id(bus)
    assert 0 not in await _echoes(peer.port, "BAD")
    await bus.js.delete_stream(subjects.CONFIG_STREAM)
    await bus.declare_streams()
    new_stream = await config_stream_id(bus)
    assert new_stream != old_stream
    deadline = time.monotonic() + 30   # (each process checks the stream every 5 s)
    while (beat := await _receiver_beat(bus)).get("config_stream") != new_stream:
        assert time.monotonic() < deadline, beat
        await asyncio.sleep(0.2)
    assert beat["config_seq"] == 0 and beat["details"].get("config_stream_replaced") is True, beat
    assert 0 not in await _echoes(peer.port, "BAD")        # the allow-list is still in force
    assert set(await _echoes(peer.port, "GOOD")) == {0}

    seq = await apply_settings(bus, allowed_calling_aets=["OTHER"])   # waits for every process
    assert seq == 1
    beat = await _receiver_beat(bus)
    assert beat["config_seq"] == 1 and beat["config_stream"] == new_stream, beat
    assert "config_stream_replaced" not in beat["details"]
    assert set(await _echoes(peer.port, "OTHER")) == {0}   # in every process
    assert 0 not in await _echoes(peer.port, "GOOD")
