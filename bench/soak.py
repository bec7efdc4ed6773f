"""Soak benchmark: does anything grow with the work done, round after round, in one long run?

    python -m bench.soak [--rounds 10] [--series 20] [--per-series 100] [--size 128] [--senders 2]
                         [--quiet 1] [--smoke] [--json FILE]

Caduceus runs unattended for years, so whatever a service keeps per image, per series or per
association must be let go again. This starts one `caduceus up` (all seven services, route-all
rule to a DCMTK storescp) and sends `--rounds` rounds of new MR series (new UIDs every round, the
generator of bench/memory.py). After each round, once every image is at the destination and the
bookkeeper has stored every event, and after `--settle` seconds, it reads for every service (the
sum over its processes: receiver workers count with the receiver) the RSS, the open file
descriptors and the threads, and the size of each part of the data directory.

What it prints: one table per quantity, a column per round; then, per service, the growth over the
second half of the rounds and the RSS slope over them (least squares, KB per 1000 images). The
first half is warm-up: caches, pools and allocator arenas fill, and nats-server keeps the message
ids of the last 120 s for de-duplication (the EVENTS stream's duplicate window), so its memory
rises for the first two minutes of steady traffic whatever happens after; give the run more than
four minutes (the defaults take about ten). A service is flagged "GROWS" when its file
descriptors or threads went up in the second half, or its RSS slope is above --max-kb-per-1000
(default 100 KB per 1000 images: 100 MB per million images). RSS includes the allocator's slack
(memory freed by Python but kept by malloc, which moves with fragmentation from round to round),
so a flag means "look closer", not "leak": docs/performance.md, "Soak", shows how (a census of
the live Python objects, and `malloc_trim` to see what is slack). The blob store and the event log
grow by design (the retention period and the append-only log); their cost per image is printed,
not judged. The receiver's journal must not grow by more than one segment in the second half (its
segments are reused once checkpointed).
--smoke: 3 rounds of 2 series x 5 images of 64x64, only the machinery is checked (CI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.common import start_storescp
from bench.memory import make_mr_series, named_processes, wait_bookkeeper
from bench.pipeline import Caduceus, route_all_config, start_caduceus, wait_for_files
from shared.settings import Settings

MB = 1024 * 1024
DATA_PARTS = ("blobs", "journal", "nats", "logs", "bookkeeper.sqlite")


@dataclass
class ServiceSample:
    rss_mb: float = 0.0
    fds: int = 0
    threads: int = 0
    processes: int = 0


@dataclass
class Round:
    images: int                                   # images sent since the start, this round included
    seconds: float
    services: dict[str, ServiceSample] = field(default_factory=dict)
    disk_mb: dict[str, float] = field(default_factory=dict)


def sample_services(root_pid: int) -> dict[str, ServiceSample]:
    """RSS, fds and threads of every process under `caduceus up`, summed per service."""
    procs = named_processes(psutil.Process(root_pid), {})
    if not procs:
        raise RuntimeError("caduceus up has exited")
    found: dict[str, ServiceSample] = {}
    for proc, name in procs:
        try:
            with proc.oneshot():
                rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        sample = found.setdefault(name, ServiceSample())
        sample.rss_mb += rss / MB
        sample.fds += fds
        sample.threads += threads
        sample.processes += 1
    return found


def disk_usage_mb(data_dir: Path) -> dict[str, float]:
    """Bytes on disk (allocated blocks) of each part of the data directory, in MB."""
    usage: dict[str, float] = {}
    for part in DATA_PARTS:
        path = data_dir / part
        if path.is_file():
            files = [path, *path.parent.glob(path.name + "-*")]   # SQLite's -wal and -shm
        elif path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
        else:
            files = []
        total = 0
        for item in files:
            try:
                total += item.stat().st_blocks * 512
            except FileNotFoundError:
                continue
        usage[part] = total / MB
    return usage


def slope_per_1000(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, times 1000 (a change per 1000 images)."""
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return 1000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


@dataclass
class Verdict:
    service: str
    rss_growth_mb: float
    rss_kb_per_1000: float
    fds_growth: int
    threads_growth: int
    grows: bool


