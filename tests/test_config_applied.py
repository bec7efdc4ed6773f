"""`caduceus config apply` waits until the running services use the new configuration, and says
which do not: real service processes (the shared runtime) on a real nats-server, the CLI in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from shared import subjects
from shared.bus import Bus

REPO = Path(__file__).resolve().parent.parent
SERVICE = """
import sys
from shared.runtime import Service

class Named(Service):
    name = sys.argv[1]

Named().main()
"""
Cli = Callable[..., tuple[int, str, str]]


@contextlib.contextmanager
def service_process(nats_url: str, tmp_path: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A service process named `name` (the runtime only), heartbeat every 30 s, running when yielded."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    env = dict(os.environ, CADUCEUS_NATS_URL=nats_url, CADUCEUS_DATA_DIR=str(tmp_path),
               CADUCEUS_HEARTBEAT_SECONDS="30", CADUCEUS_INSTANCE=f"{name}-test")
    process = subprocess.Popen([sys.executable, str(script), name], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(_first_heartbeat(nats_url, name, process))
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
        process.kill()
        process.wait()


async def _first_heartbeat(nats_url: str, name: str, process: subprocess.Popen[bytes]) -> None:
    bus = await Bus.connect(nats_url, actor="test")
    try:
        deadline = time.monotonic() + 20
        while await bus.get_last_for_subject(subjects.STATUS_STREAM,
                                             subjects.status_subject(name, f"{name}-test")) is None:
            assert process.poll() is None, f"{name} exited with {process.returncode}"
            assert time.monotonic() < deadline, f"no heartbeat from {name}"
            await asyncio.sleep(0.05)
    finally:
        await bus.close()


def config_file(tmp_path: Path, retries: int) -> Path:
    path = tmp_path / f"config-{retries}.yaml"
    path.write_text(yaml.safe_dump({"settings": {"dispatch_retries": retries},
                                    "targets": {"pacs": {"type": "dicom", "host": "127.0.0.1", "port": 11113,
                                                         "called_aet": "PACS"}}}))
    return path


def test_apply_returns_once_the_running_services_use_it(cli: Cli, nats_url: str, tmp_path: Path) -> None:
    """Their heartbeat interval is 30 s: the confirmation comes from the heartbeat each publishes
    right after applying the change."""
    with service_process(nats_url, tmp_path / "r", "router"), service_process(nats_url, tmp_path / "d", "dispatcher"):
        started = time.monotonic()
        code, out, err = cli("config", "apply", str(config_file(tmp_path, 3)))
        took = time.monotonic() - started
        assert code == 0, out + err
        assert "configuration 2 in use by every running service (2 instance(s)" in out, out
        assert "  router      router-test" in out and "  dispatcher  dispatcher-test" in out
        assert out.count(" applied\n") == 2, out
        assert "not running: bookkeeper, cleaner, processor, receiver, ui" in out
        assert took < 10, f"{took:.1f} s"

        code, out, _ = cli("status")   # (1: five services missing)
        assert code == 1 and out.count("config 2") == 2, out


def test_apply_reports_a_hung_and_a_stopped_service_and_does_not_wait_for_ever(
        cli: Cli, nats_url: str, tmp_path: Path) -> None:
    with service_process(nats_url, tmp_path / "r", "router") as router, \
            service_process(nats_url, tmp_path / "d", "dispatcher") as dispatcher:
        assert cli("config", "apply", str(config_file(tmp_path, 3)))[0] == 0
        os.kill(dispatcher.pid, signal.SIGSTOP)   # alive, its last heartbeat fresh, applies nothing
        router.send_signal(signal.SIGTERM)        # a clean stop: its heartbeat goes with it
        assert router.wait(20) == 0

        started = time.monotonic()
        code, out, err = cli("config", "apply", str(config_file(tmp_path, 4)), "--wait", "1.5")
        took = time.monotonic() - started
        assert code == 5, out + err
        assert "NOT CONFIRMED: 1 of 1 running instance(s) did not report configuration 3 in use" in out, out
        assert "dispatcher-test" in out and "NOT APPLIED (still at 2;" in out
        assert "not running: bookkeeper, cleaner, processor, receiver, router, ui" in out
        assert 1.5 <= took < 10, f"{took:.1f} s"

        code, out, _ = cli("config", "apply", str(config_file(tmp_path, 5)), "--no-wait")
        assert code == 0 and "in use" not in out and "updated  settings/global" in out

        os.kill(dispatcher.pid, signal.SIGCONT)   # it catches up: the same file again confirms it
        code, out, err = cli("config", "apply", str(config_file(tmp_path, 5)))
        assert code == 0, out + err
        assert out.startswith("no changes\nconfiguration 4 in use by every running service (1 instance(s)"), out


def test_a_sequence_of_a_config_stream_replaced_since_is_not_taken_for_applied(
        cli: Cli, nats_url: str, tmp_path: Path) -> None:
    """The NATS store lost and the CONFIG stream declared again: it counts from 1 again. A service
    that still reports the old stream's sequence 4 has not applied the new stream's change 2 (it was
    reported applied); once its follower folded the new stream it reports the new stream's sequence."""
    with service_process(nats_url, tmp_path / "c", "cleaner") as cleaner:
        for retries in (3, 4, 5):
            assert cli("config", "apply", str(config_file(tmp_path, retries)))[0] == 0   # up to 4
        os.kill(cleaner.pid, signal.SIGSTOP)   # its heartbeat stays fresh and says: 4 (of the old stream)
        try:
            asyncio.run(_recreate_config_stream(nats_url))
            code, out, err = cli("config", "apply", str(config_file(tmp_path, 6)), "--wait", "1.5")
            assert code == 5, out + err
            assert "did not report configuration 2 in use" in out, out
            assert "NOT APPLIED (still at 4 of a CONFIG stream replaced since;" in out, out
        finally:
            os.kill(cleaner.pid, signal.SIGCONT)
        code, out, err = cli("config", "apply", str(config_file(tmp_path, 6)))
        assert code == 0, out + err
        assert out.startswith("no changes\nconfiguration 2 in use by every running service (1 instance(s)"), out
        beat = asyncio.run(_heartbeat(nats_url, "cleaner"))
        assert beat["config_seq"] == 2 and beat["config_stream"] == asyncio.run(_config_stream(nats_url))


async def _recreate_config_stream(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, actor="test")
    try:
        await bus.js.delete_stream(subjects.CONFIG_STREAM)
        await bus.declare_streams()
    finally:
        await bus.close()


async def _config_stream(nats_url: str) -> str:
    bus = await Bus.connect(nats_url, actor="test")
    try:
        created = (await bus.js.stream_info(subjects.CONFIG_STREAM)).created
        return created.isoformat() if created else ""
    finally:
        await bus.close()


async def _heartbeat(nats_url: str, name: str) -> dict:  # type: ignore[type-arg]
    bus = await Bus.connect(nats_url, actor="test")
    try:
        beat = await bus.get_last_for_subject(subjects.STATUS_STREAM, subjects.status_subject(name, f"{name}-test"))
        assert beat is not None
        return beat.payload
    finally:
        await bus.close()
