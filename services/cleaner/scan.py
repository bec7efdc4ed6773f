"""Count image blobs and those older than the retention period (no deletion here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ScanResult:
    total: int
    older: int
    older_bytes: int


def scan_blobs(root: Path, retention_days: float, now: float) -> ScanResult:
    """Walk `root`; a blob is 'older' when its mtime is more than retention_days before `now`."""
    cutoff = now - retention_days * 86400
    total = older = older_bytes = 0
    if not root.is_dir():
        return ScanResult(0, 0, 0)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # deleted while we walked
            total += 1
            if stat.st_mtime < cutoff:
                older += 1
                older_bytes += stat.st_size
    return ScanResult(total, older, older_bytes)
