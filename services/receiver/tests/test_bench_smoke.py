"""`python -m bench.ingest --smoke` runs end to end and reports its ratios (targets are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_ingest_benchmark_smoke(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.ingest", "--smoke", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caduceus/storescp 1: " in proc.stdout
    assert "speed-up 2/1: " in proc.stdout
    assert "image.received events: 30 (expected 30)" in proc.stdout