def second_half(rounds: list[Round]) -> list[Round]:
    """From the middle round on (rounds 2-3 of 3, 5-10 of 10); all of them when there are two or one."""
    return rounds[(len(rounds) - 1) // 2:] if len(rounds) > 2 else rounds


def judge(rounds: list[Round], max_kb_per_1000: float) -> list[Verdict]:
    """Growth over the second half of the rounds (the first half is warm-up)."""
    judged = second_half(rounds)
    first, last = judged[0], judged[-1]
    verdicts = []
    for name in sorted(last.services):
        if name not in first.services or not all(name in r.services for r in judged):
            continue
        rss = [r.services[name].rss_mb for r in judged]
        kb_slope = slope_per_1000([r.images for r in judged], rss) * 1024
        fds = last.services[name].fds - first.services[name].fds
        threads = last.services[name].threads - first.services[name].threads
        grows = kb_slope > max_kb_per_1000 or fds > 0 or threads > 0
        verdicts.append(Verdict(name, rss[-1] - rss[0], kb_slope, fds, threads, grows))
    return verdicts


def print_report(rounds: list[Round], verdicts: list[Verdict], segment_mb: float, smoke: bool) -> None:
    names = sorted({n for r in rounds for n in r.services})
    header = f"{'':26s}" + "".join(f"{'round ' + str(i + 1):>10s}" for i in range(len(rounds)))
    print(f"\nimages sent so far: {', '.join(str(r.images) for r in rounds)}")
    print("seconds per round:  " + ", ".join(f"{r.seconds:.1f}" for r in rounds))
    for title, value in (("RSS MB", lambda s: f"{s.rss_mb:10.1f}"), ("open fds", lambda s: f"{s.fds:10d}"),
                         ("threads", lambda s: f"{s.threads:10d}")):
        print(f"\n{title}\n{header}")
        for name in names:
            cells = "".join(value(r.services[name]) if name in r.services else f"{'-':>10s}" for r in rounds)
            print(f"{name:26s}{cells}")
    print(f"\ndata directory, MB on disk\n{header}")
    for part in DATA_PARTS:
        print(f"{part:26s}" + "".join(f"{r.disk_mb.get(part, 0.0):10.1f}" for r in rounds))
    first, last = rounds[0], rounds[-1]
    added = max(last.images - first.images, 1)
    for part in ("blobs", "bookkeeper.sqlite", "nats"):
        grown = last.disk_mb.get(part, 0.0) - first.disk_mb.get(part, 0.0)
        print(f"{part}: {grown * 1024 / added:.1f} KB per image after round 1 (grows by design)")
    judged = second_half(rounds)
    journal_growth = judged[-1].disk_mb.get("journal", 0.0) - judged[0].disk_mb.get("journal", 0.0)
    # Segments are created when needed and reused once checkpointed: after the first rounds the
    # journal should not need another one.
    print(f"journal: {judged[0].disk_mb.get('journal', 0.0):.1f} MB after round {len(rounds) - len(judged) + 1}, "
          f"{judged[-1].disk_mb.get('journal', 0.0):.1f} MB at the end: "
          f"{'bounded' if journal_growth <= segment_mb else 'GROWS'}")
    print(f"\ngrowth over rounds {len(rounds) - len(judged) + 1}-{len(rounds)}")
    print(f"{'service':26s} {'RSS growth MB':>14s} {'KB/1000 img':>12s} {'fds':>5s} {'threads':>8s}")
    for v in verdicts:
        print(f"{v.service:26s} {v.rss_growth_mb:14.1f} {v.rss_kb_per_1000:12.1f} {v.fds_growth:+5d} "
              f"{v.threads_growth:+8d}  {'GROWS' if v.grows else 'bounded'}")
    growing = [v.service for v in verdicts if v.grows]
    print(f"services that grow with the work: {', '.join(growing) if growing else 'none'}", flush=True)
    if smoke:
        print("(smoke sizes: a few images per round say nothing about growth; the verdicts are not meaningful)")


def run_round(cad: Caduceus, work: Path, dest_dir: Path, index: int, args: argparse.Namespace) -> float:
    """Send one round of new series; return when all are delivered and recorded."""
    source = work / f"round-{index:03d}"
    dirs = make_mr_series(source, args.series, args.per_series, args.size)
    groups = [dirs[i::args.senders] for i in range(args.senders)]
    count = args.series * args.per_series
    start = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(lambda group: cad.send(list(group)), [g for g in groups if g]))
    wait_for_files(dest_dir, count, timeout=300 + count)
    wait_bookkeeper(cad, timeout=300)
    seconds = time.perf_counter() - start
    shutil.rmtree(source)
    for item in dest_dir.iterdir():   # the destination keeps only what this round still has to deliver
        if item.is_file():
            item.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--per-series", type=int, default=100)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--senders", type=int, default=2, help="concurrent storescu processes")
    parser.add_argument("--quiet", type=float, default=1.0, help="settings.series_complete_seconds")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after a round before sampling")
    parser.add_argument("--max-kb-per-1000", type=float, default=100.0,
                        help="RSS slope above which a service is flagged")
    parser.add_argument("--smoke", action="store_true", help="3 rounds of 2 series x 5 images of 64x64")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rounds and verdicts here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.series, args.per_series, args.size, args.settle = 3, 2, 5, 64, 1.0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    config = route_all_config(0, args.quiet)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="caduceus-soak-", dir=args.workdir) as tmp:
        work = Path(tmp)
        dest = start_storescp(work / "dest")
        config["targets"]["dest"]["port"] = dest.port
        cad = start_caduceus(work / "caduceus", config)
        dest_dir: Path = dest.extra["dir"]  # type: ignore[assignment]
        try:
            print(f"{args.rounds} rounds of {args.series} MR series x {args.per_series} images of "
                  f"{args.size}x{args.size}, {args.senders} senders", flush=True)
            for index in range(args.rounds):
                seconds = run_round(cad, work, dest_dir, index, args)
                time.sleep(args.settle)
                images = (index + 1) * args.series * args.per_series
                rounds.append(Round(images, seconds, sample_services(cad.process.pid), disk_usage_mb(cad.data_dir)))
                print(f"round {index + 1}: {images} images in all, this round {seconds:.1f} s", flush=True)
        finally:
            cad.stop()
            dest.stop()
    verdicts = judge(rounds, args.max_kb_per_1000)
    print_report(rounds, verdicts, float(Settings().receiver_journal_segment_mb), args.smoke)
    if args.json:
        args.json.write_text(json.dumps({
            "rounds": [{"images": r.images, "seconds": r.seconds, "disk_mb": r.disk_mb,
                        "services": {n: vars(s) for n, s in r.services.items()}} for r in rounds],
            "verdicts": [vars(v) for v in verdicts]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
