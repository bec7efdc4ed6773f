"""The services' log files under `caduceus up` (cli/logfiles.py): rotated by size, never blocking.

RotatingLog on its own (cut after whole lines, the number of files kept, a disk that refuses
writes), then through the supervisor with real child processes: a chatty child's output ends up
rotated, and a crashed child whose grandchild still holds its output pipe is restarted at once.
The embedded nats-server rotates its own log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from cli.logfiles import RotatingLog
from cli.supervisor import ChildSpec, Supervisor, child_env
from shared.natsserver import EmbeddedNats


def log_files(path: Path) -> list[Path]:
    """Oldest first: path.<k> ... path.1, path."""
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return [*rotated, path] if path.exists() else rotated


def test_rotates_after_whole_lines_and_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "router.log"
    log = RotatingLog(path, max_bytes=1000, keep=3)
    lines = [f"line {i:05d} ".encode() + b"x" * 40 + b"\n" for i in range(400)]
    # Chunks that end mid-line, as pipe reads do.
    data = b"".join(lines)
    for start in range(0, len(data), 333):
        log.write(data[start:start + 333])
    log.close()

    files = log_files(path)
    assert [p.name for p in files] == ["router.log.3", "router.log.2", "router.log.1", "router.log"]
    for rotated in files[:-1]:
        content = rotated.read_bytes()
        assert content.endswith(b"\n") and 1000 - 52 <= len(content) <= 1000 + 52  # within a line
    kept = b"".join(p.read_bytes() for p in files)
    assert data.endswith(kept)  # nothing lost or reordered in what is kept, only the oldest dropped
    assert kept.startswith(b"line ")


def test_continues_an_existing_file_and_counts_its_size(tmp_path: Path) -> None:
    path = tmp_path / "ui.log"
    path.write_bytes(b"a" * 90 + b"\n")
    log = RotatingLog(path, max_bytes=100, keep=2)
    log.write(b"b" * 20 + b"\n")
    log.close()
    assert (tmp_path / "ui.log.1").read_bytes() == b"a" * 90 + b"\n"
    assert path.read_bytes() == b"b" * 20 + b"\n"


def test_a_file_left_mid_line_gets_its_line_finished_before_the_cut(tmp_path: Path) -> None:
    path = tmp_path / "cleaner.log"
    path.write_bytes(b"c" * 95)
    log = RotatingLog(path, max_bytes=100, keep=2)
    log.write(b"cc\nddd\n")
    log.close()
    assert (tmp_path / "cleaner.log.1").read_bytes() == b"c" * 97 + b"\n"
    assert path.read_bytes() == b"ddd\n"


def test_output_without_line_ends_is_cut_at_twice_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "noisy.log"
    log = RotatingLog(path, max_bytes=100, keep=5)
    for _ in range(10):
        log.write(b"z" * 50)
    log.close()
    assert all(len(p.read_bytes()) <= 250 for p in log_files(path))
    assert sum(len(p.read_bytes()) for p in log_files(path)) == 500


def test_a_failing_disk_drops_output_without_raising_and_recovers(tmp_path: Path) -> None:
    blocked = tmp_path / "logs"
    blocked.write_text("a file where the directory should be")
    log = RotatingLog(blocked / "receiver.log", max_bytes=1000, keep=2)
    log.write(b"lost line\n")
    log.write(b"another\n")
    assert log.dropped_bytes == len(b"lost line\n") + len(b"another\n")
    blocked.unlink()
    log.write(b"kept line\n")
    log.close()
    assert log.dropped_bytes == 0
    assert (blocked / "receiver.log").read_bytes() == b"kept line\n"


async def test_supervisor_rotates_a_chatty_childs_log(tmp_path: Path) -> None:
    log_file = tmp_path / "bookkeeper.log"
    script = "import sys\nfor i in range(3000): print(f'event {i:06d} ' + 'y' * 60)\nsys.stderr.write('done\\n')"
    spec = ChildSpec("bookkeeper", [sys.executable, "-c", script], child_env(dict(os.environ), {}), log_file)
    supervisor = Supervisor([spec], None, backoff_base=30, log_max_bytes=50_000, log_files_kept=2)
    await supervisor.start()
    deadline = time.monotonic() + 20
    while not supervisor.children["bookkeeper"].exits and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    supervisor.request_stop()
    await asyncio.wait_for(supervisor.wait(), 20)

    files = log_files(log_file)
    assert [p.name for p in files] == ["bookkeeper.log.2", "bookkeeper.log.1", "bookkeeper.log"]
    assert all(len(p.read_bytes()) <= 50_000 + 65536 for p in files)
    text = b"".join(p.read_bytes() for p in files).decode()
    assert text.rstrip().endswith("done")  # stderr comes through too, and the last lines are not lost
    assert f"event {2999:06d}" in text and f"event {0:06d}" not in text


async def test_crashed_child_is_restarted_while_a_grandchild_holds_its_output(tmp_path: Path) -> None:
    """A receiver killed while its workers drain: the workers keep the log pipe open."""
    pids = tmp_path / "grandchildren"
    script = ("import subprocess, sys; "
              "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
              f"open({str(pids)!r}, 'a').write(f'{{grandchild.pid}}\\n'); "
              "print('started a grandchild', flush=True); sys.exit(3)")
    log_file = tmp_path / "receiver.log"
    spec = ChildSpec("receiver", [sys.executable, "-c", script], child_env(dict(os.environ), {}), log_file)
    supervisor = Supervisor([spec], None, backoff_base=0.1, backoff_max=0.1, stable_after=60, grace=5)
    started = time.monotonic()
    await supervisor.start()
    try:
        while supervisor.children["receiver"].restarts < 2 and time.monotonic() - started < 15:
            await asyncio.sleep(0.05)
        assert supervisor.children["receiver"].restarts >= 2, "the exit was not noticed while the pipe was open"
        assert time.monotonic() - started < 10
    finally:
        supervisor.request_stop()
        await asyncio.wait_for(supervisor.wait(), 20)
        for pid in pids.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert "started a grandchild" in log_file.read_text()


def test_embedded_nats_rotates_its_own_log(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "nats.log"
    log_file.parent.mkdir()
    server = EmbeddedNats(tmp_path / "nats", log_file=log_file, log_max_bytes=600, log_files_kept=2).start()
    try:
        deadline = time.monotonic() + 10
        while not list(log_file.parent.glob("nats.log.2*")) and time.monotonic() < deadline:
            time.sleep(0.1)   # its startup banner alone is a few KB
    finally:
        server.stop()
    backups = list(log_file.parent.glob("nats.log.2*"))   # nats.log.<year>.<month>...
    assert 1 <= len(backups) <= 2, backups
    assert "Server is ready" in log_file.read_text() + "".join(p.read_text() for p in backups)
    assert all(p.stat().st_size < 600 + 500 for p in [log_file, *backups])


async def test_the_pipe_has_room_for_a_megabyte() -> None:
    """A launcher that cannot read for a moment does not hold up a service's next log lines."""
    import fcntl

    from cli.logfiles import PIPE_BYTES, log_pipe

    target = RotatingLog(Path(os.devnull), 10**9, 1)
    write_fd, task = await log_pipe(target)
    try:
        if hasattr(fcntl, "F_GETPIPE_SZ"):
            assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) >= PIPE_BYTES
    finally:
        os.close(write_fd)
        await asyncio.wait_for(task, 5)   # EOF ends the copying
