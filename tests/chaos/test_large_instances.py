"""Large instances (services/receiver/spool.py) under crashes and a full disk, through `caduceus up`
to a DCMTK storescp, with a route-all rule.

Ledger as in the other chaos tests: every instance whose C-STORE got success is delivered, byte
for byte; what got no success is sent again, as a sender does, and then delivered too. The blob
store keeps nothing half-written under a key and, once the receiver is back, no temp file of a
cut-off instance.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from conftest import tmpfs
from services.receiver import part10
from tests.e2e.dicomfiles import blob_path, dataset_bytes, write_large_instance
from tests.harness import (
    Caduceus,
    open_temp_files,
    route_all_config,
    sop_uid_of,
    storescu,
    storescu_background,
    wait_for,
)
from tests.peers import StoreScp

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

MB = 1024 * 1024
SUCCESS = "Received Store Response (Success)"


def _large_instance(path: Path, megabytes: int, seed: int) -> Path:
    """write_large_instance with random pixel data: zeros would hide a chunk written at the wrong place."""
    write_large_instance(path, megabytes)
    frames = int(dcmread(path, stop_before_pixels=True).NumberOfFrames)
    length = frames * 1024 * 1024 * 2
    rng = random.Random(seed)
    with open(path, "r+b") as handle:
        handle.seek(-length, os.SEEK_END)
        for _ in range(length // (8 * MB)):
            handle.write(rng.randbytes(8 * MB))
        handle.write(rng.randbytes(length % (8 * MB)))
    return path


def _expected_blob(path: Path) -> bytes:
    ds = dcmread(path, stop_before_pixels=True)
    meta = part10.file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    return part10.PREAMBLE + meta + dataset_bytes(path)


@contextlib.contextmanager
def _frozen_nats(cad: Caduceus) -> Iterator[None]:
    """NATS stopped (SIGSTOP): the receiver still answers success for what its journal holds, and
    the journal applier cannot publish, so the event is still in the journal when the receiver dies."""
    pid = int(cad.state()["nats_pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):  # (the launcher may have replaced it meanwhile)
            os.kill(pid, signal.SIGCONT)


def _wait_for_moment(cad: Caduceus, pid: int, moment: str, log: Path, blob: Path, size: int) -> None:
    """Until the instance is at `moment` in process `pid`; then the process is stopped (SIGSTOP)."""
    def reached() -> bool:
        if moment == "after-success":
            return SUCCESS in log.read_text(errors="replace")
        spooled = [size for _, size in open_temp_files(pid)]
        if moment == "mid-transfer":
            return any(48 * MB <= found < size // 2 for found in spooled)
        if moment == "complete-not-answered":  # the whole instance in its spool (or just placed)
            return size in spooled or blob.exists()
        return blob.exists()  # placed under its key, its fsyncs and event not yet done

    wait_for(reached, 60, f"the instance {moment}", cad.logs, interval=0.001)
    os.kill(pid, signal.SIGSTOP)


@pytest.mark.parametrize("moment", ["mid-transfer", "complete-not-answered", "placed-not-answered",
                                    "after-success"])
def test_receiver_killed_while_a_large_instance_arrives(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus], storescp_factory: Callable[..., StoreScp],
        moment: str) -> None:
    dest = storescp_factory(extra_args=["+uf"])
    # One receiver process, so that the association is served by the process that is killed.
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet),
                           env_extra={"CADUCEUS_RECEIVER_WORKERS": "1"})
    big = _large_instance(tmp_path / "big.dcm", 200, seed=1)
    expected = _expected_blob(big)
    blob = blob_path(cad.blob_root, big)
    pid = cad.pid("receiver")
    log = tmp_path / "storescu-1.log"

    with _frozen_nats(cad) if moment == "after-success" else contextlib.nullcontext():
        running = storescu_background(cad.dicom_port, [big], log, extra=["-R"])
        _wait_for_moment(cad, pid, moment, log, blob, len(expected))
        answered = SUCCESS in log.read_text(errors="replace")
        assert answered == (moment == "after-success"), f"{moment}: the moment was missed\n{log.read_text()}"
        new_pid = cad.kill9("receiver")
    first = running.finish()
    assert (first.accepted == {sop_uid_of(big)}) == answered, first.output
    cad.wait_service_healthy("receiver", new_pid)

    # Nothing half-written under its key: absent, or the whole instance.
    assert not blob.exists() or blob.read_bytes() == expected, "a partial file under the instance's key"
    if not answered:  # as a sender does: send again what got no success
        again = storescu(cad.dicom_port, [big], extra=["-R"])
        assert again.accepted == {sop_uid_of(big)}, again.output
    (delivered,) = wait_for(dest.files, 120, "the instance at storescp", cad.logs)
    wait_for(lambda: cad.events("dispatch.completed"), 60, "dispatch.completed", cad.logs)
    assert dataset_bytes(delivered) == dataset_bytes(big)
    assert blob.read_bytes() == expected
    received = cad.events("image.received")
    assert received and all(e.payload["sha256"] == hashlib.sha256(expected).hexdigest()
                            and e.payload["size"] == len(expected) for e in received)
    if moment == "after-success":  # its event was still in the journal: the new process published it
        assert "accepted by a previous process are not yet applied" in \
            (cad.data / "logs" / "receiver.log").read_text(errors="replace")
    # No temp file of the cut-off instance is left in the blob store, nor held open by the new process.
    assert list((cad.blob_root / ".tmp").iterdir()) == []
    print(f"RESULT large instance, receiver killed {moment}: {len(received)} image.received, delivered "
          f"byte-identical, blobs/.tmp empty")


def _free_mb(path: Path) -> float:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize / MB


def test_disk_full_and_free_space_floor_during_a_large_instance(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus], storescp: StoreScp) -> None:
    """The blob store on a 120 MB tmpfs: a 160 MB instance fills it while it is spooled; then, with
    room for it, the free-space floor is passed while it is spooled; then it is accepted."""
    data_dir = tmp_path / "data"
    big = _large_instance(tmp_path / "big.dcm", 160, seed=3)
    with tmpfs(data_dir / "blobs", "120m") as blobs:
        cad = caduceus_factory(config=route_all_config(storescp.port, storescp.aet, min_free_space_mb=0),
                               data_dir=data_dir)
        try:
            empty = _free_mb(blobs)
            full = storescu(cad.dicom_port, [big], extra=["-R"])
            assert not full.accepted and "OutOfResources" in "".join(full.statuses.values()), full.output
            rejected = cad.wait_events("image.rejected", lambda found: len(found) >= 1, 30)
            assert "No space left" in rejected[-1].payload["reason"], rejected[-1].payload

            subprocess.run(["mount", "-o", "remount,size=400m", str(blobs)], check=True)
            cad.apply_config(route_all_config(storescp.port, storescp.aet, min_free_space_mb=300))
            floor = storescu(cad.dicom_port, [big], extra=["-R"])
            assert not floor.accepted and "OutOfResources" in "".join(floor.statuses.values()), floor.output
            rejected = cad.wait_events("image.rejected", lambda found: len(found) >= 2, 30)
            assert "free space below min_free_space_mb" in rejected[-1].payload["reason"], rejected[-1].payload
            # Nothing of the refused instances is left: no file, no temp file, no space held by one
            # still open (a spool file has no name: only the free space tells).
            assert [p for p in blobs.rglob("*") if p.is_file()] == []
            assert open_temp_files(cad.pid("receiver")) == []
            assert _free_mb(blobs) - empty == pytest.approx(280, abs=2)

            cad.apply_config(route_all_config(storescp.port, storescp.aet, min_free_space_mb=100))
            ok = storescu(cad.dicom_port, [big], extra=["-R"])
            assert ok.accepted == {sop_uid_of(big)}, ok.output
            assert blob_path(cad.blob_root, big).read_bytes() == _expected_blob(big)
            cad.wait_events("dispatch.completed", lambda found: len(found) >= 1, 120)
            (delivered,) = storescp.files()
            assert dataset_bytes(delivered) == dataset_bytes(big)
            assert list((blobs / ".tmp").iterdir()) == []
        finally:
            cad.kill_all()
