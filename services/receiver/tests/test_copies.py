"""Two different copies of one SOP instance stored by two receiver processes at once: the blob
file ends up holding the copy received last, whatever order the processes place and publish them
in, and an older copy that finds a newer one stored is published as `superseded`
(services/receiver/placing.py; the router's side: services/router/tests/test_state.py; the whole
chain through to the dispatcher's check: tests/test_copies_of_an_instance.py)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.receiver import part10, placing
from services.receiver.applier import JournalApplier
from services.receiver.ingest import STATUS_SUCCESS, AssociationInfo, Ingest, LocalBlobWriter, SpoolCopy
from services.receiver.journal import Journal
from services.receiver.receipt import identified_tags, instance_key
from services.receiver.service import _file_putter, replay_decider
from services.receiver.spool import Spooler
from shared.blobstore import LocalBlobStore, copy_rank
from shared.config.model import SettingsItem
from shared.events import Event
from tests.e2e.dicomfiles import dataset_bytes

EXPLICIT = "1.2.840.10008.1.2.1"
SETTINGS = SettingsItem(min_free_space_mb=0, spool_threshold_mb=1)


def copy_of(description: str, pixels: int = 64) -> bytes:
    """A copy of one SOP instance (the same UIDs every time); `description` makes it differ."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID("1.2.3.4.5.6")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = "1.2.3", "1.2.3.4", "OT", "P1"
    ds.SeriesDescription = description
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = pixels // 64, 64, 8, 8, 7
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.PixelData = random.Random(description).randbytes(pixels)
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Stream:
    """JetStream stand-in shared by the receiver processes: events in the order they were stored."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def publisher(self, placed: threading.Event | None = None, go: threading.Event | None = None):  # type: ignore[no-untyped-def]
        """A journal applier's publish: says that its files are placed (the applier publishes a
        batch after placing its files), and waits for `go` before its events are stored."""
        def publish(items: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
            if placed is not None:
                placed.set()
            if go is not None:
                assert go.wait(10)
            futures = []
            for event, _ in items:
                with self._lock:
                    self.events.append(event)
                    seq = len(self.events)
                future: Future[int] = Future()
                future.set_result(seq)
                futures.append(future)
            return futures
        return publish

    def newest(self) -> Event:
        """The copy the router routes: the newest by rank among those not superseded."""
        kept = [e for e in self.events if e.payload["duplicate"] != "superseded"]
        return max(kept, key=lambda e: copy_rank(e.occurred_at, e.payload["sha256"]))


class Process:
    """One receiver process: its own journal and applier (not started until `start`), one store."""

    def __init__(self, root: Path, name: str, stream: Stream, placed: threading.Event | None = None,
                 go: threading.Event | None = None) -> None:
        self.store = LocalBlobStore(root / "blobs")
        writer = LocalBlobWriter(self.store)
        self.journal = Journal(root / "journal" / name, segment_bytes=1 << 20, max_bytes=8 << 20)
        self.journal.open()
        self.applier = JournalApplier(self.journal, _file_putter(writer), stream.publisher(placed, go), self.store,
                                      replay_decider(lambda: SETTINGS, writer))
        self.ingest = Ingest(writer, stream.publisher(), lambda: SETTINGS, journal=self.applier,
                             journal_max_bytes=256 * 1024)
        self.assoc = AssociationInfo(f"assoc-{name}", "MODALITY", "CADUCEUS", "127.0.0.1", 104)

    def receive(self, data: bytes) -> None:
        assert self.ingest.store(self.assoc, data, EXPLICIT, "") == STATUS_SUCCESS

    def receive_and_apply(self, data: bytes) -> None:
        """Receive `data`, let the applier place and publish it, then stop."""
        try:
            self.receive(data)
            self.applier.start()
            assert self.applier.wait_idle(10)
        finally:
            self.stop()

    def stop(self) -> None:
        self.applier.stop()
        self.journal.close()
        self.ingest.helpers.shutdown()


def apply_in_order(first: Process, second: Process, placed: threading.Event, go: threading.Event,
                   newer_first: bool) -> None:
    """Run the appliers of `first` (copy A, its publish held back by `go`) and `second` (copy B,
    received later), then stop both. `newer_first`: B placed and published, then A placed; else
    A placed, B placed and published, then A published."""
    try:
        if newer_first:
            go.set()
            second.applier.start()
            assert second.applier.wait_idle(10)
            first.applier.start()
            assert first.applier.wait_idle(10)
        else:
            first.applier.start()
            assert placed.wait(10)  # A's file is placed; its event waits
            second.applier.start()
            assert second.applier.wait_idle(10)
            go.set()
            assert first.applier.wait_idle(10)
    finally:
        go.set()
        first.stop()
        second.stop()


@pytest.mark.parametrize("order", ["newer placed first", "older placed first, published last"])
def test_two_processes_keep_and_announce_the_copy_received_last(tmp_path: Path, order: str) -> None:
    """Process 1 receives copy A, then process 2 copy B. Their journal appliers place the files
    and publish the events in the order given. "newer placed first": A's file went over B's (the
    last write won), so the blob held the older copy while B's event was the newer one."""
    stream = Stream()
    placed, go = threading.Event(), threading.Event()
    first = Process(tmp_path, "w1", stream, placed, go)
    second = Process(tmp_path, "w2", stream)
    older, newer = copy_of("A"), copy_of("B")
    first.receive(older)
    time.sleep(0.002)  # (receipt stamps are in microseconds)
    second.receive(newer)
    apply_in_order(first, second, placed, go, newer_first=order == "newer placed first")
    key = instance_key(identified_tags(newer, []))
    assert [e.payload["sha256"] for e in stream.events] == [_sha(newer), _sha(older)]  # B on the stream first
    assert first.store.get_sync(key) == newer
    assert stream.newest().payload["sha256"] == _sha(newer)
    verdict = stream.events[1].payload["duplicate"]
    assert verdict == ("superseded" if order == "newer placed first" else "new")
    assert first.store.path(key).stat().st_mtime_ns == copy_rank(stream.events[0].occurred_at, "")[0]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored(root: Path, data: bytes, stamp: int) -> Path:
    """`data` stored as a copy received at `stamp` (ns), by another process."""
    store = LocalBlobStore(root)
    key = instance_key(identified_tags(data, []))
    store.put_sync(key, data)
    path = store.path(key)
    os.utime(path, ns=(stamp, stamp))
    return path


