"""Memory benchmark: peak RSS of every caduceus process during a run of small MR images.

    python -m bench.memory [--series 20] [--per-series 100] [--size 128] [--senders 2] [--smoke]

Generates series of MR-like images (pydicom's MR_small header, Modality MR, MR Image Storage,
--size x --size 16-bit pixels, new UIDs), starts `caduceus up` with a route-all rule to a DCMTK
storescp, and samples the RSS of every child process of `caduceus up` with psutil every 0.1 s
while --senders storescu processes send the series, until every image is at the destination and
the bookkeeper has stored every event. Prints a table: RSS when idle before the run, peak, and at
the end, per service (the sum of its processes at each sample: receiver workers count with the
receiver), against the 200 MB goal per service, and the peak PSS beside it. The goal is judged on
RSS; PSS (proportional set size: each shared page divided among the processes that map it) counts
the pages every Python process here maps from the same files (libpython, extension modules) only
once across them, where RSS counts them in full in every process, twice in the receiver's sum.
--smoke: 5 series of 10 images of 64x64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import set_aside, start_storescp
from bench.pipeline import Caduceus, route_all_config, start_caduceus, wait_for_files
from shared.bus import Bus
from shared.health import collect_health

GOAL_MB = 200.0
MB = 1024 * 1024


def make_mr_series(out: Path, series: int, per_series: int, size: int) -> list[Path]:
    """Series of MR images; returns one directory per series."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    base = dcmread(str(get_testdata_file("MR_small.dcm")))
    mr_storage = UID("1.2.840.10008.5.1.4.1.1.4")
    pixels = bytes((i * 7919) % 251 for i in range(size * size * 2))
    dirs = []
    for s in range(series):
        directory = out / f"mr-{s:03d}"
        directory.mkdir(parents=True)
        study, series_uid = generate_uid(), generate_uid()
        for i in range(per_series):
            ds = base.copy()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = mr_storage
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
            ds.Modality = "MR"
            ds.SeriesDescription = f"T2 AXIAL {s}"
            ds.PatientID, ds.PatientName = f"MEM{s:05d}", f"MEMORY^{s:03d}"
            ds.SeriesNumber, ds.InstanceNumber = s + 1, i + 1
            ds.Rows = ds.Columns = size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.PixelData = pixels
            ds.save_as(directory / f"{i:05d}.dcm", enforce_file_format=True)
        dirs.append(directory)
    return dirs


@dataclass
class Usage:
    name: str
    pids: set[int] = field(default_factory=set)
    idle: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    peak_pss: float = 0.0


def process_name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""
    if "-m" in cmd and cmd.index("-m") + 1 < len(cmd) and cmd[cmd.index("-m") + 1].startswith("services."):
        return cmd[cmd.index("-m") + 1].split(".", 1)[1]
    if cmd and cmd[0].endswith("nats-server"):
        return "nats-server"
    return Path(cmd[0]).name if cmd else ""


SUPERVISOR = "caduceus up (supervisor)"


def named_processes(root: psutil.Process, names: dict[int, str]) -> list[tuple[psutil.Process, str]]:
    """`caduceus up` and all its descendants, each with its service name (kept in `names` by pid:
    reading command lines at every sample would slow the sampling down); [] once it has exited."""
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for child in children:
        if child.pid not in names:
            names[child.pid] = process_name(child)
    return [(root, SUPERVISOR), *((child, names[child.pid]) for child in children)]


