"""Large instances: written to a spool file as they arrive (memory stays bounded), and refused
above `max_instance_mb` (services/receiver/spool.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import AE, _config

from bench.common import REPO, Peer, echoscu, start_receiver, storescu
from conftest import tmpfs
from services.receiver import direct, part10
from services.receiver.ingest import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    AssociationInfo,
    Ingest,
    LocalBlobWriter,
)
from services.receiver.spool import Claim, Spool, Spooler
from services.receiver.tests.helpers import apply_settings, blob_files, idle_peak_bytes, wait_events
from services.receiver.tests.test_direct import FakeAssoc, _pdv, _store_command
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.config.model import SettingsItem
from shared.events import Event
from tests.e2e.dicomfiles import BREAST_TOMOSYNTHESIS, dataset_bytes, write_large_instance
from tests.harness import PeakRss, open_temp_files, wait_for
from tests.peers import associate_rq, pdu_item

MB = 1024 * 1024
OUT_OF_RESOURCES = re.compile(r"(?i)out ?of ?resources|a700")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _expected_blob(path: Path) -> bytes:
    """The Part 10 file the receiver writes for `path` sent as it is: its own File Meta, the data set."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = part10.file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
    return part10.PREAMBLE + meta + dataset_bytes(path)


async def test_a_large_instance_is_stored_byte_identical_with_bounded_memory(
        receiver: Peer, bus: Bus, data_dir: Path, tmp_path: Path) -> None:
    big = write_large_instance(tmp_path / "tomo.dcm", 256)
    assert receiver.process is not None
    rss = PeakRss(receiver.process.pid)
    with rss.sampling():
        result = await asyncio.to_thread(storescu, receiver.port, big, extra=["-R"])
    print(rss.report())
    assert result.returncode == 0, result.output
    (event,) = await wait_events(bus, "image.received", 1)
    (blob,) = blob_files(data_dir)
    expected = _expected_blob(big)
    assert blob.stat().st_size == len(expected) == event.payload["size"]
    assert blob.read_bytes() == expected
    assert event.payload["tags"]["Modality"] == "MG" and event.payload["duplicate"] == "new"
    assert list((data_dir / "blobs" / ".tmp").iterdir()) == []
    assert rss.peak - rss.baseline < 96 * MB, rss.report()


# ---------------------------------------------------------------- the spool itself, no network

EXPLICIT = "1.2.840.10008.1.2.1"


def _instance(tmp_path: Path, megabytes: int = 3) -> tuple[bytes, bytes]:
    """(preamble + the receiver's File Meta, data set) of a large instance with varied bytes."""
    path = write_large_instance(tmp_path / f"i{megabytes}.dcm", megabytes)
    raw = bytearray(path.read_bytes())
    raw[-len(raw) // 2:] = random.Random(1).randbytes(len(raw) // 2)  # pixel data that is not all zero
    path.write_bytes(raw)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta = part10.PREAMBLE + part10.file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT)
    return meta, dataset_bytes(bytes(raw))


def _fragments(data: bytes, seed: int) -> list[memoryview]:
    rng, view, out, offset = random.Random(seed), memoryview(data), [], 0
    while offset < len(data):
        size = rng.choice([1, 7, 16_372, 65_536, 300_000, 2 << 20])
        out.append(view[offset:offset + size])
        offset += size
    return out


def _spooler(store: LocalBlobStore, **settings: Any) -> Spooler:
    item = SettingsItem(min_free_space_mb=0, **settings)
    return Spooler(store, lambda: item)


def _receive(spooler: Spooler, meta: bytes, data: bytes, seed: int = 0, context_ts: str = EXPLICIT) -> Spool:
    """What the direct path does: collect up to watch_at, open a spool, write the rest, finish."""
    fragments, collected, size = _fragments(data, seed), [], 0
    while fragments and size <= spooler.watch_at():
        collected.append(fragments.pop(0))
        size += len(collected[-1])
    spool = spooler.open(meta, collected, size, context_ts, {"sop_uid": "1.2.3"})
    for fragment in fragments:
        spool.write(fragment)
    spool.finish()
    return spool


def _spooled(spool: Spool) -> bytes:
    """What the spool file holds (it has no name in blobs/.tmp: create_spool_file)."""
    with spool.mapped() as view:
        return bytes(view)


def _tmp_files(store: LocalBlobStore) -> list[Path]:
    return list(store._tmp.iterdir())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_spool_file_is_the_file_the_in_memory_path_writes(tmp_path: Path, seed: int) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    meta, data = _instance(tmp_path)
    spool = _receive(_spooler(store, spool_threshold_mb=1), meta, data, seed)
    assert not spool.refusal and spool.fd is not None
    expected = meta + data
    assert _spooled(spool) == expected
    assert spool.size == len(expected) and spool.sha256 == hashlib.sha256(expected).hexdigest()
    with spool.mapped() as view:
        assert view[:] == expected
    spool.discard()
    assert _tmp_files(store) == []


def test_file_meta_elements_at_the_start_of_the_data_set_are_dropped_as_in_memory(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    meta, data = _instance(tmp_path)
    injected = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 22) + b"1.2.840.10008.1.2.4.50"
    expected, dropped = part10.without_file_meta_elements(meta + injected + data, EXPLICIT)
    assert dropped == len(injected)
    spool = _receive(_spooler(store, spool_threshold_mb=1), meta, injected + data)
    assert _spooled(spool) == expected
    assert spool.sha256 == hashlib.sha256(expected).hexdigest()
    spool.discard()


