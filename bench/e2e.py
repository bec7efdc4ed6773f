"""End-to-end benchmark: storescu -> caduceus -> storescp vs storescu -> storescp directly.

    python -m bench.e2e [--n 500] [--size 512] [--senders 1,2,4] [--quiet 1] [--profile DIR] [--smoke]

Each sender sends its own synthetic CT series (`make_series`, new UIDs) with DCMTK storescu
(TCP_NODELAY=1). Direct: the senders talk to a DCMTK storescp. Caduceus: `caduceus up` with one
route-all rule to another storescp; settings.series_complete_seconds = --quiet.

Time = from just before the storescu processes start until the destination directory holds every
instance (polled every 5 ms). For caduceus the configured quiet period is subtracted: the router
completes a series once `now - last arrival >= series_complete_seconds`, where the last arrival is
the JetStream timestamp of the last image.received (services/router/completion.py); it checks at
the moment the earliest open series falls due (services/router/service.py), so only that check's
own latency stays in the caduceus time.

Hop split (from event timestamps on the same clock): receive = storescu exit; router = last
image.received (stream time) -> series.completed minus the quiet period; decide = series.completed
-> dispatch.requested; dispatch = dispatch.requested -> dispatch.completed; tail = dispatch.completed
-> last file seen at the destination. With several senders the maxima over the series are shown.

--profile DIR: after the measurements, one more single-sender caduceus pass with
`py-spy record --nonblocking` attached to router, dispatcher, bookkeeper and receiver; prints the
functions with the most samples (self and inclusive) per service and keeps the raw stacks in DIR.
--smoke: 5 images of 64x64, senders 1,2, only receiver/router/dispatcher, no warm-up: checks the
machinery, not the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    DEFAULT_WARM_GB,
    Peer,
    make_series,
    prepare_to_measure,
    set_aside,
    start_storescp,
    storescu,
)
from bench.pipeline import (
    DATA_PATH,
    DEST_AET,
    Caduceus,
    last_seq,
    read_events,
    route_all_config,
    start_caduceus,
    ts,
    wait_for_files,
)
from shared.health import EXPECTED_SERVICES

GOAL_RATIO = 3.0


@dataclass
class Measurement:
    senders: int
    images: int
    seconds: float                      # direct: wall; caduceus: wall minus the quiet period
    send_seconds: float                 # until the last storescu exited
    hops: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_image: dict[str, float] = field(default_factory=dict)          # whole pass
    receive_cpu_ms_per_image: dict[str, float] = field(default_factory=dict)  # until storescu exited


def send_all(port: int, dirs: list[Path], called_aet: str) -> tuple[float, float]:
    """Run one storescu per directory at once; return (t0, time when the last one exited)."""
    t0 = time.time()
    with ThreadPoolExecutor(len(dirs)) as pool:
        results = list(pool.map(lambda d: storescu(port, d, called_aet=called_aet), dirs))
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0].output[-2000:]}")
    return t0, time.time()


def measure_direct(dest: Peer, dirs: list[Path], n: int, timeout: float) -> Measurement:
    out: Path = dest.extra["dir"]  # type: ignore[assignment]
    set_aside(out)
    t0, sent = send_all(dest.port, dirs, DEST_AET)
    done = wait_for_files(out, n * len(dirs), timeout)
    return Measurement(len(dirs), n * len(dirs), done - t0, sent - t0)


def measure_caduceus(cad: Caduceus, dest: Peer, dirs: list[Path], n: int, quiet: float,
                     timeout: float) -> Measurement:
    out: Path = dest.extra["dir"]  # type: ignore[assignment]
    set_aside(out)
    since = last_seq(cad.nats_url)
    cpu_before = cpu_by_process(cad)
    t0, sent = send_all(cad.dicom_port, dirs, "CADUCEUS")
    cpu_sent = cpu_by_process(cad)
    try:
        done = wait_for_files(out, n * len(dirs), timeout)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}\nrouter log:\n{cad.service_log('router')[-2000:]}\n"
                           f"dispatcher log:\n{cad.service_log('dispatcher')[-2000:]}") from None
    cpu_after = cpu_by_process(cad)
    m = Measurement(len(dirs), n * len(dirs), done - t0 - quiet, sent - t0)
    m.cpu_ms_per_image = {name: 1000 * (cpu_after[name] - cpu_before.get(name, 0.0)) / m.images
                          for name in cpu_after}
    m.receive_cpu_ms_per_image = {name: 1000 * (cpu_sent[name] - cpu_before.get(name, 0.0)) / m.images
                                  for name in cpu_sent}
    m.hops = hop_split(cad, since, t0, sent, done, quiet, expected_tasks=len(dirs))
    return m


# ------------------------------------------------------------------ CPU per process

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, utime + stime in seconds) of a process, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_by_process(cad: Caduceus) -> dict[str, float]:
    """CPU seconds used so far by the launcher, nats-server and each service (with its children).

    Counted while the processes run (a process that exited in between is missing from one side);
    the figures cover a measurement window, the launcher's own start-up is in both snapshots.
    """
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    root = cad.process.pid
    names = {pid: name for name, pid in cad.service_pids().items()}
    totals: dict[str, float] = {}
    for pid, (_, cpu) in stats.items():
        # Walk up to the launcher; the name is the first service (or nats-server) on the way.
        name, cur = None, pid
        while cur in stats and cur != root:
            if name is None and cur in names:
                name = names[cur]
            elif name is None and _is_nats(cur):
                name = "nats-server"
            cur = stats[cur][0]
        if cur == root:
            key = "launcher" if pid == root else (name or "other")
            totals[key] = totals.get(key, 0.0) + cpu
    return totals


def _is_nats(pid: int) -> bool:
    try:
        return b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def hop_split(cad: Caduceus, since: int, t0: float, sent: float, done: float, quiet: float,
              expected_tasks: int) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while True:  # dispatch.completed is published after the last C-STORE response: may lag a little
        events = read_events(cad.nats_url, since_seq=since)
        completed = [e for e in events if e.type == "dispatch.completed"]
        if len(completed) >= expected_tasks or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    last_image: dict[str, float] = {}
    for e in events:
        if e.type == "image.received" and e.series_uid:
            last_image[e.series_uid] = max(last_image.get(e.series_uid, 0.0), ts(e.recorded_at))
    series_done = {e.series_uid: ts(e.occurred_at) for e in events if e.type == "series.completed" and e.series_uid}
    requested = {e.task_id or str(e.payload.get("task_id")): (e.series_uid, ts(e.occurred_at))
                 for e in events if e.type == "dispatch.requested"}
    finished = {e.task_id or str(e.payload.get("task_id")): ts(e.occurred_at) for e in completed}
    router = [series_done[s] - last_image[s] - quiet for s in series_done if s in last_image]
    decide = [at - series_done[s] for s, at in requested.values() if s in series_done]
    dispatch = [finished[t] - at for t, (_, at) in requested.items() if t in finished]
    hops = {"receive": sent - t0,
            "router": max(router, default=float("nan")),
            "decide": max(decide, default=float("nan")),
            "dispatch": max(dispatch, default=float("nan")),
            "tail": done - max(finished.values(), default=float("nan"))}
    if expected_tasks > 1 and dispatch:
        hops["dispatch_each"] = statistics.mean(_service_times(requested, finished))
    # The attempt itself (association to release, as the dispatcher measured it); the rest of the
    # dispatch hop is pick-up latency and the events around the attempt.
    attempts = [float(e.payload.get("duration_seconds") or 0.0) for e in completed]
    if attempts:
        hops["attempt"] = max(attempts)
    return hops


def _service_times(requested: dict[str, tuple[str | None, float]], finished: dict[str, float]) -> list[float]:
    """Per task: completion minus max(its request, the previous completion) (tasks queue per target)."""
    times, previous = [], 0.0
    for task in sorted(finished, key=finished.__getitem__):
        start = max(requested[task][1], previous) if task in requested else previous
        times.append(finished[task] - start)
        previous = finished[task]
    return times


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def print_row(label: str, m: Measurement) -> None:
    print(f"{label:9s} {m.senders} sender(s) {m.images:6d} images: {m.seconds:8.2f} s "
          f"({m.images / m.seconds:7.1f} img/s), storescu done after {m.send_seconds:7.2f} s", flush=True)


def print_hops(m: Measurement) -> None:
    parts = "  ".join(f"{k}={v:.2f}s" for k, v in m.hops.items())
    print(f"          hop split ({m.senders} sender(s)): {parts}", flush=True)
    for label, figures in (("until storescu exited", m.receive_cpu_ms_per_image),
                           ("whole pass", m.cpu_ms_per_image)):
        cpu = sorted(figures.items(), key=lambda kv: -kv[1])
        parts = "  ".join(f"{k}={v:.2f}" for k, v in cpu)
        print(f"          CPU ms/image, {label}: {parts}  total={sum(v for _, v in cpu):.2f}", flush=True)


# ------------------------------------------------------------------ profiling

PROFILED = ("router", "dispatcher", "bookkeeper", "receiver")


def start_profilers(cad: Caduceus, out: Path, rate: int = 100) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    pids = cad.service_pids()
    procs = []
    for name in PROFILED:
        if name in pids:
            args = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pids[name]), "--format", "raw",
                    "--rate", str(rate), "--nonblocking", "--output", str(out / f"{name}.txt")]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)  # py-spy attaches
    return procs


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    import signal

    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# Leaf frames where a thread waits rather than works (py-spy counts some of them as active).
WAITING = ("select (selectors.py)", "wait (threading.py)", "_worker (thread.py)", "sleep", "_wait (fastpath.py)",
           "poll (selectors.py)", "acquire")
PROJECT_FILES = ("services/", "shared/")


def parse_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: 'frame;frame;... count' per line -> (frames 'func (file)', count)."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            if frame.startswith(("process ", "thread ")):
                continue
            func, _, where = frame.partition(" (")
            file = where.split(":")[0]
            keep = next((file[file.index(d):] for d in PROJECT_FILES if d in file), file.rsplit("/", 1)[-1])
            frames.append(f"{func} ({keep})")
        if frames:
            stacks.append((frames, int(count_text)))
    return stacks


def summarize_profile(path: Path, top: int = 10) -> str:
    """Where the busy samples of one process went: leaf functions and our own functions (inclusive)."""
    stacks = parse_collapsed(path)
    total = sum(c for _, c in stacks)
    busy = [(f, c) for f, c in stacks if not any(w in f[-1] for w in WAITING)]
    busy_total = sum(c for _, c in busy)
    if not busy_total:
        return f"{path.stem}: no busy samples"
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    for frames, count in busy:
        self_counts[frames[-1]] += count
        for frame in set(frames):
            if any(d in frame for d in PROJECT_FILES):
                incl_counts[frame] += count
    lines = [f"{path.stem}: {busy_total} busy samples of {total} (waiting leaves left out); % of busy samples:"]
    lines += [f"   self {100 * c / busy_total:5.1f}%  {f}" for f, c in self_counts.most_common(top)]
    skip = ("Service.main", "run_service", "run_handler")
    incl = [(f, c) for f, c in incl_counts.most_common() if not f.startswith(skip)]
    lines += [f"   incl {100 * c / busy_total:5.1f}%  {f}" for f, c in incl[:top]]
    return "\n".join(lines)


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="images per series (one series per sender)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    parser.add_argument("--senders", default="1,2,4", help="comma separated numbers of concurrent senders")
    parser.add_argument("--quiet", type=float, default=1.0, help="settings.series_complete_seconds")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy pass; stacks written here")
    parser.add_argument("--services", default=None,
                        help="services `caduceus up` runs (default all seven; --smoke: the data path "
                             f"{','.join(DATA_PATH)}), e.g. without the bookkeeper to see what it costs")
    parser.add_argument("--database-url", default="",
                        help="CADUCEUS_DATABASE_URL for the bookkeeper (default: SQLite in the data dir)")
    parser.add_argument("--smoke", action="store_true", help="5 images of 64x64, senders 1,2")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--warm-gb", type=float, default=DEFAULT_WARM_GB,
                        help="touch this much free memory once before measuring (bench/common.py "
                        "warm_guest_memory; 0 = off)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.size, args.senders = 5, 64, "1,2"
    if args.services is None:
        args.services = ",".join(DATA_PATH if args.smoke else EXPECTED_SERVICES)
    senders = [int(s) for s in args.senders.split(",") if s.strip()]
    timeout = 120 + args.n * max(senders) * 0.2
    with tempfile.TemporaryDirectory(prefix="caduceus-e2e-", dir=args.workdir) as tmp:
        work = Path(tmp)
        total_series = sum(senders) + (1 if args.profile else 0) + 1
        print(f"load average at the start: {load_text()}")
        print(f"generating {total_series} series of {args.n} x {args.size}x{args.size} CT images", flush=True)
        warmup = make_series(work / "warmup", 3, 64)
        batches: dict[int, list[Path]] = {
            k: [make_series(work / f"s{k}-{i}", args.n, args.size) for i in range(k)] for k in senders}
        if not args.smoke:
            prepare_to_measure(work, args.warm_gb)
        direct_dest = start_storescp(work / "dest-direct")
        cad_dest = start_storescp(work / "dest-caduceus")
        env = {"CADUCEUS_DATABASE_URL": args.database_url} if args.database_url else {}
        cad = start_caduceus(work / "caduceus", route_all_config(cad_dest.port, args.quiet), env=env,
                             services=tuple(s for s in args.services.split(",") if s))
        direct: dict[int, Measurement] = {}
        caduceus: dict[int, Measurement] = {}
        try:
            if not args.smoke:  # warm-up, not counted
                measure_direct(direct_dest, [warmup], 3, timeout)
                measure_caduceus(cad, cad_dest, [warmup], 3, args.quiet, timeout)
            # Direct and caduceus alternate per sender count, so both see the same machine load.
            for k, dirs in batches.items():
                direct[k] = measure_direct(direct_dest, dirs, args.n, timeout)
                print_row("direct", direct[k])
                caduceus[k] = measure_caduceus(cad, cad_dest, dirs, args.n, args.quiet, timeout)
                print_row("caduceus", caduceus[k])
                print_hops(caduceus[k])
            if args.profile:
                profile_pass(cad, cad_dest, work, args)
        finally:
            cad.stop()
            cad_dest.stop()
            direct_dest.stop()
        print(f"load average at the end: {load_text()}")
        report(direct, caduceus, args)
    return 0


def profile_pass(cad: Caduceus, dest: Peer, work: Path, args: argparse.Namespace) -> None:
    series = make_series(work / "profiled", args.n, args.size)
    procs = start_profilers(cad, args.profile)
    try:
        m = measure_caduceus(cad, dest, [series], args.n, args.quiet, 120 + args.n)
    finally:
        stop_profilers(procs)
    print(f"profiled pass (py-spy attached, not a measurement): {m.seconds:.2f} s", flush=True)
    for name in PROFILED:
        path = args.profile / f"{name}.txt"
        if path.exists():
            print(summarize_profile(path), flush=True)


def report(direct: dict[int, Measurement], caduceus: dict[int, Measurement], args: argparse.Namespace) -> None:
    print(f"quiet period subtracted from caduceus times: {args.quiet:.2f} s "
          f"(settings.series_complete_seconds)")
    for k in direct:
        d, c = direct[k], caduceus[k]
        print(f"ratio caduceus/direct ({k} sender{'s' if k > 1 else ''}): {c.seconds / d.seconds:.2f}  "
              f"(direct {d.seconds:.2f} s, caduceus {c.seconds:.2f} s; goal <= {GOAL_RATIO:.0f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "n": args.n, "size": args.size, "quiet": args.quiet,
            "direct": {k: vars(m) for k, m in direct.items()},
            "caduceus": {k: vars(m) for k, m in caduceus.items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
