"""Behind the journal: put each journaled instance's blob file in place and publish its event.

The C-STORE path (Ingest) answers success once the instance is durable in the journal
(services/receiver/journal.py) and its `image.received` is decided. This thread then, for each
record in seq order:
writes the blob file (visible to every reader before its event goes out), publishes the recorded
`image.received` (the same event_id as recorded, so a replay is de-duplicated by JetStream), and
retries the publish for as long as it takes: the instance was accepted, so giving up is not an
option. About once a second (and whenever it runs out of work) it makes the blob files it wrote
durable with one `syncfs` (none if it wrote none) and checkpoints the journal, which lets segments
be reused.

Records (the first byte of a record's meta says which):
- `R` (received): receipt (services/receiver/receipt.py) + the instance's bytes, written before its
  header is read, so that the journal's fdatasync and the header read overlap (`receive`, then
  `decide` or `refuse`). What it becomes is told by a later record that is not synced on its own:
  - `D` (decided): the R record's seq and its duplicate verdict (`n`ew, `i`dentical, `r`eplaced);
  - `X` (refused): the R record's seq; its sender was refused (or the data quarantined).
  Both are in the page cache before the sender hears anything, so a killed process leaves them
  for its successor. Only a power cut can lose them (they become durable with the next record's
  fdatasync). A replayed R record's event is built again from its receipt and bytes, with the
  verdict of its D record or, if that was lost, the verdict the blob store gives now
  (`decide_again`).
- `F` (filed): the event of an instance whose blob file the association wrote and fsynced itself
  (above `receiver_journal_max_kb`, where a second copy of the bytes would cost more than it
  saves); `confirm` once file and record are durable, else `refuse` (an X record). Replayed, it
  is published only if the file it names is on disk with the recorded sha256.
- `W` / `-` (whole): the event and the bytes (`W`) or the event alone (`-`: an identical copy is
  stored already; on a local store identical copies are `W` too, placed to restamp the file),
  decided before writing (`accept`): a larger copy of an instance waiting in the
  journal, and records of earlier versions.

A receiver that dies leaves its unapplied records in the journal; the next process's
`Journal.open()` queues them ahead of new work (`adopt` pairs them with their decisions), and this
thread applies them as if just received.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import struct
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.receiver.journal import Journal, JournalError, JournalRecord
from services.receiver.placing import as_superseded
from services.receiver.receipt import Duplicate, Receipt
from shared.blobstore import BlobError, LocalBlobStore, blob_key, receipt_stamp
from shared.events import Event

log = logging.getLogger(__name__)

WRITE, NO_WRITE = b"W", b"-"
RECEIVED, DECIDED, REFUSED = b"R", b"D", b"X"
FILED = b"F"
SEQ = struct.Struct("<Q")
CHECKPOINT_SECONDS = 1.0
# While instances keep arriving, the applier waits and applies them in large batches; as soon as
# the stream pauses (nothing new for GATHER_IDLE_SECONDS) it applies what it has. Why: the
# applier's work interleaved with the association threads slows them (GIL hand-overs, wake-ups, the
# event loop publishing a few events at a time). 2000 MR images from one sender, alternating runs:
# median 1.69 s this way, 1.80 s with batches gathered for a fixed 10 ms (docs/performance.md).
# An event of a continuous stream goes out at most GATHER_MAX_SECONDS (plus the batch's own work)
# after its instance was journaled; the last of a burst ~GATHER_IDLE_SECONDS after it.
BATCH_RECORDS = 1024
GATHER_IDLE_SECONDS = 0.005
GATHER_MAX_SECONDS = 0.5

PublishBatch = Callable[[list[tuple[Event, bytes | None]], float], list[Future[int]]]


@dataclass(frozen=True)
class Placing:
    """Which copy of an instance a journaled file is (services/receiver/placing.py)."""

    stamp: int  # its receipt stamp (shared.blobstore.receipt_stamp)
    sha256: str
    first: bool  # no copy was stored when it was received: it is tried as the first one at once


# put_file(key, data, replayed, placing) -> verdict: writes the blob (durable or not: `store` decides
# what syncfs covers), an instance's copy only over an older one (else "superseded" or "identical");
# placing None: other bytes (quarantined), written as they are. A replayed record's file may be there.
PutFile = Callable[[str, bytes, bool, "Placing | None"], Duplicate]
# decide_again(receipt, data, sha256, verdict or None) -> (event, write the file?) or None
# (unreadable: skip it); services/receiver/receipt.py.
DecideAgain = Callable[[Receipt, bytes, str, "Duplicate | None"], "tuple[Event, bool] | None"]
VERDICTS: dict[bytes, Duplicate] = {b"n": "new", b"i": "identical", b"r": "replaced"}
VERDICT_BYTES = {verdict: code for code, verdict in VERDICTS.items()}
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 10.0


class JournalApplier:
    def __init__(self, journal: Journal, put_file: PutFile, publish_batch: PublishBatch,
                 store: LocalBlobStore | None, decide_again: DecideAgain, publish_timeout: float = 5.0) -> None:
        self.journal = journal
        self.decide_again = decide_again
        self.put_file = put_file
        self.publish_batch = publish_batch
        self.store = store  # a local store whose files need a syncfs before a checkpoint
        self.publish_timeout = publish_timeout
        self.applied_seq = journal.checkpointed
        self.published = 0
        self.publish_retries = 0
        # Set while blob writes fail (disk full, store unreachable): the receiver then refuses new
        # instances, as it would without the journal, instead of filling the journal behind it.
        self.blob_error: str | None = None
        self._pending: dict[str, tuple[str, int]] = {}  # blob key -> (sha256 of latest, records to write)
        self._pending_lock = threading.Lock()
        # From `adopt`: the verdicts and refusals of replayed R records.
        self._verdicts: dict[int, Duplicate] = {}
        self._refusals: set[int] = set()
        self._stopping = threading.Event()
        self._give_up_at = float("inf")
        self._last_checkpoint = time.monotonic()
        # Blob files written by this thread and not yet covered by a syncfs. F records' files are
        # fsynced by the association already: a stream of large instances needs no syncfs, which
        # would also flush every other process's dirty pages on the filesystem.
        self._files_to_sync = False
        self._thread = threading.Thread(target=self._run, name="journal-applier", daemon=True)

    # ------------------------------------------------------------ association threads

    def accept(self, event: Event, key: str, sha256: str, data: bytes | None) -> None:
        """Journal an instance whose event is decided already (a `W` / `-` record; data None: its
        identical copy is already stored, only the event).

        Returns once the record is durable; raises JournalError (the sender must be refused).
        """
        if data is not None:
            with self._pending_lock:
                _, count = self._pending.get(key, ("", 0))
                self._pending[key] = (sha256, count + 1)
        event_json = event.to_json()
        try:
            self.journal.append((WRITE if data is not None else NO_WRITE) + event_json, data or b"",
                                attachment=(event, event_json))
        except BaseException:
            if data is not None:
                self._written(key)
            raise

    def file(self, event: Event) -> JournalRecord:
        """Write the event of an instance whose blob file the caller writes and fsyncs itself (an
        `F` record, not yet synced; the disk starts on it at once). `confirm` once file and record
        are durable, else `refuse`. Raises JournalError."""
        event_json = event.to_json()
        record = self.journal.write(FILED + event_json, b"", attachment=(event, event_json, False))
        self.journal.start_writeback(record)
        return record

    def confirm(self, record: JournalRecord) -> None:
        """The synced F record's file is durable too: publish its event."""
        self.journal.settle(record, durable=True)

    def receive(self, receipt: Receipt, data: bytes) -> JournalRecord:
        """Write an instance's bytes (not yet synced: `Journal.sync`); `decide` or `refuse` must
        follow. Raises JournalError."""
        return self.journal.write(RECEIVED + receipt.to_json(), data)

    def sync(self, record: JournalRecord) -> None:
        """Return once the R record is on disk; raises JournalError."""
        self.journal.sync(record)

    def decide(self, record: JournalRecord, event: Event) -> None:
        """The synced R record is accepted as `event` (its `image.received`, with its verdict)."""
        duplicate: Duplicate = event.payload["duplicate"]
        write = duplicate != "identical"
        if write:
            key = str(event.payload["blob_key"])
            with self._pending_lock:
                _, count = self._pending.get(key, ("", 0))
                self._pending[key] = (str(event.payload["sha256"]), count + 1)
        record.attachment = (event, None, write)
        self._mark(DECIDED + SEQ.pack(record.seq) + VERDICT_BYTES[duplicate])
        self.journal.settle(record, durable=True)

    def refuse(self, record: JournalRecord) -> None:
        """The R record's sender was refused: it is never applied."""
        if record.settled.is_set():
            return
        self._mark(REFUSED + SEQ.pack(record.seq))
        self.journal.settle(record, durable=False)

    def _mark(self, meta: bytes) -> None:
        """A D or X record: no fdatasync of its own (see the module docstring)."""
        try:
            self.journal.settle(self.journal.write(meta, b""), durable=True)
        except JournalError as exc:  # the R record is what counts; a replay decides it again
            log.error("could not journal the decision of an instance: %s", exc)

    def adopt(self, replayed: list[JournalRecord]) -> None:
        """Before `start`: pair the R records a previous process left with their D / X records."""
        for record in replayed:
            kind = record.meta[:1]
            if kind == DECIDED:
                (seq,) = SEQ.unpack_from(record.meta, 1)
                self._verdicts[seq] = VERDICTS[record.meta[1 + SEQ.size:]]
            elif kind == REFUSED:
                self._refusals.add(SEQ.unpack_from(record.meta, 1)[0])

    def pending_sha256(self, key: str) -> str | None:
        """sha256 of the newest journaled copy of `key` whose file is not yet written, if any."""
        entry = self._pending.get(key)
        return entry[0] if entry else None

    def _written(self, key: str) -> None:
        with self._pending_lock:
            sha256, count = self._pending.get(key, ("", 1))
            if count <= 1:
                self._pending.pop(key, None)
            else:
                self._pending[key] = (sha256, count - 1)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float = 10.0) -> bool:
        """Apply what is queued (giving up after `grace` s if JetStream does not answer or blob
        writes fail; the journal keeps the rest for the next start), checkpoint, stop.

        Returns False if the thread is still running (then the journal must stay open)."""
        self._give_up_at = time.monotonic() + grace
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(grace + self.publish_timeout + 5)
        return not self._thread.is_alive()

    def _giving_up(self) -> bool:
        return self._stopping.is_set() and time.monotonic() >= self._give_up_at

    def wait_idle(self, timeout: float) -> bool:
        """True once everything journaled so far is applied and checkpointed (tests, replay)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.journal.stats()["journal_unapplied"] == 0:
                return True
            time.sleep(0.02)
        return False

    def details(self) -> dict[str, Any]:
        return {**self.journal.stats(), "journal_published": self.published,
                "journal_publish_retries": self.publish_retries}

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch:
                if not self._apply(batch):
                    break  # stopping and JetStream does not answer: the journal keeps the rest
                self._checkpoint(idle=False)
                continue
            if self._stopping.is_set():
                break
            self._checkpoint(idle=True)
            try:
                self.journal.prepare_spare()
            except OSError as exc:
                log.warning("could not create a spare journal segment: %s", exc)
        self._checkpoint(idle=True)

    def _take(self) -> list[JournalRecord]:
        records = self.journal.queue
        try:
            batch = [records.get(timeout=0.2)]
        except queue.Empty:
            return []
        # Polled, not woken per record: a wake-up per image would hand the GIL over per image.
        deadline = time.monotonic() + GATHER_MAX_SECONDS
        waiting = records.qsize()
        while waiting < BATCH_RECORDS and time.monotonic() < deadline:
            time.sleep(GATHER_IDLE_SECONDS)
            before, waiting = waiting, records.qsize()
            if waiting == before:
                break  # the stream paused
        while len(batch) < BATCH_RECORDS:
            try:
                batch.append(records.get_nowait())
            except queue.Empty:
                break
        return batch

    def _apply(self, batch: list[JournalRecord]) -> bool:
        """Write the files and publish the events of `batch`; False if it had to give up."""
        applied: list[tuple[Event, bytes | None]] = []
        for record in batch:
            record.settled.wait()
            outcome = self._outcome(record) if record.durable else None
            if outcome is not None:  # else refused, unreadable, or only a D / X record
                event, event_json, write = outcome
                # The bytes are in the record (R, W): placed unless a newer copy is stored, and an
                # identical copy's receipt may be newer than the stored file's (placing.py); only
                # a local store compares copies.
                if record.meta[:1] in (RECEIVED, WRITE) and (write or self.store is not None):
                    placed = self._write_file(record, event)
                    if placed is None:
                        return False
                    if placed == "superseded":
                        event, event_json = self._superseded(event), None
                    if write:
                        self._written(str(event.payload["blob_key"]))
                applied.append((event, event_json))
            self.journal.release(record)
        done = self._publish(applied)
        if done and batch:
            self.applied_seq = max(self.applied_seq, batch[-1].seq)
        return done

    def _superseded(self, event: Event) -> Event:
        """The event of a copy whose file was not placed: a newer copy is stored, which it names
        (placing.as_superseded; only a local store compares copies)."""
        if self.store is None:
            return event.model_copy(update={"payload": {**event.payload, "duplicate": "superseded"}})
        return as_superseded(event, self.store.path(str(event.payload["blob_key"])))

    def _outcome(self, record: JournalRecord) -> tuple[Event, bytes | None, bool] | None:
        """What a durable record comes to: its event (and its JSON if known), and whether its blob
        file is to be written; None if there is nothing to apply."""
        kind = record.meta[:1]
        if record.attachment is not None:  # live
            if kind in (RECEIVED, FILED):
                return record.attachment  # type: ignore[no-any-return]
            if kind in (WRITE, NO_WRITE):
                event, event_json = record.attachment
                return event, event_json, kind == WRITE
            return None
        if kind in (WRITE, NO_WRITE):
            return Event.from_json(record.meta[1:]), None, kind == WRITE
        if kind == FILED and record.seq not in self._refusals:
            return self._replayed_filed(record)
        if kind != RECEIVED or record.seq in self._refusals:
            return None
        return self._replayed(record, self._verdicts.pop(record.seq, None))

    def _replayed(self, record: JournalRecord, verdict: Duplicate | None) -> tuple[Event, bytes | None, bool] | None:
        data = self.journal.read_data(record)
        try:
            again = self.decide_again(Receipt.from_json(record.meta[1:]), data, hashlib.sha256(data).hexdigest(),
                                      verdict)
        except Exception:  # noqa: BLE001 - a bug must not stop every other instance behind this one
            key = blob_key("quarantine", datetime.now(UTC).strftime("%Y-%m-%d"), f"journal-{uuid.uuid4().hex}")
            log.exception("journal record %d: its event could not be built again; its bytes are kept "
                          "under %s instead", record.seq, key)
            self._put_file(key, data, False, None)  # (raises if it cannot: then the applier stops, nothing lost)
            return None
        if again is None:
            log.warning("journal record %d: not applied: its data is not a readable instance, so its "
                        "sender was not told success", record.seq)
            return None
        if verdict is None:
            log.warning("journal record %d: its decision was lost (power cut?); decided again from its data",
                        record.seq, extra={"series_uid": again[0].series_uid, "sop_uid": again[0].sop_uid})
        return again[0], None, again[1]

    def _replayed_filed(self, record: JournalRecord) -> tuple[Event, bytes | None, bool] | None:
        """An F record of a previous process: its event, if the file it announces is on disk as it
        was received. Otherwise either a power cut took the file but not the record (then its
        sender was never told success, which waited for both), or a later copy replaced the file
        (and that copy's own record announces it)."""
        event = Event.from_json(record.meta[1:])
        if event.payload.get("duplicate") == "superseded":
            return event, None, False  # its file was never placed: a newer copy is stored
        key, sha256 = str(event.payload["blob_key"]), str(event.payload["sha256"])
        found = self._local_sha256(key)
        if found != sha256:
            log.warning("journal record %d: not applied: the blob file it announces is %s", record.seq,
                        "missing" if found is None else "another copy now",
                        extra={"series_uid": event.series_uid, "sop_uid": event.sop_uid})
            return None
        return event, None, False

    def _local_sha256(self, key: str) -> str | None:
        """sha256 of a blob file, read in chunks (a spooled instance's file may be GBs); None if
        it is missing or unreadable."""
        if self.store is None:  # F records are written only with a local store
            return None
        try:
            with open(self.store.path(key), "rb") as handle:
                return hashlib.file_digest(handle, "sha256").hexdigest()
        except (BlobError, OSError):  # missing or unreadable
            return None

    def _put_file(self, key: str, data: bytes, replayed: bool, placing: Placing | None) -> Duplicate:
        """Every blob file this thread writes goes through here: the next checkpoint syncs them."""
        self._files_to_sync = True
        return self.put_file(key, data, replayed, placing)

    def _write_file(self, record: JournalRecord, event: Event) -> Duplicate | None:
        """Place the file of an instance whose bytes are in `record`: its verdict once placed (or
        found superseded: a copy received later is stored; or identical), None if stopping past the
        grace period.

        Two receiver processes may each accept a copy of one SOP instance; whichever places its
        file last, the copy received last stays (services/receiver/placing.py). A replay after a
        crash is one case (a loss-hunting review found the older copy written over the newer one).
        """
        key, data = str(event.payload["blob_key"]), self.journal.read_data(record)
        placing = Placing(receipt_stamp(event.occurred_at), str(event.payload["sha256"]),
                          first=event.payload.get("duplicate") == "new" and record.attachment is not None)
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                placed = self._put_file(key, data, record.attachment is None, placing)
                self.blob_error = None
                if placed == "superseded":
                    log.warning("journal: a copy of this instance received later is stored; this one is "
                                "published as superseded and its file not written", extra={
                                    "series_uid": event.series_uid, "sop_uid": event.sop_uid})
                return placed
            except Exception as exc:  # noqa: BLE001 - accepted data: keep trying, it is in the journal
                self.blob_error = str(exc)
                log.error("could not write the blob file of a journaled instance (retrying): %s", exc,
                          extra={"series_uid": event.series_uid, "sop_uid": event.sop_uid})
                if self._giving_up():
                    return None
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _publish(self, events: list[tuple[Event, bytes | None]]) -> bool:
        """Until JetStream stored every one (True), or stopping past the grace period (False)."""
        delay = RETRY_FIRST_SECONDS
        while events:
            futures = self.publish_batch(events, self.publish_timeout)
            failed = []
            for item, future in zip(events, futures, strict=True):
                try:
                    future.result(self.publish_timeout + 1)
                    self.published += 1
                except Exception as exc:  # noqa: BLE001 - PublishError, timeout
                    failed.append((item, exc))
            if not failed:
                return True
            if self._giving_up():
                log.warning("stopping with %d journaled event(s) not yet stored by JetStream; the next "
                            "start publishes them", len(failed))
                return False
            log.warning("%d journaled event(s) not stored by JetStream (%s); retrying in %.1f s",
                        len(failed), failed[0][1], delay)
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            self.publish_retries += len(failed)
            events = [item for item, _ in failed]
        return True

    def _checkpoint(self, idle: bool) -> None:
        if self.applied_seq <= self.journal.checkpointed:
            return
        if not idle and time.monotonic() - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        try:
            if self.store is not None and self._files_to_sync:
                self.store.sync_filesystem()
                self._files_to_sync = False
            self.journal.checkpoint(self.applied_seq)
        except OSError as exc:
            log.error("journal checkpoint failed (the records stay in the journal): %s", exc)
        self._last_checkpoint = time.monotonic()