def test_a_process_killed_while_it_spools_leaves_no_file(tmp_path: Path) -> None:
    """kill -9 (the out-of-memory killer, say) while an instance arrives: its spool file has no
    name in blobs/.tmp, so nothing of it is left there (the next start removes only temp files
    older than an hour)."""
    script = f"""
import os, signal
from services.receiver.spool import Spooler
from shared.blobstore import LocalBlobStore
from shared.config.model import SettingsItem
item = SettingsItem(min_free_space_mb=0, spool_threshold_mb=1)
spool = Spooler(LocalBlobStore({str(tmp_path / "blobs")!r}), lambda: item).open(
    b"", [b"x" * (2 << 20)], 2 << 20, {EXPLICIT!r}, {{}})
assert spool.fd is not None and not spool.refusal
for _ in range(8):
    spool.write(memoryview(b"y" * (1 << 20)))
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def test_a_spool_is_named_where_unnamed_files_are_not_possible(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from services.receiver import spool as spool_module

    store = LocalBlobStore(tmp_path / "blobs")
    monkeypatch.setitem(spool_module._UNNAMED_WORKS, store._tmp, False)
    meta, data = _instance(tmp_path)
    spool = _receive(_spooler(store, spool_threshold_mb=1), meta, data)
    assert spool.path is not None and spool.path.parent == store._tmp and _tmp_files(store) == [spool.path]
    assert spool.path.read_bytes() == meta + data
    spool.discard()
    assert _tmp_files(store) == []
    ingest = Ingest(LocalBlobWriter(store), Published(), lambda: SettingsItem(min_free_space_mb=0))
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    assert ingest.store_spooled(assoc, _receive(_spooler(store, spool_threshold_mb=1), meta, data), EXPLICIT, "") \
        == STATUS_SUCCESS
    ingest.helpers.shutdown()
    assert _tmp_files(store) == [] and [p.read_bytes() for p in store.root.rglob("*.dcm")] == [meta + data]


def test_a_data_set_over_the_maximum_is_refused_and_its_file_removed_at_once(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    meta, data = _instance(tmp_path, 6)
    spooler = _spooler(store, spool_threshold_mb=1, max_instance_mb=2)
    spool = spooler.open(meta, [memoryview(data)[:(1 << 20) + 1]], (1 << 20) + 1, EXPLICIT, {})
    assert not spool.refusal and spool.fd is not None
    for fragment in _fragments(data[(1 << 20) + 1:], 3):
        spool.write(fragment)
        if spool.received > 2 << 20:
            # Refused as soon as it passed the limit: nothing kept from then on.
            assert spool.refusal == "instance larger than max_instance_mb (2 MB)"
            assert _tmp_files(store) == [] and spool.fd is None
    spool.finish()
    assert spool.received == len(data)
    assert spool.identity is not None
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(meta + data), stop_before_pixels=True)
    assert (spool.identity.series_uid, spool.identity.sop_uid) == (ds.SeriesInstanceUID, ds.SOPInstanceUID)


def test_a_data_set_already_over_the_maximum_when_it_outgrows_memory_gets_no_file(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    meta, data = _instance(tmp_path)
    spooler = _spooler(store, spool_threshold_mb=8, max_instance_mb=1)
    assert spooler.watch_at() == 1 << 20
    spool = spooler.open(meta, [memoryview(data)], len(data), EXPLICIT, {})
    assert spool.refusal.startswith("instance larger than max_instance_mb") and _tmp_files(store) == []
    assert spool.identity is not None and spool.identity.study_uid


def test_a_store_that_is_not_local_only_has_the_maximum(tmp_path: Path) -> None:
    item = SettingsItem(spool_threshold_mb=1, max_instance_mb=0)
    assert Spooler(None, lambda: item).watch_at() > 1 << 40
    item = SettingsItem(spool_threshold_mb=1, max_instance_mb=3)
    assert Spooler(None, lambda: item).watch_at() == 3 << 20


def test_disk_full_while_spooling_refuses_and_leaves_no_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4m") as root:
        store = LocalBlobStore(root)
        meta, data = _instance(tmp_path, 8)
        spool = _receive(_spooler(store, spool_threshold_mb=1), meta, data)
        assert spool.refusal.startswith("blob store write failed") and "No space left" in spool.refusal
        assert _tmp_files(store) == []


def test_free_space_below_the_floor_while_spooling_refuses(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    item = SettingsItem(spool_threshold_mb=1, min_free_space_mb=100)
    free = [200 << 20]
    spooler = Spooler(store, lambda: item)
    store.free_bytes = lambda: free[0]  # type: ignore[method-assign]
    spool = spooler.open(b"", [b"x" * (2 << 20)], 2 << 20, EXPLICIT, {})
    assert not spool.refusal
    free[0] = 99 << 20  # something else filled the disk meanwhile
    for _ in range(20):
        spool.write(memoryview(b"y" * (1 << 20)))
    assert spool.refusal == "free space below min_free_space_mb (100 MB)" and _tmp_files(store) == []


def test_discard_from_another_thread_while_writing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    spool = _spooler(store, spool_threshold_mb=1).open(b"", [b"x" * (2 << 20)], 2 << 20, EXPLICIT, {})
    chunk = memoryview(b"z" * 65536)

    def keep_writing() -> None:
        for _ in range(2000):
            spool.write(chunk)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    time.sleep(0.01)
    spool.discard()  # the association ended
    writer.join()
    spool.finish()
    assert spool.refusal == "the association ended while the instance was received"
    assert _tmp_files(store) == []


# ---------------------------------------------------------------- Ingest.store_spooled


class Published:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event, timeout: float) -> Future[int]:
        self.events.append(event)
        done: Future[int] = Future()
        done.set_result(len(self.events))
        return done


def _ingest(root: Path, **settings: Any) -> tuple[Ingest, Spooler, Published]:
    store = LocalBlobStore(root)
    item = SettingsItem(min_free_space_mb=0, spool_threshold_mb=1, **settings)
    published = Published()
    return Ingest(LocalBlobWriter(store), published, lambda: item), Spooler(store, lambda: item), published


def test_stored_duplicates_and_quarantine_from_spools(tmp_path: Path) -> None:
    ingest, spooler, published = _ingest(tmp_path / "blobs")
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path)
    changed = data[:-1] + bytes([data[-1] ^ 1])
    for payload in (data, data, changed):
        status = ingest.store_spooled(assoc, _receive(spooler, meta, payload), EXPLICIT, "")
        assert status == STATUS_SUCCESS
    received = [e for e in published.events if e.type == "image.received"]
    assert [e.payload["duplicate"] for e in received] == ["new", "identical", "replaced"]
    blob = tmp_path / "blobs" / received[-1].payload["blob_key"]
    assert blob.read_bytes() == meta + changed
    assert received[-1].payload["sha256"] == hashlib.sha256(meta + changed).hexdigest()
    assert received[-1].payload["size"] == len(meta + changed)
    assert received[-1].payload["tags"]["Modality"] == "MG"

    truncated = data[:-1000]
    assert ingest.store_spooled(assoc, _receive(spooler, meta, truncated), EXPLICIT, "") == STATUS_CANNOT_UNDERSTAND
    quarantined = published.events[-1]
    assert quarantined.type == "image.quarantined" and "truncated" in quarantined.payload["reason"]
    assert (tmp_path / "blobs" / quarantined.payload["blob_key"]).read_bytes() == meta + truncated
    assert assoc.take_error_comment(STATUS_CANNOT_UNDERSTAND).startswith("truncated")
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_spool_gets_its_key_as_its_first_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Placed under a new key, an unnamed spool file is linked there directly: it never has a temp
    name that a process killed in between would leave in blobs/.tmp. Only a replaced copy is
    renamed over the old one; a placement that fails leaves nothing, no descriptor either."""
    ingest, spooler, published = _ingest(tmp_path / "blobs")
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path)
    real_replace = os.replace

    def no_rename(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a new spooled instance was renamed into place")

    fds = _open_fds()
    monkeypatch.setattr(os, "replace", no_rename)
    assert ingest.store_spooled(assoc, _receive(spooler, meta, data), EXPLICIT, "") == STATUS_SUCCESS
    monkeypatch.setattr(os, "replace", real_replace)
    blob = tmp_path / "blobs" / published.events[-1].payload["blob_key"]
    assert blob.read_bytes() == meta + data

    changed = data[:-1] + bytes([data[-1] ^ 1])
    assert ingest.store_spooled(assoc, _receive(spooler, meta, changed), EXPLICIT, "") == STATUS_SUCCESS
    assert published.events[-1].payload["duplicate"] == "replaced" and blob.read_bytes() == meta + changed

    blob.unlink()
    blob.mkdir()  # the key cannot be written: a directory is in the way
    status = ingest.store_spooled(assoc, _receive(spooler, meta, data), EXPLICIT, "")
    assert status == STATUS_OUT_OF_RESOURCES and "write failed" in assoc.take_error_comment(status)
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == [] and _open_fds() == fds
    ingest.helpers.shutdown()


def _variant(tmp_path: Path, name: str) -> tuple[str, bytes, bytes]:
    """(transfer syntax, preamble + the receiver's File Meta, data set) of a 3 MB instance, made
    `name`: a well-formed one in another encoding, or one that has to be quarantined."""
    base = pydicom.dcmread(write_large_instance(tmp_path / f"{name}.dcm", 3), stop_before_pixels=True)
    pixels = random.Random(3).randbytes(3 << 20)
    syntax = str({"implicit": ImplicitVRLittleEndian, "deflated": DeflatedExplicitVRLittleEndian,
                  "encapsulated": JPEGBaseline8Bit}.get(name, EXPLICIT))
    base.file_meta.TransferSyntaxUID = pydicom.uid.UID(syntax)
    if name == "no SOP Instance UID":
        del base.SOPInstanceUID
    base.PixelData = encapsulate([pixels[:1 << 20], pixels[1 << 20:]]) if name == "encapsulated" else pixels
    base["PixelData"].VR = "OB" if name == "encapsulated" else "OW"
    if name == "encapsulated":
        base["PixelData"].is_undefined_length = True
    encoded = pydicom.filebase.DicomBytesIO()
    base.save_as(encoded, enforce_file_format=True)
    data = dataset_bytes(encoded.getvalue())
    if name == "File Meta elements in the data set":
        data = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 22) + b"1.2.840.10008.1.2.4.50" + data
    elif name == "cut in the pixel data":
        data = data[:-1000]
    elif name == "cut in an element header":
        data += b"\xfc\xff\xfc"
    sop_uid = str(base.file_meta.MediaStorageSOPInstanceUID)
    return syntax, part10.PREAMBLE + part10.file_meta(str(base.SOPClassUID), sop_uid, syntax), data


