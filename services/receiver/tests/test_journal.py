"""The receiver's write-ahead journal and its applier, in process (the receiver-level tests, with
NATS stopped and kill -9, are in test_receiver.py)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, ExplicitVRLittleEndian

from services.receiver.applier import GATHER_MAX_SECONDS, DecideAgain, JournalApplier, Placing, PutFile
from services.receiver.ingest import AssociationInfo, Ingest, LocalBlobWriter
from services.receiver.journal import HEADER, Journal, JournalError, JournalFull, JournalRecord
from services.receiver.receipt import Duplicate, Receipt, decide_again, instance_key, received_event
from services.receiver.service import _file_putter
from shared.blobstore import LocalBlobStore
from shared.config.model import SettingsItem
from shared.dicomtags import extract_tags
from shared.events import Event, make_event

SEGMENT = 64 * 1024


def _journal(directory: Path, segments: int = 8) -> Journal:
    journal = Journal(directory, segment_bytes=SEGMENT, max_bytes=segments * SEGMENT)
    journal.open()
    return journal


def _reopen(directory: Path, segments: int = 8) -> tuple[Journal, list[tuple[int, bytes, bytes]]]:
    journal = Journal(directory, segment_bytes=SEGMENT, max_bytes=segments * SEGMENT)
    records = journal.open()
    return journal, [(r.seq, r.meta, journal.read_data(r)) for r in records]


def test_records_not_checkpointed_come_back_in_order(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    for n in range(5):
        record = journal.append(b"meta%d" % n, bytes([n]) * (1000 + n))
        assert record.durable and record.settled.is_set()
    journal.checkpoint(2)
    journal.close()
    reopened, records = _reopen(tmp_path)
    assert records == [(3, b"meta2", bytes([2]) * 1002), (4, b"meta3", bytes([3]) * 1003),
                       (5, b"meta4", bytes([4]) * 1004)]
    assert reopened.queue.qsize() == 3  # queued for the applier ahead of new work
    assert reopened.append(b"new", b"x").seq == 6  # seqs keep increasing
    reopened.close()


def test_a_torn_last_record_ends_the_scan(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.append(b"a", b"1" * 500)
    last = journal.append(b"b", b"2" * 500)
    journal.close()
    (segment,) = sorted(tmp_path.glob("seg-*.wal"))
    with open(segment, "r+b") as handle:  # a write that reached the disk only in part
        handle.seek(last.offset + 100)
        handle.write(b"\xff")
    reopened, records = _reopen(tmp_path)
    assert [(seq, meta) for seq, meta, _ in records] == [(1, b"a")]
    reopened.close()


def test_segments_are_reused_once_checkpointed_and_stale_records_stay_dead(tmp_path: Path) -> None:
    journal = _journal(tmp_path, segments=3)
    record_size = 20 * 1024
    seqs = []
    for n in range(40):  # 40 x 20 KB through 3 segments of 64 KB: only possible with reuse
        seqs.append(journal.append(b"m", bytes([n % 251]) * record_size).seq)
        if n % 2:
            journal.checkpoint(seqs[-1])
    assert len(list(tmp_path.glob("seg-*.wal"))) <= 3
    journal.append(b"last", b"z" * 10)
    journal.close()
    reopened, records = _reopen(tmp_path, segments=3)
    assert [(seq, meta) for seq, meta, _ in records] == [(41, b"last")]
    reopened.close()


def test_full_journal_refuses_and_recovers_after_a_checkpoint(tmp_path: Path) -> None:
    journal = _journal(tmp_path, segments=2)
    appended = [journal.append(b"m", b"x" * 30_000) for _ in range(4)]  # 2 per segment
    with pytest.raises(JournalFull, match="journal is full"):
        journal.append(b"m", b"x" * 30_000)
    journal.checkpoint(appended[-1].seq)
    assert journal.append(b"m", b"x" * 30_000).durable
    with pytest.raises(JournalError, match="larger than a journal segment"):
        journal.append(b"m", b"x" * SEGMENT)
    journal.close()


def test_concurrent_appends_are_all_durable_and_recovered(tmp_path: Path) -> None:
    journal = _journal(tmp_path, segments=64)
    results: list[int] = []

    def sender(n: int) -> None:
        for i in range(50):
            results.append(journal.append(b"%d-%d" % (n, i), os.urandom(3000)).seq)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    journal.close()
    reopened, records = _reopen(tmp_path, segments=64)
    assert sorted(results) == [seq for seq, _, _ in records] == list(range(1, 201))
    reopened.close()


def test_segments_of_another_size_are_dropped_once_applied(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.append(b"kept", b"x" * 100)
    journal.close()
    bigger = Journal(tmp_path, segment_bytes=2 * SEGMENT, max_bytes=8 * SEGMENT)
    (record,) = bigger.open()  # the old segment still holds an unapplied record: kept
    bigger.checkpoint(record.seq)
    bigger.close()
    again = Journal(tmp_path, segment_bytes=2 * SEGMENT, max_bytes=8 * SEGMENT)
    assert again.open() == []
    assert {p.stat().st_size for p in tmp_path.glob("seg-*.wal")} == {2 * SEGMENT}
    again.close()


def test_one_process_per_journal(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    with pytest.raises(JournalError, match="in use by another process"):
        Journal(tmp_path, segment_bytes=SEGMENT).open()
    journal.close()
    _journal(tmp_path).close()  # free again once closed


def _event(n: int) -> Event:
    return make_event("image.received", "receiver", {
        "sop_class_uid": "1.2.3", "transfer_syntax_uid": "1.2.840.10008.1.2.1", "blob_key": f"instances/s/{n}.dcm",
        "size": 4, "sha256": "0" * 64, "calling_aet": "A", "called_aet": "B", "peer_host": "127.0.0.1",
        "peer_port": 1, "association_id": "x", "duplicate": "new", "tags": {}}, sop_uid=f"1.{n}")


class FlakyPublisher:
    """JetStream stand-in: refuses the first `failures` publishes, then stores events."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.stored: list[str] = []

    def __call__(self, events: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        futures = []
        for event, _ in events:
            future: Future[int] = Future()
            if self.failures > 0:
                self.failures -= 1
                future.set_exception(RuntimeError("no responders"))
            else:
                self.stored.append(event.event_id)
                future.set_result(len(self.stored))
            futures.append(future)
        return futures


def _decider(store: LocalBlobStore) -> DecideAgain:
    """As the receiver's (services/receiver/service.py replay_decider), with the default tag list."""
    def decide(receipt: Receipt, data: bytes, sha256: str, verdict: Duplicate | None) -> tuple[Event, bool] | None:
        return decide_again(receipt, data, sha256, verdict, SettingsItem().extract_tags,
                            lambda key, copy: LocalBlobWriter.duplicate_of(store.path(key), copy))
    return decide


def _put_into(store: LocalBlobStore) -> PutFile:
    """As the receiver's (services/receiver/service.py)."""
    return _file_putter(LocalBlobWriter(store))


def test_applier_writes_files_retries_publishes_and_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.receiver.applier.RETRY_FIRST_SECONDS", 0.01)
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    publisher = FlakyPublisher(failures=3)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store), 1.0)
    events = [_event(n) for n in range(6)]
    for n, event in enumerate(events):
        applier.accept(event, f"instances/s/{n}.dcm", "sha", b"DATA" if n != 5 else None)  # 5: identical duplicate
    assert applier.pending_sha256("instances/s/0.dcm") == "sha"
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    assert sorted(publisher.stored) == sorted(e.event_id for e in events)  # each once, after retries
    assert applier.publish_retries >= 3 and applier.pending_sha256("instances/s/0.dcm") is None
    assert sorted(p.name for p in (tmp_path / "blobs" / "instances" / "s").iterdir()) == [f"{n}.dcm" for n in range(5)]
    journal.close()
    reopened, records = _reopen(tmp_path / "journal")
    assert records == []  # all checkpointed
    reopened.close()


