"""`caduceus up`'s embedded nats-server: its store limit, and the keeper that restarts it (cli/natskeeper.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from cli.natskeeper import NatsKeeper
from conftest import tmpfs
from shared.events import ServiceCrashed, ServiceRestarted
from shared.natsserver import EmbeddedNats

Recorded = list[tuple[str, ServiceCrashed | ServiceRestarted]]


def keeper_for(server: EmbeddedNats, recorded: Recorded) -> NatsKeeper:
    async def record(type_: str, payload: ServiceCrashed | ServiceRestarted) -> None:
        recorded.append((type_, payload))

    return NatsKeeper(server, record, asyncio.Event(), restart_free_bytes=4 * 1024 * 1024)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "48m") as mount:
        yield mount


def test_the_store_may_use_the_whole_file_system(tmp_path: Path) -> None:
    # Not nats-server's default of 75 % of what was free at its start (docs/reliability.md).
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.monitor_port}/jsz", timeout=5) as response:
            limit = json.load(response)["config"]["max_storage"]
        stats = os.statvfs(server.store_dir)
        assert limit == stats.f_blocks * stats.f_frsize
        assert server.health() == (True, "")
    finally:
        server.stop()


async def test_keeper_restarts_a_server_that_exited(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    recorded: Recorded = []
    keeper = keeper_for(server, recorded)
    try:
        await keeper.check()
        assert not recorded   # healthy: nothing to do
        assert server.process is not None
        old_pid = server.process.pid
        os.kill(old_pid, signal.SIGKILL)
        server.process.wait()
        await keeper.check()
        assert server.process is not None and server.process.pid != old_pid
        assert server.health() == (True, "")
        assert [type_ for type_, _ in recorded] == ["service.crashed", "service.restarted"]
        crashed, restarted = recorded[0][1], recorded[1][1]
        assert crashed.service == restarted.service == "nats" and crashed.pid == old_pid
        assert restarted.pid == server.process.pid and restarted.restarts == 1
    finally:
        server.stop()


async def test_keeper_restarts_a_server_whose_store_failed_a_write_once_space_is_back(small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (36 * 1024 * 1024))   # leaves about 12 MB for the store
    server = EmbeddedNats(small_disk / "nats").start()
    recorded: Recorded = []
    keeper = keeper_for(server, recorded)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream(timeout=2)
        await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
        stored = 0
        with pytest.raises(Exception):  # noqa: B017 - a timeout or an error reply, either way not stored
            while True:
                await js.publish("t.x", b"x" * 2000)
                stored += 1
        healthy, error = server.health()
        assert not healthy and "write error" in error, error

        # Still full: a restart would fail the same way, so the keeper waits.
        pid = server.process.pid if server.process else None
        await keeper.check()
        assert server.process is not None and server.process.pid == pid and not recorded
        filler.unlink()
        if server.health()[0]:
            # nats-server got over this write error by itself (seen now and then): nothing to do.
            await keeper.check()
            assert not recorded
        else:
            # The stream stays broken until the server restarts...
            with pytest.raises(Exception):  # noqa: B017
                await js.publish("t.x", b"after")
            # ... which the keeper does now.
            await keeper.check()
            assert server.process is not None and server.process.pid != pid
            assert [type_ for type_, _ in recorded] == ["service.restarted"]
        assert server.health() == (True, "")
        ack = await js.publish("t.x", b"after", timeout=10)
        assert ack.seq in (stored + 1, stored + 2)   # what was stored before the failure is still there
    finally:
        await nc.close()
        server.stop()