@pytest.mark.parametrize("name", ["explicit", "implicit", "deflated", "encapsulated", "File Meta elements in the data set",
                                  "cut in the pixel data", "cut in an element header", "no SOP Instance UID"])
def test_an_instance_spooled_or_held_in_memory_is_stored_and_announced_alike(tmp_path: Path, name: str) -> None:
    """The same instance below the spool threshold (in memory) and above it (spooled): the same
    status, file, and event (tags read from a memory map instead of bytes), or the same quarantine."""
    syntax, meta, data = _variant(tmp_path, name)
    assert len(data) > 2 << 20
    outcomes = []
    for spooled in (False, True):
        ingest, spooler, published = _ingest(tmp_path / f"blobs-{spooled}")
        assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
        if spooled:
            status = ingest.store_spooled(assoc, _receive(spooler, meta, data, context_ts=syntax), syntax, "")
        else:
            status = ingest.store(assoc, meta + data, syntax, "")
        ingest.helpers.shutdown()
        (event,) = published.events
        payload = dict(event.payload)
        blob = (tmp_path / f"blobs-{spooled}" / str(payload.pop("blob_key"))).read_bytes()
        outcomes.append((status, event.type, (event.study_uid, event.series_uid, event.sop_uid), payload, blob))
        assert list((tmp_path / f"blobs-{spooled}" / ".tmp").iterdir()) == []
    in_memory, spooled_outcome = outcomes
    assert spooled_outcome == in_memory
    well_formed = name in ("explicit", "implicit", "deflated", "encapsulated", "File Meta elements in the data set")
    assert in_memory[0] == (STATUS_SUCCESS if well_formed else STATUS_CANNOT_UNDERSTAND), in_memory[3]


