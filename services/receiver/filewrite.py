"""Writing a received instance to a new file, large ones past the page cache (O_DIRECT).

Why: every instance is fsynced before the sender hears success, so its page-cache copy only helps
a reader that comes soon after. On the test VM (docs/performance.md, "Large images past the page
cache") copying a 530 KB CT image into new page-cache pages and flushing them cost 1.9-2.7 ms of
kernel time per image and grew with the page cache; written with O_DIRECT from a reused, aligned
buffer, 0.3-0.9 ms. Below ~256 KB the page cache was faster (the O_DIRECT write waits for the
device), so small instances are written as before.

The aligned head of the file goes out with O_DIRECT in 1 MiB chunks copied into an aligned buffer
(1 MiB chunks took 0.5 ms for a CT image, 256 KiB ones 0.8 ms: each O_DIRECT write waits for the
device); then O_DIRECT is cleared on the descriptor and the unaligned tail is written through the
page cache (the later fsync flushes it). The buffers come from a small pool shared by all
associations, so memory stays bounded however many are open; when all are in use, the instance is
written through the page cache. Where O_DIRECT is not supported (tmpfs, some network filesystems: EINVAL
at open or at the first write) the writer falls back to plain writes for the rest of the process.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import queue
from pathlib import Path

log = logging.getLogger(__name__)

DIRECT_MIN_BYTES = 256 * 1024
# Offsets, lengths and the buffer address must be multiples of the device's logical block size;
# 4096 is a multiple of every common one (512, 4096).
ALIGN = 4096
CHUNK = 1024 * 1024
BUFFERS = 8
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class FileWriter:
    def __init__(self, direct_io: bool = True) -> None:
        self.direct_io = direct_io and bool(_O_DIRECT)
        self._buffers: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(BUFFERS if self.direct_io else 0):
            # Anonymous mappings are page aligned, and take memory only once written to.
            self._buffers.put(mmap.mmap(-1, CHUNK))

    def write_new(self, path: Path, data: bytes | memoryview) -> int:
        """Create `path` (it must not exist) holding `data`; returns the open descriptor, not fsynced.

        On failure the partly written file is removed and the error raised.
        """
        view = memoryview(data)
        head = len(view) // ALIGN * ALIGN if self.direct_io and len(view) >= DIRECT_MIN_BYTES else 0
        buffer = self._take_buffer() if head else None  # None: all in use, or a small instance
        try:
            fd, direct = self._open(path, direct=buffer is not None)
            try:
                written = self._write_direct(fd, view[:head], buffer) if direct and buffer else 0
                if direct:
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
                while written < len(view):
                    written += os.write(fd, view[written:])
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        finally:
            if buffer is not None:
                self._buffers.put(buffer)
        return fd

    def _open(self, path: Path, direct: bool) -> tuple[int, bool]:
        """The new file's descriptor, and whether it was opened with O_DIRECT."""
        if direct:
            try:
                return os.open(path, _CREATE | _O_DIRECT, 0o644), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._give_up_direct(path, exc)
        return os.open(path, _CREATE, 0o644), False

    def _write_direct(self, fd: int, view: memoryview, buffer: mmap.mmap) -> int:
        """Write `view` (a multiple of ALIGN long) with O_DIRECT; returns how much was written."""
        done = 0
        while done < len(view):
            size = min(CHUNK, len(view) - done)
            buffer[:size] = view[done:done + size]
            try:
                count = os.write(fd, memoryview(buffer)[:size])
            except OSError as exc:
                if exc.errno != errno.EINVAL or done:
                    raise
                self._give_up_direct(None, exc)  # the file is still empty: plain writes from here
                return 0
            done += count
            if count < size:  # short write (disk nearly full): the plain loop finishes or raises
                break
        return done

    def _take_buffer(self) -> mmap.mmap | None:
        try:
            return self._buffers.get_nowait()
        except queue.Empty:
            return None

    def _give_up_direct(self, path: Path | None, exc: OSError) -> None:
        if self.direct_io:
            log.info("O_DIRECT not supported for the blob store (%s): writing through the page cache",
                     exc, extra={"path": str(path) if path else None})
        self.direct_io = False
