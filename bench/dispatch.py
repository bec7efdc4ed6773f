"""Dispatch-hop benchmark: the caduceus dispatcher vs DCMTK storescu, sending to the same storescp.

    python -m bench.dispatch [--count 300] [--size 512] [--repeat 3] [--parallel 1] [--smoke]
                             [--workdir DIR] [--data DIR] [--json FILE] [--no-service] [--baseline]

One series (`make_series.py`) is staged the way the dispatcher meets it in production: every file
in a LocalBlobStore under its instance key, plus a manifest. Then, per repeat and back to back,
against one DCMTK storescp (`TCP_NODELAY=1`, one association at a time, files written):

- `storescu`: DCMTK `/usr/bin/storescu` (`TCP_NODELAY=1`) sends the staged files, one association
  (time = process wall clock);
- `sender`: the dispatcher's `send_items()` sends the same files (time = the call, association
  set-up and release included);
- `pynetdicom` (`--baseline`): `send_items()` with the fast path off (CADUCEUS_DISPATCH_FASTPATH=0:
  pynetdicom's loops and its `send_c_store`), for the before/after in one run;
- `service`: a DispatcherService (in this process, embedded nats-server) gets a `dispatch.requested`
  event; time = publish of the request until the `dispatch.completed` event arrives.

Prints each run and the medians with `ratio sender/storescu` and `ratio service/storescu`
(target <= 1.5), and the CPU seconds each side used (storescu: the child process; sender and
service: this whole process), which a loaded machine disturbs less than wall time. The storescp output directory is emptied before every send so that every run
writes the same files. `--smoke` = 5 small images, 1 repeat: it checks the machinery only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import make_series, set_aside, stage_files, start_nats, start_storescp, storescu
from services.dispatcher.sender import Destination, SendItem, send_items
from services.dispatcher.service import DispatcherService
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.config.state import fold, plan_changes, read_all
from shared.events import DispatchRequested, Event, make_event
from shared.manifest import Manifest
from shared.settings import Settings
from shared.subjects import event_subject

STORESCP_AET = "STORESCP"


async def stage(store: LocalBlobStore, files: list[Path]) -> tuple[Manifest, str]:
    """Put the files into the blob store as the receiver would and write the router's manifest."""
    return await stage_files(store, files, calling_aet="BENCH")


def send_items_of(store: LocalBlobStore, manifest: Manifest) -> list[SendItem]:
    return [SendItem(index, i.sop_uid, i.sop_class_uid, i.transfer_syntax_uid, store.path(i.blob_key))
            for index, i in enumerate(manifest.instances)]


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.iterdir() if p.is_file())


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_storescu(port: int, files: list[Path]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the storescu process)."""
    cpu = children_cpu()
    result = storescu(port, files, called_aet=STORESCP_AET, calling_aet="BENCH")
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed:\n{result.output[-2000:]}")
    return result.seconds, children_cpu() - cpu


def time_sender(port: int, items: list[SendItem], parallel: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of send_items() calls."""
    destination = Destination("127.0.0.1", port, STORESCP_AET, "CADUCEUS")
    chunks = [items[i::parallel] for i in range(min(parallel, len(items)))]
    results: list[Any] = [None] * len(chunks)
    abort = threading.Event()

    def run(n: int) -> None:
        results[n] = send_items(destination, chunks[n], lambda index, status: None, abort)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(chunks))]
    cpu = time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    delivered = sum(len(r.delivered) for r in results)
    if delivered != len(items):
        raise RuntimeError(f"sender delivered {delivered}/{len(items)}: {[r.errors for r in results]}")
    return seconds, cpu