def test_a_refused_spool_is_answered_out_of_resources_with_the_reason(tmp_path: Path) -> None:
    ingest, _, published = _ingest(tmp_path / "blobs", max_instance_mb=2)
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path, 4)
    spooler = Spooler(LocalBlobStore(tmp_path / "blobs"), lambda: SettingsItem(
        min_free_space_mb=0, spool_threshold_mb=1, max_instance_mb=2))
    status = ingest.store_spooled(assoc, _receive(spooler, meta, data), EXPLICIT, "1.2.3")
    assert status == STATUS_OUT_OF_RESOURCES
    (rejected,) = published.events
    assert rejected.type == "image.rejected" and rejected.payload["status"] == 0xA700
    assert rejected.payload["reason"] == "instance larger than max_instance_mb (2 MB)"
    assert rejected.sop_uid == "1.2.3" and rejected.series_uid  # read from the head of the data
    assert assoc.take_error_comment(status) == "instance larger than max_instance_mb (2 MB)"
    assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


# ---------------------------------------------------------------- the direct path, no network


class SpoolingAssoc(FakeAssoc):
    def __init__(self) -> None:
        super().__init__()
        self.dul.event_queue = queue.Queue()  # type: ignore[attr-defined]


class Large:
    """direct.LargeData over a real Spooler."""

    def __init__(self, spooler: Spooler) -> None:
        self.spooler = spooler

    def claim(self, assoc: Any) -> Claim:
        return self.spooler.claim(assoc.__dict__.setdefault("caduceus_claims", set()))

    def in_memory_until(self, claim: direct.Claim, size: int) -> int:
        assert isinstance(claim, Claim)
        return self.spooler.in_memory_until(claim, size)

    def outgrown(self, assoc: Any, request: direct.StoreRequest, fragments: list[memoryview], size: int) -> Spool:
        return self.spooler.open(part10.PREAMBLE, fragments, size, request.transfer_syntax_uid, {})


def _large_direct(tmp_path: Path) -> tuple[direct.DirectStore, SpoolingAssoc, list[object], LocalBlobStore]:
    store = LocalBlobStore(tmp_path / "blobs")
    assoc = SpoolingAssoc()
    stored: list[object] = []

    def keep(_assoc: Any, request: direct.StoreRequest, data: list[memoryview] | direct.Sink) -> tuple[int, str]:
        stored.append(b"".join(data) if isinstance(data, list) else data)
        return 0x0000, ""

    spooler = _spooler(store, spool_threshold_mb=1)
    return direct.DirectStore(assoc, lambda _a, _r: True, keep, Large(spooler)), assoc, stored, store


def test_a_data_set_outgrowing_memory_goes_to_the_spool_and_a_small_one_does_not(tmp_path: Path) -> None:
    store, assoc, stored, blobs = _large_direct(tmp_path)
    data = random.Random(5).randbytes(3 << 20)
    command = _store_command(7, "1.2.3.4")
    store.on_pdv(1, _pdv(0x03, command))
    for offset in range(0, len(data), 16_000):
        store.on_pdv(1, _pdv(0x02 if offset + 16_000 >= len(data) else 0x00, data[offset:offset + 16_000]))
    store.on_pdv(1, _pdv(0x03, command))
    store.on_pdv(1, _pdv(0x02, b"small"))
    spool, small = stored
    assert isinstance(spool, Spool) and small == b"small"
    spool.finish()
    assert _spooled(spool) == part10.PREAMBLE + data
    spool.discard()
    assert list(blobs._tmp.iterdir()) == []


def _budget_direct(tmp_path: Path, budget_mb: int) -> tuple[Callable[[], direct.DirectStore], list[object], Spooler]:
    """DirectStores of several associations sharing one Spooler (one receiver process)."""
    spooler = _spooler(LocalBlobStore(tmp_path / "blobs"), spool_threshold_mb=32, spool_memory_budget_mb=budget_mb)
    stored: list[object] = []

    def keep(_assoc: Any, request: direct.StoreRequest, data: list[memoryview] | direct.Sink) -> tuple[int, str]:
        stored.append(b"".join(data) if isinstance(data, list) else data)
        return 0x0000, ""

    return lambda: direct.DirectStore(SpoolingAssoc(), lambda _a, _r: True, keep, Large(spooler)), stored, spooler


def _send(store: direct.DirectStore, data: bytes, *, last: bool, command: bool = True) -> None:
    if command:
        store.on_pdv(1, _pdv(0x03, _store_command(7, "1.2.3.4")))
    for offset in range(0, len(data), 65536):
        end = last and offset + 65536 >= len(data)
        store.on_pdv(1, _pdv(0x02 if end else 0x00, data[offset:offset + 65536]))


def test_a_data_set_below_the_threshold_spools_once_the_memory_budget_is_taken(tmp_path: Path) -> None:
    association, stored, spooler = _budget_direct(tmp_path, budget_mb=8)
    first, second, third = association(), association(), association()
    data = random.Random(7).randbytes(3 << 20)
    _send(first, data, last=False)  # 3 MB held in memory: 2 x 3.06 MB claimed (in 1 MB steps)
    assert first.message is not None and first.message.sink is None
    held = spooler.budget.held
    assert 6 * MB <= held <= 8 * MB
    _send(second, data, last=False)  # the rest of the budget is not enough for its second MB
    assert second.message is not None and isinstance(second.message.sink, Spool)
    assert spooler.budget.held == held  # (what it claimed went back when it was spooled)
    _send(first, b"end", last=True, command=False)
    assert stored == [data + b"end"] and spooler.budget.held == 0
    _send(third, data, last=True)  # the budget is free again: in memory
    _send(second, b"end", last=True, command=False)
    assert stored[1] == data and isinstance(stored[2], Spool)
    stored[2].finish()
    assert _spooled(stored[2]) == part10.PREAMBLE + data + b"end"
    stored[2].discard()
    assert spooler.budget.held == 0


