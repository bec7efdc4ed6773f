"""Ingest benchmark: DCMTK storescp vs caduceus receiver (vs Orthanc) on the same files.

    python -m bench.ingest [--count 500] [--size 512] [--parallel 4] [--repeat 3] [--orthanc] [--smoke]
                           [--data DIR]

For each receiver: one storescu sends the whole series (time = storescu wall clock), then
`--parallel` storescu processes each send their own copy of the series at the same time (new
UIDs, so caduceus stores every instance). Prints seconds, images/s and the ratios the targets are
about: caduceus / storescp (target <= 2) and caduceus parallel speed-up (target >= 1.5).
`--repeat N` runs storescp and caduceus alternately N times (a fresh receiver, data directory and
nats-server each time) and reports every run's ratios and their medians: on a shared machine only
ratios from the same run mean something. `--data DIR` keeps the generated series there and reuses
them next time. `--smoke` uses 10 small images: it checks the machinery, not the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    Peer,
    SendResult,
    make_series,
    start_nats,
    start_orthanc,
    start_receiver,
    start_storescp,
    storescu,
)
from shared import subjects
from shared.bus import Bus

# storescp serves one association at a time: the other senders wait for their A-ASSOCIATE-AC
# longer than storescu's default 30 s ACSE timeout when the machine is busy.
SENDER_OPTIONS = ["-ta", "600"]


def send_parallel(port: int, dirs: list[Path], called_aet: str) -> tuple[float, list[SendResult]]:
    import time

    start = time.perf_counter()
    with ThreadPoolExecutor(len(dirs)) as pool:
        results = list(pool.map(lambda d: storescu(port, d, called_aet=called_aet, extra=SENDER_OPTIONS), dirs))
    return time.perf_counter() - start, results


def measure(name: str, start: Callable[[], Peer], called_aet: str, single: Path, many: list[Path],
            count: int) -> dict[str, float]:
    peer = start()
    try:
        one = storescu(peer.port, single, called_aet=called_aet, extra=SENDER_OPTIONS)
        if one.returncode != 0:
            raise RuntimeError(f"{name}: storescu failed: {one.output[-2000:]}\n{peer.log_text()[-2000:]}")
        total, results = send_parallel(peer.port, many, called_aet)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            raise RuntimeError(f"{name}: parallel storescu failed: {failed[0].output[-2000:]}")
    finally:
        peer.stop()
    images = count * len(many)
    row = {"single_s": one.seconds, "single_img_s": count / one.seconds,
           "parallel_s": total, "parallel_img_s": images / total}
    row["parallel_speedup"] = row["parallel_img_s"] / row["single_img_s"]
    print(f"{name:10s} 1 sender: {one.seconds:7.2f} s ({row['single_img_s']:6.0f} img/s)   "
          f"{len(many)} senders: {total:7.2f} s ({row['parallel_img_s']:6.0f} img/s, "
          f"x{row['parallel_speedup']:.2f})", flush=True)
    return row


async def count_received(nats_url: str) -> int:
    bus = await Bus.connect(nats_url, actor="bench", declare=False)
    try:
        info = await bus.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subjects.event_subject("image.received"))
        return sum((info.state.subjects or {}).values())
    finally:
        await bus.close()


def series(root: Path, name: str, count: int, size: int) -> Path:
    out = root / f"{name}-{count}x{size}"
    marker = root / f"{out.name}.complete"  # not inside: storescu sends every file of the directory
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        make_series(out, count, size)
        marker.write_text("")
    return out


def run_once(args: argparse.Namespace, work: Path, single: Path, many: list[Path], env: dict[str, str],
             run: int) -> dict[str, Any]:
    """storescp (optionally Orthanc), then caduceus with its own nats-server, on the same files."""
    results: dict[str, dict[str, float]] = {}
    results["storescp"] = measure("storescp", lambda: start_storescp(work / f"storescp-{run}"), "STORESCP",
                                  single, many, args.count)
    shutil.rmtree(work / f"storescp-{run}", ignore_errors=True)
    if args.orthanc:
        results["orthanc"] = measure("orthanc", lambda: start_orthanc(work / f"orthanc-{run}"), "ORTHANC",
                                     single, many, args.count)
        shutil.rmtree(work / f"orthanc-{run}", ignore_errors=True)
    nats = start_nats(work / f"natsrv-{run}")
    try:
        results["caduceus"] = measure(
            "caduceus", lambda: start_receiver(nats.url, work / f"caduceus-{run}", env=env), "CADUCEUS",
            single, many, args.count)
        events = asyncio.run(count_received(nats.url))
    finally:
        nats.stop()
    shutil.rmtree(work / f"caduceus-{run}", ignore_errors=True)
    shutil.rmtree(work / f"natsrv-{run}", ignore_errors=True)
    expected = args.count * (1 + args.parallel)
    ratio = results["caduceus"]["single_s"] / results["storescp"]["single_s"]
    speedup = results["caduceus"]["parallel_speedup"]
    print(f"run {run}: image.received events: {events} (expected {expected}); "
          f"ratio caduceus/storescp (1 sender): {ratio:.2f}; caduceus parallel speed-up: {speedup:.2f}", flush=True)
    return {"results": results, "ratio": ratio, "speedup": speedup, "events": events, "expected_events": expected}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="alternate storescp/caduceus runs, report medians")
    parser.add_argument("--orthanc", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="10 images of 64x64: a quick check of the machinery")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None, help="keep (and reuse) the generated series here")
    parser.add_argument("--no-fastpath", action="store_true", help="receiver without the polling-loop replacements")
    parser.add_argument("--no-fsync", action="store_true", help="(measurement only) receiver without fsync")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the receiver (e.g. CADUCEUS_RECEIVER_WORKERS=1)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.size, args.parallel = 10, 64, 2
    env = dict(item.split("=", 1) for item in args.env)
    if args.no_fastpath:
        env["CADUCEUS_RECEIVER_FASTPATH"] = "0"
    if args.no_fsync:
        env["CADUCEUS_RECEIVER_FSYNC"] = "0"
    with tempfile.TemporaryDirectory(prefix="caduceus-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        data = args.data or work
        print(f"series: {args.count} x {args.size}x{args.size} CT images ({1 + args.parallel} copies) in {data}",
              flush=True)
        single = series(data, "series-single", args.count, args.size)
        many = [series(data, f"series-{i}", args.count, args.size) for i in range(args.parallel)]
        runs = [run_once(args, work, single, many, env, run) for run in range(1, args.repeat + 1)]
    ratio = statistics.median(r["ratio"] for r in runs)
    speedup = statistics.median(r["speedup"] for r in runs)
    events, expected = sum(r["events"] for r in runs), sum(r["expected_events"] for r in runs)
    print(f"image.received events: {events} (expected {expected})")
    print(f"ratio caduceus/storescp (1 sender): {ratio:.2f}  (target <= 2.0)"
          + (f"  median of {[round(r['ratio'], 2) for r in runs]}" if len(runs) > 1 else ""))
    print(f"caduceus parallel speed-up ({args.parallel} senders / 1): {speedup:.2f}  (target >= 1.5)"
          + (f"  median of {[round(r['speedup'], 2) for r in runs]}" if len(runs) > 1 else ""))
    if args.orthanc:
        orthanc = statistics.median(r["results"]["orthanc"]["single_s"] / r["results"]["storescp"]["single_s"]
                                    for r in runs)
        print(f"ratio orthanc/storescp (1 sender): {orthanc:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratio": ratio, "speedup": speedup, "env": env,
                                         "events": events, "expected_events": expected}, indent=2))
    return 0 if events == expected else 1


if __name__ == "__main__":
    sys.exit(main())