class ServiceRun:
    """A DispatcherService on an embedded nats-server; `dispatch()` times one task to completion."""

    def __init__(self, workdir: Path, store_root: Path) -> None:
        self.workdir = workdir
        self.store_root = store_root  # the service's data_dir/blobs

    async def __aenter__(self) -> ServiceRun:
        self.nats = start_nats(self.workdir)
        self.bus = await Bus.connect(self.nats.url, "bench")
        self.completed: dict[str, tuple[float, float]] = {}  # task id -> (wall clock, CPU clock)
        self.arrived = asyncio.Event()

        async def on_event(msg: Any) -> None:
            event = Event.model_validate_json(msg.data)
            self.completed[event.payload.get("task_id", "")] = (time.perf_counter(), time.process_time())
            self.arrived.set()

        await self.bus.nc.subscribe(event_subject("dispatch.completed") + ".>", cb=on_event)
        await self.bus.nc.subscribe(event_subject("dispatch.completed"), cb=on_event)
        return self

    async def configure(self, port: int, parallel: int) -> None:
        document = {"settings": {"dispatch_parallel_associations": parallel},
                    "targets": {"storescp": {"type": "dicom", "host": "127.0.0.1", "port": port,
                                             "called_aet": STORESCP_AET}}}
        current = fold(await read_all(self.bus))
        await self.bus.publish_many(plan_changes(current, CaduceusConfig.parse(document), actor="bench"))
        settings = Settings(nats_url=self.nats.url, data_dir=self.store_root.parent,
                                      heartbeat_seconds=30)
        self.service = DispatcherService(settings)
        self.task = asyncio.create_task(self.service.run())
        deadline = time.monotonic() + 30
        while not hasattr(self.service, "dispatcher"):
            if self.task.done():
                self.task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("dispatcher did not start")
            await asyncio.sleep(0.05)
        while self.service.config.targets.get("storescp") is None:
            if time.monotonic() > deadline:
                raise TimeoutError("dispatcher did not load the configuration")
            await asyncio.sleep(0.05)

    async def dispatch(self, manifest: Manifest, key: str) -> tuple[float, float, float]:
        """Seconds from request to dispatch.completed, the attempt's own duration_seconds, and
        the CPU seconds of this process (service and benchmark) until the completion arrived."""
        task_id = uuid.uuid4().hex
        event = make_event("dispatch.requested", "router", DispatchRequested(
            task_id=task_id, rule="bench", target="storescp", manifest_key=key,
            instance_count=len(manifest.instances), priority="normal"),
            study_uid=manifest.study_uid, series_uid=manifest.series_uids[0], task_id=task_id,
            correlation_id=manifest.batch_id)
        start, cpu = time.perf_counter(), time.process_time()
        await self.bus.publish(event)
        deadline = time.monotonic() + 600
        while task_id not in self.completed:
            if time.monotonic() > deadline or self.task.done():
                raise RuntimeError("dispatch did not complete")
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 1.0)
            except TimeoutError:
                pass
        done, done_cpu = self.completed[task_id]
        return done - start, await self._attempt_seconds(task_id), done_cpu - cpu

    async def _attempt_seconds(self, task_id: str) -> float:
        from shared.bus import replay

        async for event in replay(self.bus, event_subject("dispatch.completed")):
            if event.payload.get("task_id") == task_id:
                return float(event.payload.get("duration_seconds", 0.0))
        return 0.0

    async def __aexit__(self, *exc: object) -> None:
        if hasattr(self, "service"):
            self.service.request_stop("bench done")
            await asyncio.wait_for(self.task, 30)
        await self.bus.close()
        self.nats.stop()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    series_dir = Path(args.data) if args.data else workdir / "series"
    if not (series_dir.is_dir() and len(list(series_dir.glob("*.dcm"))) == args.count):
        shutil.rmtree(series_dir, ignore_errors=True)
        make_series(series_dir, args.count, size=args.size)
    files = sorted(series_dir.glob("*.dcm"))
    data_dir = workdir / "data"
    store = LocalBlobStore(data_dir / "blobs", fsync=False)
    manifest, key = await stage(store, files)
    items = send_items_of(store, manifest)
    staged = [item.path for item in items]
    storescp = start_storescp(workdir / "storescp")
    out_dir: Path = storescp.extra["dir"]  # type: ignore[assignment]
    runs: list[dict[str, float]] = []
    try:
        service = ServiceRun(workdir, data_dir / "blobs") if args.service else None
        if service:
            await service.__aenter__()
            await service.configure(storescp.port, args.parallel)
        try:
            for repeat in range(args.repeat):
                row: dict[str, float] = {}
                set_aside(out_dir)
                row["storescu"], row["storescu_cpu"] = time_storescu(storescp.port, staged)
                set_aside(out_dir)
                row["sender"], row["sender_cpu"] = await asyncio.to_thread(
                    time_sender, storescp.port, items, args.parallel)
                if args.baseline:
                    set_aside(out_dir)
                    os.environ["CADUCEUS_DISPATCH_FASTPATH"] = "0"  # read per association
                    try:
                        row["pynetdicom"], row["pynetdicom_cpu"] = await asyncio.to_thread(
                            time_sender, storescp.port, items, args.parallel)
                    finally:
                        os.environ.pop("CADUCEUS_DISPATCH_FASTPATH")
                if count_files(out_dir) != len(items):
                    raise RuntimeError(f"storescp holds {count_files(out_dir)}/{len(items)} files")
                if service:
                    set_aside(out_dir)
                    row["service"], row["service_attempt"], row["service_cpu"] = await service.dispatch(manifest, key)
                    # The event can arrive before storescp closed its last file.
                    await asyncio.sleep(0.2)
                    if count_files(out_dir) != len(items):
                        raise RuntimeError(f"storescp holds {count_files(out_dir)}/{len(items)} files")
                row["ratio_sender"] = row["sender"] / row["storescu"]
                if args.baseline:
                    row["ratio_pynetdicom"] = row["pynetdicom"] / row["storescu"]
                if service:
                    row["ratio_service"] = row["service"] / row["storescu"]
                runs.append(row)
                print(f"run {repeat + 1}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        finally:
            if service:
                await service.__aexit__()
    finally:
        storescp.stop()
    summary = {name: median([r[name] for r in runs]) for name in runs[0]}
    return {"count": args.count, "size": args.size, "parallel": args.parallel, "runs": runs, "median": summary,
            "load": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=1, help="associations of the dispatcher")
    parser.add_argument("--no-service", dest="service", action="store_false",
                        help="skip the whole-service measurement")
    parser.add_argument("--baseline", action="store_true",
                        help="also time send_items() with the fast path off (pynetdicom's own loops and C-STORE)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--workdir", help="temporary files go here (removed at the end)")
    parser.add_argument("--data", help="keep the generated series here and reuse it")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.size, args.repeat = 5, 64, 1
    print(f"load {os.getloadavg()[0]:.2f}; {args.count} x {args.size}x{args.size}, {args.repeat} run(s), "
          f"{args.parallel} association(s)", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-dispatch-", dir=args.workdir))
    try:
        results = asyncio.run(run(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    m = results["median"]
    print(f"median: storescu {m['storescu']:.3f} s, sender {m['sender']:.3f} s"
          + (f", service {m['service']:.3f} s (attempt {m['service_attempt']:.3f} s)" if "service" in m else ""))
    print(f"median CPU: storescu {m['storescu_cpu']:.3f} s, sender {m['sender_cpu']:.3f} s"
          + (f", service {m['service_cpu']:.3f} s" if "service" in m else "")
          + " (sender/service: this process, all threads)")
    print(f"ratio sender/storescu {m['ratio_sender']:.2f} (target <= 1.5)")
    if "ratio_pynetdicom" in m:
        print(f"ratio pynetdicom/storescu {m['ratio_pynetdicom']:.2f} (fast path off; cpu {m['pynetdicom_cpu']:.3f} s)")
    if "ratio_service" in m:
        print(f"ratio service/storescu {m['ratio_service']:.2f} (target <= 1.5)")
    print(f"load {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
