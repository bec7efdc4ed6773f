"""The --smoke modes of the benchmarks (bench/e2e.py, bench/growth.py, bench/memory.py, bench/soak.py,
bench/store_path.py).

Each runs end to end on tiny inputs through a real `caduceus up`, real DCMTK storescu/storescp and
(growth) a real Postgres, and must print its ratio / growth lines. The numbers are not checked
against the targets: smoke sizes measure fixed costs, not throughput.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_bench(module: str, tmp_path: Path, *extra: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", "--workdir", str(tmp_path), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} --smoke failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_e2e_smoke_prints_ratios_and_hops(tmp_path: Path) -> None:
    out = run_bench("bench.e2e", tmp_path, "--senders", "1,2")
    for k, label in ((1, "1 sender"), (2, "2 senders")):
        match = re.search(rf"^ratio caduceus/direct \({label}\): (\d+\.\d+)", out, re.M)
        assert match, out
        assert float(match.group(1)) > 0
        assert re.search(rf"^caduceus  {k} sender\(s\) +{5 * k} images", out, re.M), out
    hops = re.search(r"hop split \(1 sender\(s\)\): receive=([\d.]+)s +router=([-\d.]+)s +decide=([-\d.]+)s "
                     r"+dispatch=([\d.]+)s", out)
    assert hops, out  # every hop came from real events (a missing event would print nan)


def test_growth_smoke_prints_growth_factors(tmp_path: Path) -> None:
    out = run_bench("bench.growth", tmp_path, timeout=180)
    assert re.search(r"^series +1 x 10 images: .* ms per series", out, re.M), out
    assert re.search(r"^series +5 x 10 images: .* ms per series", out, re.M), out
    assert re.search(r"^growth series 1 -> 5 \(x5\): time per series x\d+\.\d+", out, re.M), out
    assert re.search(r"^rules +11 \(route-all \+ 10 non-matching\): decision median", out, re.M), out
    assert re.search(r"^growth rules 1 -> 11 \(x11\): decision time x\d+\.\d+", out, re.M), out
    assert re.search(r"^events +2400 \(100 series\): COPY .* rebuild .* series page", out, re.M), out
    for label in ("rebuild time", "series page latency", "series search latency"):
        assert re.search(rf"^growth events \({label}\) 240 -> 2400 .*x\d+\.\d+", out, re.M), out


def test_memory_smoke_prints_table(tmp_path: Path) -> None:
    out = run_bench("bench.memory", tmp_path)
    assert "50 images through caduceus" in out, out
    for service in ("receiver", "router", "dispatcher", "bookkeeper", "processor", "cleaner", "ui"):
        row = re.search(rf"^{service} +(\d+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +(ok|OVER)$", out, re.M)
        assert row, f"{service} missing from the table:\n{out}"
        assert int(row.group(1)) >= 1 and float(row.group(3)) > 10  # real Python processes were sampled
        assert 0 < float(row.group(5)) <= float(row.group(3))  # PSS: shared pages counted once
    assert re.search(r"^ratio worst service peak / goal: \d+\.\d+", out, re.M), out


def test_soak_smoke_samples_every_round(tmp_path: Path) -> None:
    out = run_bench("bench.soak", tmp_path, timeout=180)
    assert re.search(r"^images sent so far: 10, 20, 30$", out, re.M), out
    for service in ("receiver", "router", "dispatcher", "bookkeeper", "processor", "cleaner", "ui"):
        rss = re.search(rf"^{service} +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
        assert rss and all(float(v) > 10 for v in rss.groups()), f"{service}: no RSS in every round:\n{out}"
        verdict = re.search(rf"^{service} +-?[\d.]+ +-?[\d.]+ +[+-]\d+ +[+-]\d+  (bounded|GROWS)$", out, re.M)
        assert verdict, f"{service}: no verdict:\n{out}"
    blobs = re.search(r"^blobs +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert blobs and float(blobs.group(1)) < float(blobs.group(3)), out  # the retained images were counted
    assert re.search(r"^journal: [\d.]+ MB after round 2, [\d.]+ MB at the end: (bounded|GROWS)$", out, re.M), out
    assert re.search(r"^services that grow with the work: ", out, re.M), out


def test_store_path_smoke_prints_per_image_costs(tmp_path: Path) -> None:
    out = run_bench("bench.store_path", tmp_path)
    for name in ("pydicom dcmread", "header (extract_tags)", "store (journaled)"):
        row = re.search(rf"^{re.escape(name)} +([\d.]+) us wall +([\d.]+) us user CPU", out, re.M)
        assert row, out
        assert float(row.group(1)) > 0
    # (User CPU is counted in clock ticks: ten images may measure 0 for the reference, then "n/a".)
    assert re.search(r"^ratio header / pydicom dcmread \(CPU\): (\d+\.\d+|n/a)", out, re.M), out
