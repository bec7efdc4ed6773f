"""`python -m bench.dispatch --smoke` runs end to end and prints its ratios.

Real DCMTK storescu/storescp, a real nats-server and the dispatcher service; 5 small images, so
the numbers measure fixed costs and are not checked against the target (docs/performance.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_dispatch_bench_smoke_prints_ratios(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench.dispatch", "--smoke", "--workdir", str(tmp_path),
                           "--json", str(results)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"bench.dispatch --smoke failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    for label in ("sender/storescu", "service/storescu"):
        match = re.search(rf"^ratio {label} (\d+\.\d+)", proc.stdout, re.M)
        assert match, proc.stdout
        assert float(match.group(1)) > 0
    run = json.loads(results.read_text())["runs"][0]
    assert run["storescu"] > 0 and run["sender"] > 0 and run["service"] > 0
    # The working directory (series, blobs, storescp output, nats store) is removed afterwards.
    assert [p for p in tmp_path.iterdir() if p != results] == []
