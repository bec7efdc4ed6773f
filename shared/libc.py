"""The C library, loaded once, for the few Linux calls the standard library does not wrap
(sync_file_range, syncfs, malloc_trim, prctl). None where there is no C library to load; callers
check `hasattr(LIBC, name)` too, since not every C library has every call (musl: no malloc_trim)."""

from __future__ import annotations

import ctypes
import ctypes.util

try:
    LIBC: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
except OSError:
    LIBC = None
