"""The services' log files under `caduceus up`: fed from the children's output, rotated by size.

Why: `caduceus up` runs unattended for years. A log file the children append to directly can only
grow, until it fills the data disk, and a full data disk makes the receiver refuse every image
(0xA700). So each child writes into a pipe and the launcher copies what arrives into
`<name>.log`; once that file reaches `CADUCEUS_LOG_MAX_MB` it becomes `<name>.log.1` (the older
ones shift up to `<name>.log.<CADUCEUS_LOG_FILES_KEPT>`, the oldest is dropped) and a new
`<name>.log` begins. A file is only ever cut after a complete line.

A write that fails (disk full) drops that output, counts it, and says so once in the launcher's own
log: the pipe must keep being drained, or a child writing a log line would block, and with it
whatever it was doing. For the same reason each pipe is given 1 MB of room (64 KB is Linux's
default): a launcher that cannot read for a while (suspended from a terminal with Ctrl-Z, say)
holds up a service only once that much of its output is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("caduceus.logfiles")

READ_CHUNK = 64 * 1024
PIPE_BYTES = 1024 * 1024   # /proc/sys/fs/pipe-max-size allows this much by default


class RotatingLog:
    """`path`, `path.1` ... `path.<keep>`: each file ends after a whole line, at most one line past
    `max_bytes` (unless one read brought more lines than that; output without line ends is cut at
    twice `max_bytes`)."""

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        if max_bytes < 1 or keep < 1:
            raise ValueError("max_bytes and keep must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.dropped_bytes = 0
        self._file: BinaryIO | None = None
        self._size = 0
        self._at_line_start = True

    def write(self, chunk: bytes) -> None:
        """Append `chunk`; rotate first when its complete lines would not fit in the current file
        (after finishing the line the file ends in, if it ends mid-line)."""
        try:
            self._open()
            if self._size and self._size + chunk.rfind(b"\n") + 1 > self.max_bytes and b"\n" in chunk:
                finish = 0 if self._at_line_start else chunk.index(b"\n") + 1
                self._append(chunk[:finish])
                self._rotate()
                chunk = chunk[finish:]
            if chunk:
                self._append(chunk)
            if self._size > 2 * self.max_bytes:   # output without line ends: cut it anyway
                self._rotate()
        except OSError as exc:
            if not self.dropped_bytes:
                log.error("cannot write %s (%s): its output is dropped until writing works again", self.path, exc)
            self.dropped_bytes += len(chunk)
            self.close()   # reopened, and its size read again, at the next write

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def _open(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open between writes
            self._size = os.fstat(self._file.fileno()).st_size
            self._at_line_start = self._size == 0 or _last_byte(self.path) == b"\n"
            if self.dropped_bytes:
                log.warning("writing %s again (%d bytes of output were dropped)", self.path, self.dropped_bytes)
                self.dropped_bytes = 0

    def _append(self, data: bytes) -> None:
        assert self._file is not None
        if data:
            self._file.write(data)
            self._size += len(data)
            self._at_line_start = data.endswith(b"\n")

    def _rotate(self) -> None:
        self.close()
        for index in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


async def log_pipe(target: RotatingLog) -> tuple[int, asyncio.Task[None]]:
    """A pipe for a child's output: returns its write end (to pass to the child, then close) and
    the task that copies what arrives into `target` until every writer has closed the pipe.

    Why not `stdout=PIPE`: on Python 3.11 asyncio's `Process.wait()` returns only once the
    process's pipes are closed, so a grandchild that inherited one (a receiver worker finishing
    its drain after the receiver was killed) would hold back the restart. This pipe is not the
    process transport's, so `wait()` returns when the child exits."""
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):   # a lower pipe-max-size: the default room then
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    reader = asyncio.StreamReader(limit=READ_CHUNK)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(read_fd, "rb", buffering=0))
    except BaseException:
        os.close(write_fd)
        raise
    return write_fd, asyncio.create_task(_copy(reader, transport, target))


async def _copy(reader: asyncio.StreamReader, transport: asyncio.ReadTransport, target: RotatingLog) -> None:
    try:
        while chunk := await reader.read(READ_CHUNK):
            target.write(chunk)
    finally:
        transport.close()