def test_the_memory_budget_gets_back_what_an_ended_association_held(tmp_path: Path) -> None:
    from services.receiver.scp import StorageSCP

    association, _, spooler = _budget_direct(tmp_path, budget_mb=64)
    cut_off, handed_over = association(), association()
    _send(cut_off, bytes(5 << 20), last=False)
    assert spooler.budget.held > 10 * MB
    StorageSCP._abandon_receiving(cut_off.assoc)  # EVT_ABORTED, EVT_CONN_CLOSE
    assert spooler.budget.held == 0
    _send(cut_off, bytes(3 << 20), last=False, command=False)  # (a PDU still being read meanwhile)
    assert spooler.budget.held == 0
    _send(handed_over, bytes(2 << 20), last=False)
    handed_over.on_pdv(1, _pdv(0x01, b"\x00" * 8))  # a command fragment inside the data set: to pynetdicom
    assert handed_over.passthrough and spooler.budget.held == 0


def test_a_spool_still_arriving_is_removed_when_its_association_ends_after_an_earlier_one_was_stored(
        tmp_path: Path) -> None:
    """pynetdicom's path: a sender that does not wait for responses has one large instance
    complete and queued for the handler while the next one is being spooled; the handler storing
    the first must not take the second off the association's list, or that spool is never removed
    when the association is aborted (its descriptor and its unnamed file's space held for good)."""
    from services.receiver.scp import StorageSCP

    ingest, spooler, _ = _ingest(tmp_path / "blobs")
    scp = StorageSCP(ingest, ingest.settings, lambda event: None, "127.0.0.1", 0)
    assoc = SpoolingAssoc()
    info = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path)
    first = _receive(spooler, meta, data)
    scp._receiving(assoc, first)
    second = spooler.open(meta, [memoryview(data)[:(2 << 20)]], 2 << 20, EXPLICIT, {})  # still arriving
    scp._receiving(assoc, second)
    assert scp._store_spooled(assoc, info, first, EXPLICIT, "", 0) == STATUS_SUCCESS
    scp._abandon_receiving(assoc)  # EVT_ABORTED, EVT_CONN_CLOSE
    assert second.fd is None
    ingest.helpers.shutdown()


def test_a_spool_nobody_discarded_closes_its_file_when_it_is_collected(tmp_path: Path) -> None:
    """A safety net for a path that loses a spool: its unnamed file's space goes with it."""
    import gc

    fds = _open_fds()
    spool = _spooler(LocalBlobStore(tmp_path / "blobs"), spool_threshold_mb=1).open(
        b"", [b"x" * (2 << 20)], 2 << 20, EXPLICIT, {})
    assert spool.fd is not None and _open_fds() == fds + 1
    del spool
    gc.collect()
    assert _open_fds() == fds


@pytest.mark.parametrize("oddity", ["command fragment", "other context"])
def test_a_protocol_error_inside_a_spooled_data_set_aborts(tmp_path: Path, oddity: str) -> None:
    store, assoc, stored, blobs = _large_direct(tmp_path)
    store.on_pdv(1, _pdv(0x03, _store_command(7, "1.2.3.4")))
    for _ in range(80):
        store.on_pdv(1, _pdv(0x00, b"d" * 16_000))
    assert store.message is not None and isinstance(store.message.sink, Spool) and store.message.sink.fd is not None
    if oddity == "command fragment":
        store.on_pdv(1, _pdv(0x03, b"c" * 10))
    else:
        store.on_pdv(3, _pdv(0x02, b"d" * 10))
    assert assoc.dul.event_queue.get_nowait() == "Evt19"  # type: ignore[attr-defined]
    assert stored == [] and list(blobs._tmp.iterdir()) == [] and assoc.dimse.pdvs == []


