"""The receiver's per-image work without the network: header read and journaled store, in-process.

    python -m bench.store_path [--count 500] [--size 128] [--modality MR] [--repeat 5] [--callgrind]
                               [--data DIR] [--smoke]

Why: on the shared 2-core test VM a whole `bench.ingest` run varies by up to 2x from one run to the
next, which hides changes of a few percent in the receiver's Python. This benchmark runs the two
pieces of the C-STORE path that are the receiver's own CPU, on the same files, in one process:

- `header`: `shared.dicomtags.extract_tags` with the default tag list (what the receiver does for
  every instance), against the reference `pydicom.dcmread(stop_before_pixels=True)` of the same
  bytes: the ratio says how the fast reader compares with pydicom's own reader on this machine now.
- `store`: `Ingest.store` down the journaled path (the bytes appended to the journal and
  fdatasynced while a helper thread reads the tags, duplicate check, `image.received` built, the
  decision recorded), with the journal applier not running (since session 10 it serializes the
  event, so that is not counted here): wall and CPU (`getrusage`, user and system: neither counts
  the wait for the disk) per image.

Each figure is the best of `--repeat` passes. `--callgrind` runs the passes again under
`valgrind --tool=callgrind` (once with no image, once with all) and prints instructions per image:
a count that does not depend on the load of the machine (sha256 and crc32 are counted as valgrind
runs them, without the CPU's SHA instructions, so they weigh more there than on the machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydicom
from pydicom.filebase import DicomBytesIO

from bench.common import make_series
from services.receiver.applier import JournalApplier
from services.receiver.ingest import AssociationInfo, Ingest, LocalBlobWriter
from services.receiver.journal import Journal
from shared.blobstore import LocalBlobStore
from shared.config import SettingsItem
from shared.dicomtags import extract_tags
from shared.events import Event

TRANSFER_SYNTAX = "1.2.840.10008.1.2.1"


def load_series(data_dir: Path, count: int, size: int, modality: str) -> list[bytes]:
    series = data_dir / f"store-path-{modality}-{count}x{size}"
    marker = data_dir / f"{series.name}.complete"
    if not marker.exists():
        shutil.rmtree(series, ignore_errors=True)
        make_series(series, count, size, modality=modality)
        marker.write_text("")
    return [path.read_bytes() for path in sorted(series.iterdir())]


def best_per_image(setup: Callable[[], Callable[[], None]], images: int, repeat: int) -> tuple[float, float, float]:
    """(wall, user CPU, system CPU) microseconds per image, each the best of `repeat` passes;
    `setup()` is not timed and returns the pass to time."""
    best = [float("inf")] * 3
    for _ in range(repeat):
        run = setup()
        wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        sample = (time.perf_counter() - wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)
        best = [min(b, value / images * 1e6) for b, value in zip(best, sample, strict=True)]
    return best[0], best[1], best[2]


def new_ingest(work: Path, datas: list[bytes]) -> Ingest:
    """The receiver's Ingest with a journal in `work` whose first segment holds every image (so no
    segment is created during a pass); the applier is never started."""
    store = LocalBlobStore(work / "blobs")
    segment = max(1 << 20, sum(len(data) + 4096 for data in datas))
    journal = Journal(work / "journal", segment_bytes=segment, max_bytes=2 * segment)
    journal.open()
    applier = JournalApplier(journal, _never, _never, store, _never)
    settings = SettingsItem()
    return Ingest(LocalBlobWriter(store), _no_publish, lambda: settings, journal=applier,
                  journal_max_bytes=1 << 20)


def _never(*args: Any) -> Any:
    """The applier's file writer and publisher: the applier is not started."""
    raise AssertionError("the journal applier does not run here")


def _no_publish(event: Event, timeout: float) -> Future[int]:
    """The direct path's publisher: every image here takes the journaled path."""
    raise AssertionError("not on the journaled path")