@pytest.mark.parametrize("path_taken", ["small", "large", "spooled"])
@pytest.mark.parametrize("stored", ["newer", "older"])
def test_a_live_copy_is_placed_only_over_an_older_one(tmp_path: Path, path_taken: str, stored: str) -> None:
    """The C-STORE paths that place their own file (no journal; large instances; spooled ones)
    compare with the stored copy's stamp under the lock: an older copy is not placed and its event
    says `superseded`."""
    hour = 3600 * 10**9
    other, data = copy_of("stored"), copy_of("received", pixels=300 * 1024 if path_taken != "small" else 64)
    path = _stored(tmp_path / "blobs", other, time.time_ns() + (hour if stored == "newer" else -hour))
    before = path.stat()
    stream = Stream()
    publish = stream.publisher()

    def publish_one(event: Event, timeout: float) -> Future[int]:
        return publish([(event, None)], timeout)[0]

    store = LocalBlobStore(tmp_path / "blobs")
    ingest = Ingest(LocalBlobWriter(store), publish_one, lambda: SETTINGS)
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 104)
    try:
        if path_taken == "spooled":
            meta = part10.PREAMBLE + part10.file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5.6", EXPLICIT)
            body = dataset_bytes(data)
            spool = Spooler(store, lambda: SETTINGS).open(meta, [memoryview(body)], len(body), EXPLICIT, {})
            data = meta + body
            assert ingest.store_spooled(assoc, spool, EXPLICIT, "") == STATUS_SUCCESS
        else:
            assert ingest.store(assoc, data, EXPLICIT, "") == STATUS_SUCCESS
    finally:
        ingest.helpers.shutdown()
    [event] = stream.events
    if stored == "newer":
        assert event.payload["duplicate"] == "superseded"
        assert path.read_bytes() == other and path.stat().st_ino == before.st_ino
    else:
        assert event.payload["duplicate"] == "replaced" and path.read_bytes() == data
        assert path.stat().st_mtime_ns == copy_rank(event.occurred_at, "")[0]
    assert event.payload["sha256"] == _sha(data)
    assert not list((tmp_path / "blobs" / ".tmp").iterdir())  # no temp file left behind


def test_an_identical_copy_received_later_restamps_the_file(tmp_path: Path) -> None:
    """A re-sent identical copy is not written, but the file now stands for it: a different copy
    received between the two must not be placed over it later (else the router, routing the
    identical copy as the newest, would find other bytes)."""
    data, between = copy_of("A"), copy_of("B")
    old = time.time_ns() - 3600 * 10**9
    path = _stored(tmp_path / "blobs", data, old)
    writer = LocalBlobWriter(LocalBlobStore(tmp_path / "blobs"))
    now = time.time_ns() // 1000 * 1000
    assert writer.place_bytes(path, data, now, lambda: _sha(data)) == ("identical", None)
    assert path.stat().st_mtime_ns == now
    verdict, write = writer.place_bytes(path, between, now - 1000, lambda: _sha(between))
    assert (verdict, write, path.read_bytes()) == ("superseded", None, data)
    assert writer.place_bytes(path, data, old, lambda: _sha(data)) == ("identical", None)
    assert path.stat().st_mtime_ns == now  # an older identical copy leaves the stamp alone