class StreamSocket:
    """recv(n) from a byte string, as the fast path's AssociationSocket.recv: short at the end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0
        self.reads: list[int] = []
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def recv(self, size: int) -> bytes:
        piece = self.data[self.offset:self.offset + size]
        self.offset += len(piece)
        self.reads.append(size)
        return piece


def _p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    body = b"".join(struct.pack(">IBB", len(value) + 2, context_id, control) + value
                    for context_id, control, value in pdvs)
    return struct.pack(">BBI", 0x04, 0, len(body)) + body


@pytest.mark.parametrize("cut", [None, 7 << 20])
def test_a_p_data_pdu_holding_a_whole_instance_is_read_in_pieces(tmp_path: Path, cut: int | None) -> None:
    store, assoc, stored, blobs = _large_direct(tmp_path)
    data = random.Random(6).randbytes(9 << 20)
    pdu = _p_data((1, 0x03, _store_command(7, "1.2.3.4")), (1, 0x02, data))
    sock = StreamSocket(pdu[:cut] if cut else pdu)
    assoc.dul.socket = sock  # type: ignore[attr-defined]
    assoc.dul.state_machine = type("Fsm", (), {"current_state": "Sta6"})()  # type: ignore[attr-defined]
    assoc.dul._idle_timer = type("Timer", (), {"restart": lambda self: None})()  # type: ignore[attr-defined]
    store.read_pdu()
    assert max(sock.reads) <= direct.STREAM_PIECE
    if cut:  # the peer went away mid-PDU: the transport is closed; the association's end removes the spool
        assert assoc.dul.event_queue.get_nowait() == "Evt17"  # type: ignore[attr-defined]
        assert stored == [] and store.message is not None and store.message.sink is not None
        store.message.sink.discard()
    else:
        (spool,) = stored
        assert isinstance(spool, Spool) and len(sock.sent) == 1  # and answered
        spool.finish()
        assert _spooled(spool) == part10.PREAMBLE + data
        spool.discard()
    assert list(blobs._tmp.iterdir()) == []


# ---------------------------------------------------------------- the receiver process


async def test_an_instance_over_the_maximum_is_refused_while_it_arrives(
        receiver: Peer, bus: Bus, data_dir: Path, tmp_path: Path) -> None:
    await apply_settings(bus, max_instance_mb=64)
    big = write_large_instance(tmp_path / "tomo.dcm", 160)
    assert receiver.process is not None
    rss = PeakRss(receiver.process.pid)
    with rss.sampling():
        result = await asyncio.to_thread(storescu, receiver.port, big, extra=["-R", "-v"])
    print(rss.report())
    assert result.returncode != 0 and OUT_OF_RESOURCES.search(result.output), result.output
    assert "Received Store Response (Success)" not in result.output
    (rejected,) = await wait_events(bus, "image.rejected", 1)
    series_uid = str(pydicom.dcmread(big, stop_before_pixels=True).SeriesInstanceUID)
    assert rejected.payload["reason"] == "instance larger than max_instance_mb (64 MB)"
    assert rejected.payload["status"] == 0xA700 and rejected.series_uid == series_uid
    assert blob_files(data_dir) == [] and list((data_dir / "blobs" / ".tmp").iterdir()) == []
    log_line = next(line for line in receiver.log_text().splitlines() if "refused while it is received" in line)
    assert series_uid in log_line
    assert rss.peak - rss.baseline < 64 * MB, rss.report()


def _associate(port: int) -> socket.socket:
    """A raw association proposing CT Image Storage in Explicit VR Little Endian (context 1)."""
    context = pdu_item(0x20, bytes([1, 0, 0, 0]) + pdu_item(0x30, CT_IMAGE_STORAGE.encode())
                       + pdu_item(0x40, EXPLICIT.encode()))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(calling="RAWSENDER", contexts=context))
    assert sock.recv(1) == b"\x02", "no A-ASSOCIATE-AC"
    return sock


def _spool_files(data_dir: Path) -> list[Path]:
    return list((data_dir / "blobs" / ".tmp").iterdir())


def _spools_open(receiver: Peer) -> list[int]:
    """Sizes of the receiver's open files in blobs/.tmp (its spools, which have no name there)."""
    assert receiver.process is not None
    return [size for _, size in open_temp_files(receiver.process.pid)]


@pytest.mark.parametrize("ending", ["a-abort", "socket closed"])
async def test_an_instance_cut_off_mid_way_leaves_no_spool_file(receiver: Peer, data_dir: Path, ending: str) -> None:
    def send_part() -> socket.socket:
        sock = _associate(receiver.port)
        sock.settimeout(None)
        with contextlib.suppress(BlockingIOError):  # (the rest of the A-ASSOCIATE-AC)
            sock.recv(65536, socket.MSG_DONTWAIT)
        sock.sendall(_p_data((1, 0x03, _store_command(1, "1.2.3.4"))))
        piece = _p_data((1, 0x00, b"\0" * (1 << 20)))
        for _ in range(48):  # 48 MB, past the spool threshold (32 MB), not the end of the data set
            sock.sendall(piece)
        return sock

    sock = await asyncio.to_thread(send_part)
    try:
        await asyncio.to_thread(wait_for, lambda: _spools_open(receiver), 10, "a spool file", None, 0.02)
        if ending == "a-abort":
            sock.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0, 0))
    finally:
        sock.close()
    await asyncio.to_thread(wait_for, lambda: not _spools_open(receiver), 10, "the spool file closed", None, 0.02)
    assert _spool_files(data_dir) == []
    assert (await asyncio.to_thread(echoscu, receiver.port)).returncode == 0