def header_pass(datas: list[bytes], keywords: list[str]) -> None:
    for data in datas:
        extract_tags(data, keywords)


def pydicom_pass(datas: list[bytes]) -> None:
    for data in datas:
        pydicom.dcmread(DicomBytesIO(data), stop_before_pixels=True)


def store_setup(datas: list[bytes], root: Path) -> Callable[[], None]:
    """A pass storing every image once into a fresh store and journal (new to the receiver)."""
    ingest = new_ingest(Path(tempfile.mkdtemp(dir=root)), datas)
    assoc = AssociationInfo("bench", "STORESCU", "CADUCEUS", "127.0.0.1", 104)

    def run() -> None:
        try:
            for data in datas:
                status = ingest.store(assoc, data, TRANSFER_SYNTAX, "")
                if status != 0:
                    raise RuntimeError(f"Ingest.store answered 0x{status:04X}")
        finally:
            assert ingest.journal is not None
            ingest.journal.journal.close()
            ingest.helpers.shutdown()
    return run


def measure(datas: list[bytes], repeat: int, root: Path) -> dict[str, tuple[float, float, float]]:
    keywords = SettingsItem().extract_tags
    header_pass(datas[:5], keywords)  # warm the reader's caches, as for every image after a series' first
    return {
        "pydicom dcmread": best_per_image(lambda: lambda: pydicom_pass(datas), len(datas), repeat),
        "header (extract_tags)": best_per_image(lambda: lambda: header_pass(datas, keywords), len(datas), repeat),
        "store (journaled)": best_per_image(lambda: store_setup(datas, root), len(datas), repeat),
    }


def instructions(argv: list[str], count: int) -> int:
    """Instructions valgrind counts for this script run with --only-pass and `count` images."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
                          "-m", "bench.store_path", *argv, "--only-pass", "--count-used", str(count)],
                         capture_output=True, text=True, check=True)
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1].strip())
    raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--modality", default="MR")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--data", type=Path, default=None, help="keep (and reuse) the generated series here")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="10 images of 64x64, 2 passes")
    parser.add_argument("--only-pass", action="store_true", help=argparse.SUPPRESS)  # --callgrind's child
    parser.add_argument("--count-used", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.size, args.repeat = 10, 64, 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="caduceus-store-path-"))
    root.mkdir(parents=True, exist_ok=True)
    datas = load_series(args.data or root, args.count, args.size, args.modality)
    if args.only_pass:
        used = datas[:args.count_used]
        header_pass(datas[:1], SettingsItem().extract_tags)
        store_setup(datas[:1], root)()  # imports and first-use costs go into both counts
        run = store_setup(used, root)
        header_pass(used, SettingsItem().extract_tags)
        run()
        return 0
    print(f"{len(datas)} x {args.size}x{args.size} {args.modality} images, best of {args.repeat} passes "
          f"(load average {os.getloadavg()[0]:.2f})")
    results = measure(datas, args.repeat, root)
    for name, (wall, user, system) in results.items():
        print(f"{name:22s} {wall:8.1f} us wall {user:8.1f} us user CPU {system:8.1f} us system CPU per image")
    reference = results["pydicom dcmread"][1]
    for name, label in (("header (extract_tags)", "header"), ("store (journaled)", "store")):
        # User CPU is counted in clock ticks: a smoke run of a few images can measure 0 for it.
        ratio = f"{results[name][1] / reference:.2f}" if reference > 0 else "n/a (too few images to measure)"
        print(f"ratio {label} / pydicom dcmread (CPU): {ratio}")
    if args.callgrind:
        forwarded = ["--count", str(args.count), "--size", str(args.size), "--modality", args.modality,
                     "--workdir", str(root), "--data", str(args.data or root)]
        per_image = (instructions(forwarded, len(datas)) - instructions(forwarded, 0)) / len(datas)
        print(f"instructions per image (header + store, callgrind): {per_image / 1e6:.3f} M")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