def test_applier_replays_what_a_dead_process_left(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store,  # never started
                          _decider(store))
    events = [_event(n) for n in range(3)]
    for n, event in enumerate(events):
        dead.accept(event, f"instances/s/{n}.dcm", "sha", b"D%d" % n)
    journal.close()  # the process is gone; nothing was applied

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    assert len(journal.open()) == 3
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    assert publisher.stored == [e.event_id for e in events]  # the recorded events, same ids, in order
    assert store.get_sync("instances/s/2.dcm") == b"D2"
    journal.close()


def test_header_layout_is_stable() -> None:
    # Records written by one version must be readable by the next: changing the header is a
    # format change (new magic), not an edit.
    assert HEADER.size == 24


def test_applier_batches_a_stream_and_applies_as_soon_as_it_pauses(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal", segments=64)
    batches: list[int] = []

    def publish(events: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        batches.append(len(events))
        return FlakyPublisher(0)(events, timeout)

    applier = JournalApplier(journal, _put_into(store), publish, store, _decider(store))
    applier.start()
    # A continuous stream (an instance every 2 ms for ~0.4 s): applied in a few large batches.
    for n in range(200):
        applier.accept(_event(n), f"instances/s/{n}.dcm", "sha", b"D")
        time.sleep(0.002)
    assert applier.wait_idle(10)
    assert sum(batches) == 200 and len(batches) <= 20, batches  # a fixed 10 ms gather: ~40
    # A lone instance after the stream: out within a few idle periods, not after the longest gather.
    batches.clear()
    start = time.monotonic()
    applier.accept(_event(999), "instances/s/999.dcm", "sha", b"D")
    while not batches and time.monotonic() - start < 5:
        time.sleep(0.001)
    assert batches == [1] and time.monotonic() - start < GATHER_MAX_SECONDS / 2
    applier.stop()
    journal.close()


def _instance(n: int) -> bytes:
    """A small readable DICOM instance (Part 10 bytes)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = UID(f"1.2.3.4.{n}")
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = "1.2.3", "1.2.3.4", "OT", "P1"
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class _Assoc:
    association_id, calling_aet, called_aet, peer_host, peer_port = "a1", "SENDER", "CADUCEUS", "127.0.0.1", 104


def _receive(applier: JournalApplier, data: bytes) -> tuple[Receipt, JournalRecord]:
    receipt = Receipt.now(_Assoc(), "1.2.840.10008.1.2.1")
    record = applier.receive(receipt, data)
    applier.sync(record)
    return receipt, record


def _decision(receipt: Receipt, data: bytes, duplicate: Duplicate) -> Event:
    tags = extract_tags(data, SettingsItem().extract_tags)
    return received_event(receipt, tags, instance_key(tags), len(data), hashlib.sha256(data).hexdigest(), duplicate)


def test_received_records_are_applied_live_as_decided(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.start()
    first, second = _instance(1), _instance(2)
    receipt, record = _receive(applier, first)
    assert not record.settled.is_set()  # the applier waits for the decision
    applier.decide(record, _decision(receipt, first, "new"))
    refused_receipt, refused = _receive(applier, second)
    applier.refuse(refused)  # e.g. its header was unreadable: quarantined, 0xC000
    assert applier.wait_idle(10)
    applier.stop()
    assert publisher.stored == [receipt.event_id]  # the event carries the receipt's id
    assert store.get_sync(instance_key(extract_tags(first, []))) == first
    assert LocalBlobWriter(store).read(instance_key(extract_tags(second, []))) is None
    journal.close()


def test_received_records_replay_with_their_recorded_verdicts(tmp_path: Path) -> None:
    """A killed receiver leaves R records with their D / X records (in the page cache, so
    they survive kill -9); the next process applies them as they were decided."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    datas = [_instance(n) for n in range(4)]
    store.put_sync(instance_key(extract_tags(datas[1], [])), datas[1])  # 1 is an identical copy
    receipts = []
    for n, data in enumerate(datas):
        receipt, record = _receive(dead, data)
        receipts.append(receipt)
        if n == 0:
            dead.decide(record, _decision(receipt, data, "new"))
            store.put_sync(instance_key(extract_tags(data, [])), data)  # its file, written before the kill
        elif n == 1:
            dead.decide(record, _decision(receipt, data, "identical"))
        elif n == 2:
            dead.refuse(record)
        # 3: the process died before deciding (its sender heard nothing)
    journal.close()

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    replayed = journal.open()
    assert [r.meta[:1] for r in replayed] == [b"R", b"D", b"R", b"D", b"R", b"X", b"R"]
    events: list[Event] = []
    written: list[str] = []

    def publish(items: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        events.extend(event for event, _ in items)
        return FlakyPublisher(0)(items, timeout)

    put_into = _put_into(store)

    def put(key: str, data: bytes, replayed: bool, placing: Placing | None) -> Duplicate:
        placed = put_into(key, data, replayed, placing)
        if placed != "identical":
            written.append(key)
        return placed

    applier = JournalApplier(journal, put, publish, store, _decider(store))
    applier.adopt(replayed)
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    assert [e.event_id for e in events] == [receipts[n].event_id for n in (0, 1, 3)]
    # The recorded verdicts, not what the blob store says now (0's file is there: "identical").
    assert [e.payload["duplicate"] for e in events] == ["new", "identical", "new"]
    # Not the identical copy, nor 0, whose file was written before the kill.
    assert written == [instance_key(extract_tags(datas[3], []))]
    assert LocalBlobWriter(store).read(instance_key(extract_tags(datas[2], []))) is None  # refused: never applied
    journal.close()


@pytest.mark.parametrize("stored_copy", ["later", "earlier"])
def test_a_replay_does_not_overwrite_a_copy_received_after_it(tmp_path: Path, stored_copy: str) -> None:
    """Two receiver processes each accepted a copy of one instance; the one that took the earlier
    copy was killed before writing it. Its replay must not put the older bytes over the later
    copy (a loss-hunting review found it did), yet must still replace an older file."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    replayed_copy = _instance(7)
    other_copy = replayed_copy.replace(b"P1", b"P2")
    receipt, record = _receive(dead, replayed_copy)
    dead.decide(record, _decision(receipt, replayed_copy, "new"))
    journal.close()
    key = instance_key(extract_tags(replayed_copy, []))
    store.put_sync(key, other_copy)  # by the other process: stamped a second after or before the receipt
    received_ns = int(receipt.occurred_at.timestamp()) * 10**9 + receipt.occurred_at.microsecond * 1000
    stamp = received_ns + (10**9 if stored_copy == "later" else -(10**9))
    os.utime(store.path(key), ns=(stamp, stamp))

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.adopt(journal.open())
    events: list[Event] = []
    publish_into = applier.publish_batch

    def publish(items: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        events.extend(event for event, _ in items)
        return publish_into(items, timeout)

    applier.publish_batch = publish
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    [event] = events
    assert event.event_id == receipt.event_id
    if stored_copy == "later":
        assert store.get_sync(key) == other_copy and event.payload["duplicate"] == "superseded"
    else:
        assert store.get_sync(key) == replayed_copy and event.payload["duplicate"] == "new"
        assert store.path(key).stat().st_mtime_ns == received_ns  # stamped with its receipt time
    journal.close()


def test_a_received_record_whose_decision_was_lost_is_decided_again(tmp_path: Path) -> None:
    """A power cut can lose the D record (it has no fdatasync of its own) after the sender heard
    success: the instance is decided again from its bytes; an unreadable one is skipped."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    data = _instance(7)
    receipt, _ = _receive(dead, data)
    _receive(dead, b"not DICOM at all" * 20)
    journal.close()

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    replayed = journal.open()
    events: list[Event] = []

    def publish(items: list[tuple[Event, bytes | None]], timeout: float) -> list[Future[int]]:
        events.extend(event for event, _ in items)
        return FlakyPublisher(0)(items, timeout)

    applier = JournalApplier(journal, _put_into(store), publish, store, _decider(store))
    applier.adopt(replayed)
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    (event,) = events
    assert event.event_id == receipt.event_id and event.occurred_at == receipt.occurred_at
    assert event.payload["duplicate"] == "new" and event.payload["calling_aet"] == "SENDER"
    assert event.payload["sha256"] == hashlib.sha256(data).hexdigest() and event.sop_uid == "1.2.3.4.7"
    assert store.get_sync(event.payload["blob_key"]) == data
    journal.close()


def test_filed_events_are_published_once_file_and_record_are_durable(tmp_path: Path) -> None:
    """F records (an instance above receiver_journal_max_kb: its own blob file, fsynced by the
    association, and its event in the journal): live, published once confirmed, never if refused;
    replayed, published only if the file they announce is on disk as received."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.start()
    confirmed, refused = _filed(store, 1), _filed(store, 2)
    kept = applier.file(confirmed)
    assert not kept.settled.is_set()  # the applier waits until the file and the record are durable
    applier.sync(kept)
    applier.confirm(kept)
    applier.refuse(applier.file(refused))  # e.g. the file's fsync failed: the sender heard 0xA700
    assert applier.wait_idle(10)
    applier.stop()
    assert publisher.stored == [confirmed.event_id]
    journal.close()

    journal = _journal(tmp_path / "journal-2")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    intact, gone, changed, refused = (_filed(store, n) for n in (3, 4, 5, 6))
    for event in (intact, gone, changed):
        dead.sync(dead.file(event))
    dead.refuse(dead.file(refused))
    journal.close()
    (tmp_path / "blobs" / str(gone.payload["blob_key"])).unlink()  # a power cut took the file, not the record
    store.put_sync(str(changed.payload["blob_key"]), b"torn")

    journal = Journal(tmp_path / "journal-2", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    replayed = journal.open()
    assert [r.meta[:1] for r in replayed] == [b"F", b"F", b"F", b"F", b"X"]
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.adopt(replayed)
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    assert publisher.stored == [intact.event_id]
    journal.close()


def test_a_checkpoint_syncs_the_filesystem_only_after_the_applier_wrote_files(tmp_path: Path) -> None:
    """Blob files written by the applier need a syncfs before their records are checkpointed; the
    files of F records were fsynced by the association, so a stream of them needs none."""
    class CountingStore(LocalBlobStore):
        syncs = 0

        def sync_filesystem(self) -> None:
            CountingStore.syncs += 1
            super().sync_filesystem()

    store = CountingStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    applier = JournalApplier(journal, _put_into(store), FlakyPublisher(0), store, _decider(store))
    applier.start()
    for n in range(3):
        record = applier.file(_filed(store, n))
        applier.sync(record)
        applier.confirm(record)
    assert applier.wait_idle(10) and journal.checkpointed > 0
    assert CountingStore.syncs == 0
    receipt, record = _receive(applier, _instance(9))
    applier.decide(record, _decision(receipt, _instance(9), "new"))  # the applier writes this file
    assert applier.wait_idle(10)
    assert CountingStore.syncs == 1
    applier.stop()
    journal.close()


def _filed(store: LocalBlobStore, n: int) -> Event:
    """The event of an instance whose blob file is in the store (as Ingest._finish_filed has it)."""
    data = _instance(n)
    receipt = Receipt.now(_Assoc(), "1.2.840.10008.1.2.1")
    event = _decision(receipt, data, "new")
    store.put_sync(str(event.payload["blob_key"]), data)
    return event


def test_a_replayed_record_whose_event_cannot_be_built_is_kept_aside(tmp_path: Path) -> None:
    """A bug in building a replayed instance's event must not stop the instances behind it, nor
    lose the bytes: they go under quarantine/."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    first, second = _instance(1), _instance(2)
    _receive(dead, first)
    receipt, _ = _receive(dead, second)
    journal.close()

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    replayed = journal.open()
    decide = _decider(store)

    def broken_for_the_first(receipt: Receipt, data: bytes, sha256: str, verdict: Duplicate | None) -> tuple[Event, bool] | None:
        if data == first:
            raise ValueError("a bug")
        return decide(receipt, data, sha256, verdict)

    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, broken_for_the_first)
    applier.adopt(replayed)
    applier.start()
    assert applier.wait_idle(10)
    applier.stop()
    assert publisher.stored == [receipt.event_id]
    (kept,) = [path for path in (tmp_path / "blobs" / "quarantine").rglob("journal-*")]
    assert kept.read_bytes() == first
    journal.close()


def test_concurrent_journaled_stores_are_all_accepted_once(tmp_path: Path) -> None:
    """Several associations at once in one process: header reads on the associations' own threads,
    records interleaved, fdatasyncs shared (Ingest._store_journaled); every instance is accepted,
    its file written with its bytes and its event published once (a resent one too)."""
    store = LocalBlobStore(tmp_path / "blobs")
    journal = _journal(tmp_path / "journal", segments=64)
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.start()
    settings = SettingsItem()
    ingest = Ingest(LocalBlobWriter(store), _not_journaled, lambda: settings, journal=applier,
                    journal_max_bytes=256 * 1024)
    datas = [_instance(n) for n in range(80)]

    def send(part: list[bytes]) -> list[int]:
        assoc = AssociationInfo(f"a{len(part)}", "SENDER", "CADUCEUS", "127.0.0.1", 104)
        return [ingest.store(assoc, data, "1.2.840.10008.1.2.1", "") for data in part]

    with ThreadPoolExecutor(4) as pool:
        statuses = [status for part in pool.map(send, [datas[i::4] for i in range(4)]) for status in part]
    assert statuses == [0] * len(datas)
    assert ingest.store(AssociationInfo("again", "SENDER", "CADUCEUS", "127.0.0.1", 104), datas[0],
                        "1.2.840.10008.1.2.1", "") == 0
    assert applier.wait_idle(10)
    applier.stop()
    ingest.helpers.shutdown()
    assert len(publisher.stored) == len(set(publisher.stored)) == len(datas) + 1
    for data in datas:
        assert store.get_sync(instance_key(extract_tags(data, []))) == data
    journal.close()


def _not_journaled(event: Event, timeout: float) -> Future[int]:
    raise AssertionError("every instance here is journaled")


def test_a_replayed_filed_record_checks_a_large_file_without_reading_it_whole(tmp_path: Path) -> None:
    """A spooled instance (services/receiver/spool.py) of hundreds of MB has an F record too: its
    replay after a crash hashes the file it names in chunks, not as one bytes object."""
    from services.receiver.tests.helpers import idle_peak_bytes
    from tests.e2e.dicomfiles import write_large_instance

    store = LocalBlobStore(tmp_path / "blobs")
    source = write_large_instance(tmp_path / "large.dcm", 64)
    tags = extract_tags(source, [])
    key = instance_key(tags)
    store.path(key).parent.mkdir(parents=True)
    os.replace(source, store.path(key))
    with open(store.path(key), "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    event = received_event(Receipt.now(_Assoc(), "1.2.840.10008.1.2.1"), tags, key, store.path(key).stat().st_size,
                           sha256, "new")
    journal = _journal(tmp_path / "journal")
    dead = JournalApplier(journal, lambda key, data, replayed, placing: "new", FlakyPublisher(0), store, _decider(store))
    dead.sync(dead.file(event))
    journal.close()

    journal = Journal(tmp_path / "journal", segment_bytes=SEGMENT, max_bytes=8 * SEGMENT)
    replayed = journal.open()
    publisher = FlakyPublisher(0)
    applier = JournalApplier(journal, _put_into(store), publisher, store, _decider(store))
    applier.adopt(replayed)
    peak = idle_peak_bytes(applier)
    applier.stop()
    journal.close()
    assert publisher.stored == [event.event_id]
    assert peak < 16 << 20, f"{peak >> 20} MB allocated to check a 64 MB file"