def _send_with_pynetdicom(port: int, path: Path) -> int:
    """pynetdicom's SCU, with the file's data set as it is: against caduceus's unlimited maximum
    PDU size it sends the whole data set in a single P-DATA-TF PDU."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="ONEPDU")
        ae.add_requested_context(BREAST_TOMOSYNTHESIS, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


async def test_a_whole_instance_in_one_pdu_is_received_in_pieces(
        receiver: Peer, bus: Bus, data_dir: Path, tmp_path: Path) -> None:
    big = write_large_instance(tmp_path / "tomo.dcm", 160)
    assert receiver.process is not None
    rss = PeakRss(receiver.process.pid)
    with rss.sampling():
        status = await asyncio.to_thread(_send_with_pynetdicom, receiver.port, big)
    print(rss.report())
    assert status == 0
    await wait_events(bus, "image.received", 1)
    (blob,) = blob_files(data_dir)
    assert blob.read_bytes() == _expected_blob(big)
    assert rss.peak - rss.baseline < 96 * MB, rss.report()


async def test_pynetdicoms_own_path_spools_too(nats_url: str, bus: Bus, data_dir: Path, tmp_path: Path) -> None:
    # CADUCEUS_RECEIVER_DIRECT=0: every C-STORE takes pynetdicom's path (as odd UIDs do otherwise).
    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                              env={"CADUCEUS_RECEIVER_DIRECT": "0"})
    try:
        big = write_large_instance(tmp_path / "tomo.dcm", 160)
        assert receiver.process is not None
        rss = PeakRss(receiver.process.pid)
        with rss.sampling():
            result = await asyncio.to_thread(storescu, receiver.port, big, extra=["-R"])
        print(rss.report())
        assert result.returncode == 0, result.output
        (event,) = await wait_events(bus, "image.received", 1)
        (blob,) = blob_files(data_dir)
        assert blob.read_bytes() == _expected_blob(big)
        assert event.payload["sha256"] == hashlib.sha256(blob.read_bytes()).hexdigest()
        assert rss.peak - rss.baseline < 96 * MB, rss.report()
        await apply_settings(bus, max_instance_mb=64)
        refused = await asyncio.to_thread(storescu, receiver.port, big, extra=["-R", "-v"])
        assert refused.returncode != 0 and OUT_OF_RESOURCES.search(refused.output), refused.output
        assert _spool_files(data_dir) == []
    finally:
        receiver.stop()


def test_a_spooled_copy_waits_for_an_older_copy_still_in_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal applier writes a journaled (small) copy behind the sender's back; a spooled copy
    written before it would be overwritten by the older one. So it waits for the applier."""
    from services.receiver import ingest as ingest_module
    from services.receiver.applier import JournalApplier
    from services.receiver.tests.test_journal import FlakyPublisher, _decider, _journal, _put_into

    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    events = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), events, store, _decider(store))
    item = SettingsItem(min_free_space_mb=0, spool_threshold_mb=1)
    ingest = Ingest(LocalBlobWriter(store), Published(), lambda: item, journal=applier, journal_max_bytes=256 * 1024)
    spooler = Spooler(store, lambda: item)
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path)
    small = pydicom.dcmread(pydicom.filebase.DicomBytesIO(meta + data))
    small.NumberOfFrames, small.PixelData = 1, bytes(1024 * 1024 * 2)[:2048]
    small.Rows, small.Columns = 32, 32
    small_bytes = pydicom.filebase.DicomBytesIO()
    small.save_as(small_bytes, enforce_file_format=True)
    assert ingest.store(assoc, small_bytes.getvalue(), EXPLICIT, "") == STATUS_SUCCESS  # journaled, not applied

    monkeypatch.setattr(ingest_module, "JOURNALED_COPY_WAIT_SECONDS", 0.2)
    status = ingest.store_spooled(assoc, _receive(spooler, meta, data), EXPLICIT, "")
    assert status == STATUS_OUT_OF_RESOURCES
    assert assoc.take_error_comment(status) == "an earlier copy of this instance is still being stored"
    assert list(store._tmp.iterdir()) == []

    monkeypatch.setattr(ingest_module, "JOURNALED_COPY_WAIT_SECONDS", 10)
    threading.Timer(0.3, applier.start).start()
    assert ingest.store_spooled(assoc, _receive(spooler, meta, data), EXPLICIT, "") == STATUS_SUCCESS
    assert applier.wait_idle(10)
    applier.stop()
    journal.close()
    ingest.helpers.shutdown()
    (blob,) = (p for p in (tmp_path / "blobs" / "instances").rglob("*") if p.is_file())
    assert blob.read_bytes() == meta + data  # the newer, spooled copy, not the journaled one
    assert len(events.stored) == 2