def test_copies_with_the_same_stamp_keep_the_greater_sha256(tmp_path: Path) -> None:
    """Received in the same microsecond: the copy with the greater sha256 stays, whichever is
    placed first (the router breaks the tie the same way)."""
    copies = sorted([copy_of("A"), copy_of("B")], key=_sha)
    stamp = time.time_ns() // 1000 * 1000
    for order in (copies, copies[::-1]):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        writer = LocalBlobWriter(LocalBlobStore(root))
        path = writer.store.path(instance_key(identified_tags(copies[0], [])))
        verdicts = []
        for data in order:
            verdict, write = writer.place_bytes(path, data, stamp, lambda data=data: _sha(data))  # type: ignore[misc]
            if write is not None:
                write.close()
            verdicts.append(verdict)
        assert path.read_bytes() == copies[1]
        assert verdicts == (["new", "replaced"] if order is copies else ["new", "superseded"])


def _place_many(root: str, copies: list[tuple[bytes, int]], start: float) -> None:
    """Place each copy with its stamp, from several threads (one receiver process)."""
    writer = LocalBlobWriter(LocalBlobStore(Path(root)))

    def place(data: bytes, stamp: int) -> None:
        path = writer.store.path(instance_key(identified_tags(data, [])))
        _, write = writer.place_bytes(path, data, stamp, lambda: _sha(data))
        if write is not None:
            write.close()

    time.sleep(max(0.0, start - time.time()))
    threads = [threading.Thread(target=place, args=item) for item in copies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_placements_in_two_processes_keep_the_newest_copy(tmp_path: Path) -> None:
    """Two processes with several threads each place copies with random stamps at the same
    moment, rounds over: the copy with the highest stamp is stored every time."""
    context = multiprocessing.get_context("spawn")
    rng = random.Random(7)
    for round_ in range(5):
        root = tmp_path / f"r{round_}"
        copies = [(copy_of(f"copy {round_}-{n}"), time.time_ns() // 1000 * 1000 + rng.randrange(10**9) * 1000)
                  for n in range(12)]
        start = time.time() + 2
        other = context.Process(target=_place_many, args=(str(root), copies[::2], start))
        other.start()
        _place_many(str(root), copies[1::2], start)
        other.join(30)
        assert other.exitcode == 0
        newest = max(copies, key=lambda item: item[1])
        path = LocalBlobStore(root).path(instance_key(identified_tags(newest[0], [])))
        assert path.read_bytes() == newest[0] and path.stat().st_mtime_ns == newest[1]
        assert not list((root / ".tmp").iterdir())


def test_an_identical_larger_copy_journaled_behind_its_twin_restamps_the_file(tmp_path: Path) -> None:
    """Process 1 journals a small copy Q, then a large copy P (journaled behind Q, a `W` record),
    then P again (identical to the pending P: a `-` record, event only). Meanwhile process 2
    stores a copy C received between P and its identical twin. The router routes the twin (the
    newest), so the file must hold its bytes: the `-` record's copy must still be placed (restamped
    over P, or placed over C), else the file keeps C, the dispatcher finds it changed and sends
    nothing, and C, older, is not routed either."""
    stream = Stream()
    first, second = Process(tmp_path, "w1", stream), Process(tmp_path, "w2", stream)
    small, large, between = copy_of("Q"), copy_of("P", pixels=300 * 1024), copy_of("C")
    try:
        first.receive(small)
        time.sleep(0.002)  # (receipt stamps are in microseconds)
        first.receive(large)  # behind Q in the journal
        time.sleep(0.002)
        second.receive(between)
        time.sleep(0.002)
        first.receive(large)  # identical to the pending P
        second.applier.start()
        assert second.applier.wait_idle(10)  # C placed first
        first.applier.start()
        assert first.applier.wait_idle(10)
    finally:
        first.stop()
        second.stop()
    key = instance_key(identified_tags(large, []))
    newest = stream.newest()
    assert newest.payload["sha256"] == _sha(large)
    assert first.store.get_sync(key) == large
    assert first.store.path(key).stat().st_mtime_ns == copy_rank(newest.occurred_at, "")[0]


@pytest.mark.parametrize("named", [False, True], ids=["unnamed (O_TMPFILE)", "named"])
def test_a_spool_placed_as_a_first_copy_over_a_name_just_taken_stays_for_the_comparison(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: bool) -> None:
    """Two first copies at once: the spooled one that finds the name taken (linkat or rename_new
    says EEXIST) is not placed and keeps its file, then goes through the comparison under the
    lock (placing.place_newest), and is placed over the other copy if it is newer."""
    from services.receiver import spool as spool_module
    if named:
        monkeypatch.setattr(spool_module, "_unnamed_works", lambda directory: False)
    store = LocalBlobStore(tmp_path / "blobs")
    writer = LocalBlobWriter(store)
    other, data = copy_of("other"), copy_of("spooled", pixels=300 * 1024)
    meta = part10.PREAMBLE + part10.file_meta("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4.5.6", EXPLICIT)
    body = dataset_bytes(data)
    spool = Spooler(store, lambda: SETTINGS).open(meta, [memoryview(body)], len(body), EXPLICIT, {})
    spool.finish()
    assert (spool.path is not None) == named
    path = store.path(instance_key(identified_tags(other, [])))
    stamp = time.time_ns() // 1000 * 1000
    try:
        path.parent.mkdir(parents=True)
        path.write_bytes(other)  # placed by another thread just after this one found no file
        os.utime(path, ns=(stamp - 1000, stamp - 1000))
        with pytest.raises(FileExistsError):
            writer.place_spool(spool, path, stamp, over=False)
        assert path.read_bytes() == other and spool.fd is not None
        verdict, write = placing.place_newest(path, SpoolCopy(writer, spool, stamp), first=True)
        assert verdict == "replaced" and write is not None
        write.close()
    finally:
        spool.discard()
    assert path.read_bytes() == meta + body and path.stat().st_mtime_ns == stamp
    assert os.stat(path).st_nlink == 1 and not list((tmp_path / "blobs" / ".tmp").iterdir())


@pytest.mark.parametrize("path_taken", ["live", "journaled"])
def test_an_older_copy_superseded_by_a_copy_never_announced_is_still_routed(tmp_path: Path, path_taken: str) -> None:
    """A large copy N is placed by a process that is killed before its F record is durable (its
    sender hears nothing, N gets no event); a copy O received before N, placed after it, is
    `superseded`: O's sender got 0x0000, and the router ignored O's event, so no event routed the
    instance (before copies were ordered, O replaced N and was routed). Now O's event names the
    stored copy, read from its file, and the router routes that one (router/tests/test_state.py;
    through to the dispatcher's check: tests/test_copies_of_an_instance.py)."""
    newer, data = copy_of("N (never announced)", pixels=300 * 1024), copy_of("O")
    stamp = time.time_ns() // 1000 * 1000 + 3600 * 10**9
    path = _stored(tmp_path / "blobs", newer, stamp)
    stream = Stream()
    if path_taken == "journaled":  # the applier places O's file behind the C-STORE
        Process(tmp_path, "w1", stream).receive_and_apply(data)
    else:  # no journal: the association places O's file itself
        publish = stream.publisher()
        ingest = Ingest(LocalBlobWriter(LocalBlobStore(tmp_path / "blobs")),
                        lambda event, timeout: publish([(event, None)], timeout)[0], lambda: SETTINGS)
        try:
            assert ingest.store(AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 104), data, EXPLICIT,
                                "") == STATUS_SUCCESS
        finally:
            ingest.helpers.shutdown()
    [event] = stream.events
    assert event.payload["duplicate"] == "superseded" and event.payload["sha256"] == _sha(data)
    assert path.read_bytes() == newer
    assert event.payload["stored"] == {"received_stamp": stamp, "sha256": _sha(newer), "size": len(newer),
                                       "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
                                       "transfer_syntax_uid": EXPLICIT}
    routable = [e.payload["sha256"] if e.payload["duplicate"] != "superseded" else e.payload["stored"]["sha256"]
                for e in stream.events]
    assert routable == [_sha(path.read_bytes())]


def test_a_superseded_copy_whose_stored_file_is_unreadable_is_published_without_naming_it(tmp_path: Path) -> None:
    """The stored file is not a readable instance (e.g. damaged on disk): the superseded copy's
    event is still published (its sender was told success), without naming the stored copy (`stored` null)."""
    data = copy_of("O")
    path = _stored(tmp_path / "blobs", copy_of("N"), time.time_ns() + 3600 * 10**9)
    stamp = path.stat().st_mtime_ns
    path.write_bytes(b"not DICOM")
    os.utime(path, ns=(stamp, stamp))
    stream = Stream()
    Process(tmp_path, "w1", stream).receive_and_apply(data)
    [event] = stream.events
    assert event.payload["duplicate"] == "superseded" and event.payload.get("stored") is None
    assert path.read_bytes() == b"not DICOM"
