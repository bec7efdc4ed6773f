"""Helpers to start DICOM peers and the caduceus receiver for benchmarks and tests.

Everything listens on 127.0.0.1 on free ports, with its own directories. DCMTK tools are called
by absolute path (pynetdicom's pip scripts shadow the bare names).
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from bench.synthetic import write_series
from services.receiver.workers import WORKERS_ENV, worker_count
from shared.blobstore import LocalBlobStore, blob_key
from shared.manifest import Manifest, ManifestInstance, write_manifest
from shared.natsserver import EmbeddedNats, free_port, terminate, wait_port

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
REPO = Path(__file__).resolve().parent.parent


def nodelay_env() -> dict[str, str]:
    # DCMTK reads TCP_NODELAY from the environment; without it every response waits for the
    # peer's delayed ACK (about 40 ms per image).
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class SendResult:
    returncode: int
    seconds: float
    output: str


def storescu(port: int, paths: list[Path] | Path, *, called_aet: str = "CADUCEUS", calling_aet: str = "BENCH",
             extra: list[str] | None = None, timeout: float = 600) -> SendResult:
    targets = [paths] if isinstance(paths, Path) else paths
    args = [STORESCU, "-aet", calling_aet, "-aec", called_aet, *(extra or [])]
    if any(p.is_dir() for p in targets):
        args += ["+sd", "+r"]
    args += ["127.0.0.1", str(port), *map(str, targets)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=nodelay_env(), timeout=timeout)
    return SendResult(proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr)


def echoscu(port: int, *, called_aet: str = "CADUCEUS", calling_aet: str = "BENCH") -> SendResult:
    args = [ECHOSCU, "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port)]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=nodelay_env(), timeout=60)
    return SendResult(proc.returncode, time.perf_counter() - start, proc.stdout + proc.stderr)


def make_series(out: Path, count: int, size: int = 512, studies: int = 1, series_per_study: int = 1,
                modality: str = "CT") -> Path:
    write_series(out, count, size=size, studies=studies, series_per_study=series_per_study, modality=modality)
    return out


@dataclass
class Peer:
    """A listening process (storescp, Orthanc, caduceus receiver)."""

    port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self, timeout: float = 15) -> None:
        if self.process is not None:
            terminate(self.process, timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def _spawn(args: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def start_storescp(workdir: Path, port: int | None = None) -> Peer:
    port = port or free_port()
    out = workdir / "storescp-out"
    out.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "storescp.log"
    proc = _spawn([STORESCP, "-od", str(out), "--accept-all", str(port)], log_path, nodelay_env())
    wait_port("127.0.0.1", port)
    return Peer(port, proc, log_path, {"dir": out})


def start_orthanc(workdir: Path) -> Peer:
    dicom_port, http_port = free_port(), free_port()
    storage = workdir / "orthanc-storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "caduceus-bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomAlwaysAllowStore": True, "UnknownSopClassAccepted": True,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / "orthanc.log"
    proc = _spawn([ORTHANC, str(config_path)], log_path, nodelay_env())
    wait_port("127.0.0.1", dicom_port, timeout=30)
    return Peer(dicom_port, proc, log_path, {"http_port": http_port})


def start_receiver(nats_url: str, data_dir: Path, *, port: int | None = None,
                   env: dict[str, str] | None = None, log_path: Path | None = None) -> Peer:
    """The caduceus receiver as its own process (`python -m services.receiver`)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir / "receiver.log"
    full_env = {**os.environ, "CADUCEUS_NATS_URL": nats_url, "CADUCEUS_DATA_DIR": str(data_dir),
                "CADUCEUS_DICOM_PORT": str(port), "CADUCEUS_DICOM_HOST": "127.0.0.1",
                "CADUCEUS_HEARTBEAT_SECONDS": "30", **(env or {})}
    proc = _spawn([sys.executable, "-m", "services.receiver"], log_path, full_env, cwd=REPO)
    try:
        wait_port("127.0.0.1", port, timeout=30)
        _wait_for_workers(log_path, worker_count(full_env.get(WORKERS_ENV, "")))
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"receiver did not start:\n{log_path.read_text(errors='replace')}") from None
    return Peer(port, proc, log_path)


def _wait_for_workers(log_path: Path, processes: int, timeout: float = 30.0) -> None:
    """Until the worker processes say they are ready: the supervisor hands connections only to
    ready workers, so senders started before that would all be served by the supervisor."""
    deadline = time.monotonic() + timeout
    while log_path.read_text(errors="replace").count("receiver worker ready") < processes - 1:
        if time.monotonic() > deadline:
            raise TimeoutError("receiver workers not ready")
        time.sleep(0.1)


def start_nats(workdir: Path) -> EmbeddedNats:
    return EmbeddedNats(workdir / "nats", log_file=workdir / "nats.log").start()