def test_short_writes_are_continued_and_hashed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.receiver import spool as spool_module

    real_writev = os.writev

    def short_writev(fd: int, buffers: list[Any]) -> int:  # the kernel may write less than asked
        return real_writev(fd, [memoryview(buffers[0])[:max(1, len(buffers[0]) // 3)]])

    monkeypatch.setattr(spool_module.os, "writev", short_writev)
    store = LocalBlobStore(tmp_path / "blobs")
    meta, data = _instance(tmp_path)
    spool = _receive(_spooler(store, spool_threshold_mb=1), meta, data)
    assert _spooled(spool) == meta + data
    assert spool.sha256 == hashlib.sha256(meta + data).hexdigest()
    spool.discard()


@pytest.mark.parametrize("journaled", [False, True], ids=["own-file", "journaled"])
def test_a_small_copy_of_a_large_stored_instance_does_not_read_it_whole(tmp_path: Path, journaled: bool) -> None:
    """A re-sent small copy (a corrected header, a cut-down version) of a stored instance of
    hundreds of MB: the duplicate check compares sizes before it reads the stored file."""
    import tracemalloc

    from services.receiver.applier import JournalApplier
    from services.receiver.tests.test_journal import FlakyPublisher, _decider, _journal, _put_into

    store = LocalBlobStore(tmp_path / "blobs")
    item = SettingsItem(min_free_space_mb=0)
    applier = None
    if journaled:
        applier = JournalApplier(_journal(tmp_path / "journal"), _put_into(store), FlakyPublisher(0), store,
                                 _decider(store))
        applier.start()
    ingest = Ingest(LocalBlobWriter(store), Published(), lambda: item, journal=applier,
                    journal_max_bytes=256 * 1024 if journaled else 0)
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    meta, data = _instance(tmp_path, 64)
    assert ingest.store_spooled(assoc, _receive(Spooler(store, lambda: SettingsItem(
        min_free_space_mb=0, spool_threshold_mb=1)), meta, data), EXPLICIT, "") == STATUS_SUCCESS
    small = pydicom.dcmread(pydicom.filebase.DicomBytesIO(meta + data))
    small.NumberOfFrames, small.Rows, small.Columns, small.PixelData = 1, 32, 32, bytes(2048)
    small_bytes = pydicom.filebase.DicomBytesIO()
    small.save_as(small_bytes, enforce_file_format=True)
    tracemalloc.start()
    try:
        assert ingest.store(assoc, small_bytes.getvalue(), EXPLICIT, "") == STATUS_SUCCESS
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        if applier is not None:
            assert applier.wait_idle(10)
            applier.stop()
            applier.journal.close()
        ingest.helpers.shutdown()
    assert peak < 16 << 20, f"{peak >> 20} MB allocated to store a 2 KB copy"


async def test_the_receiver_sweeps_stale_temp_files_while_it_runs(tmp_path: Path) -> None:
    """Not only at start: a receiver killed mid-write is restarted at once, when its temp file is
    young, and may then run for weeks."""
    from services.receiver.service import sweep_stale_temp

    store = LocalBlobStore(tmp_path / "blobs")
    stale, fresh = store._tmp / "stale.part", store._tmp / "fresh.part"
    stale.write_bytes(b"left by a killed process")
    fresh.write_bytes(b"being written")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    stopping = asyncio.Event()
    sweeper = asyncio.create_task(sweep_stale_temp(store, stopping, interval=0.05))
    try:
        await asyncio.to_thread(wait_for, lambda: not stale.exists(), 5, "the stale temp file removed")
        assert fresh.exists()
    finally:
        stopping.set()
        await asyncio.wait_for(sweeper, 5)


SENDERS = 8
# What the receiver process may add to its RSS while 8 associations send 24 MB instances at once
# (below spool_threshold_mb, each association alone would keep its own in memory): the budget
# (spool_memory_budget_mb, 128 by default) and as much again for receiving and spooling the rest
# and for the allocator's slack.
# Measured: before the budget +338..+447 MB (direct path), +425..+477 MB (pynetdicom's path); with
# it (and two malloc arenas, memory.share_arenas) +112..+145 MB and +146..+173 MB.
MANY_SENDERS_BOUND = 256 * MB


@pytest.mark.parametrize("path", ["direct", "pynetdicom"])
async def test_many_associations_sending_large_instances_share_a_memory_budget(
        nats_url: str, bus: Bus, data_dir: Path, tmp_path: Path, path: str) -> None:
    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log", env={
        "CADUCEUS_RECEIVER_WORKERS": "1", "CADUCEUS_RECEIVER_DIRECT": "1" if path == "direct" else "0"})
    try:
        files = [[write_large_instance(tmp_path / f"s{sender}-{n}.dcm", 24) for n in range(3)]
                 for sender in range(SENDERS)]
        assert receiver.process is not None
        rss = PeakRss(receiver.process.pid)
        with rss.sampling():
            results = await asyncio.gather(*(asyncio.to_thread(storescu, receiver.port, paths, extra=["-R"])
                                             for paths in files))
        print(rss.report())
        assert all(result.returncode == 0 for result in results), [r.output for r in results if r.returncode]
        events = await wait_events(bus, "image.received", SENDERS * 3)
        keys = {str(e.sop_uid): str(e.payload["blob_key"]) for e in events}
        sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for paths in files for p in paths}
        assert set(keys) == set(sent)
        for sop_uid, key in keys.items():  # in memory or spooled: the same file
            assert (data_dir / "blobs" / key).read_bytes() == _expected_blob(sent[sop_uid])
        assert rss.peak - rss.baseline < MANY_SENDERS_BOUND, rss.report()
    finally:
        receiver.stop()


class EventsPublished:
    """JetStream stand-in for the journal applier: stores every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, events: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        futures = []
        for event, _ in events:
            self.events.append(event)
            future: Future[int] = Future()
            future.set_result(len(self.events))
            futures.append(future)
        return futures


@pytest.mark.parametrize("stored", ["newer", "older", "decision lost"])
def test_replaying_a_small_copy_of_a_large_stored_instance_does_not_read_it_whole(
        tmp_path: Path, stored: str) -> None:
    """A small copy of an instance journaled by a receiver that was then killed, while the blob
    store holds a large (spooled) copy of it: the next process's replay compares sizes before it
    reads the stored file. It read the file whole: a stored copy of GBs at every start, and the
    replay happens at every start until it is done."""
    from services.receiver.applier import JournalApplier
    from services.receiver.journal import Journal
    from services.receiver.receipt import Receipt, identified_tags, instance_key
    from services.receiver.service import _file_putter, replay_decider

    store = LocalBlobStore(tmp_path / "blobs")
    writer = LocalBlobWriter(store)
    item = SettingsItem(min_free_space_mb=0)
    decide = replay_decider(lambda: item, writer)
    journal = Journal(tmp_path / "journal", segment_bytes=1 << 20, max_bytes=8 << 20)
    journal.open()
    applier = JournalApplier(journal, _file_putter(writer), EventsPublished(), store, decide)  # never started
    meta, data = _instance(tmp_path, 64)
    small = pydicom.dcmread(pydicom.filebase.DicomBytesIO(meta + data))
    small.NumberOfFrames, small.Rows, small.Columns, small.PixelData = 1, 32, 32, bytes(2048)
    encoded = pydicom.filebase.DicomBytesIO()
    small.save_as(encoded, enforce_file_format=True)
    small_bytes = encoded.getvalue()
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    if stored == "decision lost":  # killed between the record's fdatasync and its decision (or a power cut)
        applier.sync(applier.receive(Receipt.now(assoc, EXPLICIT), small_bytes))
    else:
        ingest = Ingest(writer, Published(), lambda: item, journal=applier, journal_max_bytes=256 * 1024)
        assert ingest.store(assoc, small_bytes, EXPLICIT, "") == STATUS_SUCCESS
        ingest.helpers.shutdown()
    journal.close()  # the receiver is killed before its applier wrote the file
    path = store.path(instance_key(identified_tags(small_bytes, [])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(meta + data)  # the large copy, received by another receiver process
    at = time.time() + (3600 if stored == "newer" else -3600)
    os.utime(path, (at, at))

    journal = Journal(tmp_path / "journal", segment_bytes=1 << 20, max_bytes=8 << 20)
    replayed = journal.open()
    published = EventsPublished()
    applier = JournalApplier(journal, _file_putter(writer), published, store, decide)
    applier.adopt(replayed)
    try:
        peak = idle_peak_bytes(applier)
    finally:
        applier.stop()
        journal.close()
    (event,) = published.events
    if stored == "newer":  # the later, large copy stays
        assert event.payload["duplicate"] == "superseded" and path.stat().st_size == len(meta + data)
    else:
        assert event.payload["duplicate"] in ("new", "replaced") and path.read_bytes() == small_bytes
    assert peak < 16 << 20, f"{peak >> 20} MB allocated to replay a 2 KB copy"
