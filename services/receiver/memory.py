"""Give the allocator's free memory back to the system once a burst of images is over.

Why: every received instance passes through buffers of its own size (tens of KB for MR, ~0.5 MB
for CT) on several threads. Python frees them, but glibc's malloc keeps most of the freed memory
for later use, fragmented over its per-thread arenas. In a 60 000-image soak run
(docs/performance.md, "Soak") each receiver process held 12-18 MB of such slack, and it moved
from burst to burst, so RSS drifted up to 188 MB for the receiver's two processes while the live
memory stayed flat. `malloc_trim(0)` returns it (measured: 93.6 -> 75.0 MB in one process).

Trimming walks the arenas while holding their locks, so it is done only when nothing is going on:
no open association in this process and nothing left to apply in its journal, and only once per
burst (after at least one association since the last trim).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

from shared.libc import LIBC

log = logging.getLogger("caduceus.receiver.memory")

CHECK_SECONDS = 5.0
# mallopt(3) parameter (<malloc.h>).
M_ARENA_MAX = -8
ARENAS = 2


def share_arenas(arenas: int = ARENAS) -> bool:
    """Have glibc's malloc serve all of this process's threads from at most `arenas` arenas, so
    that memory one thread freed is reused by the others; False where that cannot be set (not
    glibc, or MALLOC_ARENA_MAX set in the environment, which then rules).

    Why: glibc gives each thread that allocates at once with another an arena of its own (up to 8
    per core) and keeps what is freed in it for that arena. Each association thread that stored an
    instance of tens of MB kept that much for itself: 8 senders of 24 MB instances took a receiver
    process +158 to +284 MB although the memory budget (spool.MemoryBudget) held its data sets to
    128 MB; with 2 arenas +112 to +145 MB (1: +90 to +111). Python allocates almost only while it
    holds the GIL, so threads hardly ever wait for an arena. (Mapping large blocks on their own,
    mallopt's M_MMAP_THRESHOLD, bounded it too, but every 24 MB join then faulted its pages in
    anew: 11 ms instead of 1.)
    """
    if LIBC is None or not hasattr(LIBC, "mallopt") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(LIBC.mallopt(M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Return the allocator's free memory to the system; False where that is not possible."""
    if LIBC is None or not hasattr(LIBC, "malloc_trim"):   # not glibc (musl has none)
        return False
    LIBC.malloc_trim(ctypes.c_size_t(0))
    return True


class IdleTrim:
    """A daemon thread: after each burst of associations, once idle, release free memory once."""

    def __init__(self, associations_seen: Callable[[], int], busy: Callable[[], bool],
                 release: Callable[[], bool] = release_free_memory, interval: float = CHECK_SECONDS) -> None:
        self.associations_seen = associations_seen
        self.busy = busy
        self.release = release
        self.interval = interval
        self.releases = 0
        self._trimmed_after = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receiver-idle-trim", daemon=True)

    def start(self) -> IdleTrim:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 1)

    def check(self) -> bool:
        """Release now if there was an association since the last release and all is quiet."""
        seen = self.associations_seen()
        if seen == self._trimmed_after or self.busy():
            return False
        self._trimmed_after = seen
        if self.release():
            self.releases += 1
            return True
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - memory housekeeping must never take the receiver down
                log.exception("releasing free memory failed")