async def stage_files(store: LocalBlobStore, files: list[Path], batch_id: str | None = None,
                      calling_aet: str = "MODALITY") -> tuple[Manifest, str]:
    """Put files into the blob store as the receiver would and write the manifest the router would."""
    instances = []
    for seq, path in enumerate(files, start=1):
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"])
        study, series, sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        key = blob_key("instances", study, series, f"{sop}.dcm")
        info = await store.put(key, path.read_bytes())
        instances.append(ManifestInstance(
            sop_uid=sop, series_uid=series, study_uid=study, blob_key=key,
            sop_class_uid=str(ds.SOPClassUID), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            sha256=info.sha256, size=info.size, stream_seq=seq))
    manifest = Manifest(batch_id=batch_id or uuid.uuid4().hex, level="series",
                        study_uid=instances[0].study_uid, series_uids=sorted({i.series_uid for i in instances}),
                        instances=instances, calling_aet=calling_aet, peer_host="127.0.0.1")
    return manifest, await write_manifest(store, manifest)


def set_aside(directory: Path) -> None:
    """Empty `directory` for the next measurement by moving it away (renamed, not deleted).

    Why not delete: on ext4, creating files right after many were deleted is slow (the inode
    allocator skips every recently freed inode; up to ~0.8 ms per create was measured here), so a
    deletion would slow whichever measurement comes next. What is set aside goes with the work
    directory when the benchmark ends.
    """
    number = 1
    while directory.with_name(f"{directory.name}.old{number}").exists():
        number += 1
    directory.rename(directory.with_name(f"{directory.name}.old{number}"))
    directory.mkdir()


CREATE_PROBE_FILES = 200
SLOW_CREATE_MS = 0.1


def create_cost_ms(directory: Path) -> float:
    """Mean milliseconds to create (and rename) an empty file in `directory`; the files are kept
    (deleting them would cause what this detects)."""
    probe = directory / f"probe-{time.monotonic_ns()}"
    probe.mkdir(parents=True)
    start = time.perf_counter()
    for number in range(CREATE_PROBE_FILES):
        path = probe / f"{number}.part"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(path, probe / f"{number}")
    return (time.perf_counter() - start) * 1000 / CREATE_PROBE_FILES


def wait_for_fast_creates(directory: Path, max_wait: float = 360.0) -> float:
    """Before measuring: wait until creating files in `directory` is fast again (see set_aside:
    on ext4 without a journal, file creation stays slow for 1-5 minutes after many deletions).
    Returns the last probe's cost; after `max_wait` it goes on with a warning."""
    deadline = time.monotonic() + max_wait
    cost = create_cost_ms(directory)
    while cost > SLOW_CREATE_MS and time.monotonic() < deadline:
        print(f"file creation is slow here ({cost:.2f} ms per file, files were probably deleted "
              "recently): waiting 15 s", flush=True)
        time.sleep(15)
        cost = create_cost_ms(directory)
    if cost > SLOW_CREATE_MS:
        print(f"warning: file creation still costs {cost:.2f} ms per file; figures will be off", flush=True)
    return cost


WARM_CHUNK = 1 << 20
WARM_MARGIN_BYTES = 1 << 30


def free_memory_bytes() -> int:
    """MemFree from /proc/meminfo (not MemAvailable: warming must not evict the cached series)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    return 0


def warm_guest_memory(gigabytes: float) -> tuple[float, float]:
    """Write to `gigabytes` of fresh memory once and free it; returns (GB touched, seconds).

    Why: in a virtual machine, the first write to a guest page the guest has never used costs a
    fault in the hypervisor. The page cache grows into such pages while a benchmark writes images,
    so whichever receiver runs on fresh memory pays it: writing a 530 KB file took 1.5-1.6 ms of
    system CPU on fresh memory here and 0.54 ms after 4 GB had been touched once
    (docs/performance.md, "Measuring on this machine"). A server that has run for a while has
    touched its memory long ago. Freed pages go back to the guest's free lists and are reused first
    by the page cache, so the measurements that follow see memory as on such a server. Touching
    memory that is already backed is fast, so only the first benchmark after a boot pays. At most
    MemFree less 1 GB is touched, so the cached test series stay cached.
    """
    size = min(int(gigabytes * (1 << 30)), max(0, free_memory_bytes() - WARM_MARGIN_BYTES))
    size -= size % WARM_CHUNK
    if size <= 0:
        return 0.0, 0.0
    start = time.perf_counter()
    chunk = b"\x01" * WARM_CHUNK
    with mmap.mmap(-1, size) as memory:
        for offset in range(0, size, WARM_CHUNK):
            memory[offset:offset + WARM_CHUNK] = chunk
    return size / (1 << 30), time.perf_counter() - start


DEFAULT_WARM_GB = 16.0


def prepare_to_measure(work: Path, warm_gb: float) -> None:
    """What every pipeline benchmark does before its first measurement: warm the guest's memory
    (`warm_guest_memory`), then wait until file creation is fast (`wait_for_fast_creates`)."""
    if warm_gb > 0:
        touched, seconds = warm_guest_memory(warm_gb)
        print(f"memory warmed: {touched:.1f} GB touched once in {seconds:.1f} s", flush=True)
    wait_for_fast_creates(work)