class Sampler:
    """RSS of `caduceus up` and all its descendants, every `interval` seconds, in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.usage: dict[str, Usage] = {}
        self.names: dict[int, str] = {}   # reading cmdline every 0.1 s would slow the sampling down
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> dict[str, float]:
        found: dict[str, float] = {}
        pss: dict[str, float] = {}
        procs = named_processes(self.root, self.names)
        if not procs:
            return found
        for proc, name in procs:
            try:
                rss = proc.memory_info().rss / MB
                proportional = _pss(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            self.usage.setdefault(name, Usage(name)).pids.add(proc.pid)
            found[name] = found.get(name, 0.0) + rss
            pss[name] = pss.get(name, 0.0) + proportional
        # A service with several processes (receiver workers) counts as their sum at each sample.
        for name, rss in found.items():
            self.usage[name].peak = max(self.usage[name].peak, rss)
            self.usage[name].peak_pss = max(self.usage[name].peak_pss, pss[name])
        self.samples += 1
        return found

    def start(self) -> None:
        for name, rss in self.snapshot().items():
            self.usage[name].idle = rss
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.snapshot()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for name, rss in self.snapshot().items():
            self.usage[name].end = rss


def _pss(proc: psutil.Process) -> float:
    """PSS in MB (Linux: /proc/PID/smaps_rollup); 0.0 where the platform does not report it."""
    return float(getattr(proc.memory_full_info(), "pss", 0.0)) / MB


def wait_bookkeeper(cad: Caduceus, timeout: float) -> None:
    """Until the bookkeeper's durable has nothing pending or unacknowledged."""
    async def run() -> None:
        bus = await Bus.connect(cad.nats_url, actor="bench", declare=False)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                report = await collect_health(bus)
                lag = [c for c in report.consumers if c.name == "bookkeeper-events"]
                if lag and lag[0].num_pending == 0 and lag[0].num_ack_pending == 0:
                    return
                await asyncio.sleep(0.2)
        finally:
            await bus.close()
        raise TimeoutError("bookkeeper did not catch up")

    asyncio.run(run())


def print_table(usage: dict[str, Usage], samples: int) -> None:
    print(f"{'service':26s} {'pids':>4s} {'idle MB':>8s} {'peak MB':>8s} {'end MB':>8s} {'peak PSS':>9s}"
          f"  goal < {GOAL_MB:.0f} MB (RSS)")
    for name in sorted(usage, key=lambda n: -usage[n].peak):
        u = usage[name]
        verdict = "ok" if u.peak < GOAL_MB else "OVER"
        print(f"{name:26s} {len(u.pids):4d} {u.idle:8.1f} {u.peak:8.1f} {u.end:8.1f} {u.peak_pss:9.1f}  {verdict}")
    services = [u for n, u in usage.items() if n not in (SUPERVISOR, "nats-server")]
    worst = max(services, key=lambda u: u.peak, default=None)
    if worst is not None:
        print(f"ratio worst service peak / goal: {worst.peak / GOAL_MB:.2f}  "
              f"({worst.name} {worst.peak:.1f} MB; {samples} samples)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--senders", type=int, default=2, help="concurrent storescu processes")
    parser.add_argument("--quiet", type=float, default=1.0, help="settings.series_complete_seconds")
    parser.add_argument("--smoke", action="store_true", help="5 series of 10 images of 64x64")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.series, args.per_series, args.size = 5, 10, 64
    total = args.series * args.per_series
    with tempfile.TemporaryDirectory(prefix="caduceus-memory-", dir=args.workdir) as tmp:
        work = Path(tmp)
        print(f"generating {args.series} MR series x {args.per_series} images of {args.size}x{args.size}", flush=True)
        dirs = make_mr_series(work / "mr", args.series, args.per_series, args.size)
        groups = [dirs[i::args.senders] for i in range(args.senders)]
        dest = start_storescp(work / "dest")
        cad = start_caduceus(work / "caduceus", route_all_config(dest.port, args.quiet))
        sampler = Sampler(cad.process.pid)
        try:
            set_aside(dest.extra["dir"])  # type: ignore[arg-type]
            sampler.start()
            start = time.perf_counter()
            with ThreadPoolExecutor(len(groups)) as pool:
                list(pool.map(lambda group: cad.send(list(group)), [g for g in groups if g]))
            wait_for_files(dest.extra["dir"], total, timeout=300 + total)  # type: ignore[arg-type]
            wait_bookkeeper(cad, timeout=300)
            seconds = time.perf_counter() - start
            sampler.stop()
        finally:
            cad.stop()
            dest.stop()
        print(f"{total} images through caduceus in {seconds:.1f} s ({args.senders} senders)")
        print_table(sampler.usage, sampler.samples)
        if args.json:
            args.json.write_text(json.dumps({n: {"idle": u.idle, "peak": u.peak, "end": u.end, "peak_pss": u.peak_pss}
                                             for n, u in sampler.usage.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
