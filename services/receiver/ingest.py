"""What happens to one received instance: check, store, announce, answer.

Runs on pynetdicom's association threads. The C-STORE status is decided here:
- 0x0000 only once the instance cannot be lost: either it is in the receiver's write-ahead journal
  together with its `image.received` (instances up to `receiver_journal_max_kb`; the journal
  applier writes the blob file and publishes behind it, services/receiver/applier.py), or its blob
  file is fsynced and its `image.received` is in the journal (larger instances on a local store;
  the applier publishes it), or its blob file is fsynced and JetStream acknowledged
  `image.received` (no journal, or a store that is not local);
- 0xA700 (out of resources) when free space is below the floor, the journal is full or fails, the
  blob write fails or the event cannot be published: the sender keeps its copy and retries later;
- 0xC000 (cannot understand) when the data is not a readable dataset: the bytes are kept under
  quarantine/<date>/<uuid> and `image.quarantined` says why.

Duplicates (same SOP Instance UID stored again): identical bytes are not rewritten and the event
says duplicate="identical"; different bytes replace the file and the event says "replaced",
unless the stored copy was received later (another receiver process's): then the file is left
alone and the event says "superseded", naming the stored copy (services/receiver/placing.py). In every case
`image.received` is published, because the earlier copy's event may never have been
published (a publish failure answers 0xA700 after the file was written, and the sender's retry then
finds identical bytes). Consumers must treat every `image.received` as "this instance is present".
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from services.receiver import part10
from services.receiver.applier import JournalApplier
from services.receiver.journal import JournalError
from services.receiver.placing import as_superseded, place_newest
from services.receiver.receipt import (
    Duplicate,
    Receipt,
    duplicate_of,
    identified_tags,
    instance_key,
    received_event,
)
from services.receiver.spool import Spool
from services.receiver.timing import PhaseTimer
from shared.blobstore import (
    BlobInfo,
    LocalBlobStore,
    blob_key,
    file_holds,
    fsync_directory,
    receipt_stamp,
    rename_new,
    start_writeback,
)
from shared.config.model import SettingsItem
from shared.dicomtags import ExtractedTags, TagExtractionError
from shared.events import Event, ImageQuarantined, ImageRejected, make_event

log = logging.getLogger(__name__)

ACTOR = "receiver"
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
# From this size on, an instance stored by the only association at work has its sha256 and its
# tags computed on helper threads while its own thread writes the file (_start_digest, _start_tags).
HELPER_MIN_BYTES = 256 * 1024
# How long a spooled instance waits for an older copy still in the journal to be written first.
JOURNALED_COPY_WAIT_SECONDS = 5.0


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Publisher(Protocol):
    """Starts publishing an event from a non-asyncio thread; the future gives its stream sequence."""

    def __call__(self, event: Event, timeout: float) -> Future[int]: ...


class BlobWriter(Protocol):
    def put(self, key: str, data: bytes) -> BlobInfo: ...
    def read(self, key: str) -> bytes | None: ...
    def free_bytes(self) -> int | None: ...


@dataclass
class AssociationInfo:
    """What the events need to know about the association an instance came in on."""

    association_id: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int
    stored: int = 0
    failed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    timer: PhaseTimer | None = None  # CADUCEUS_RECEIVER_TIMING=1 (services/receiver/timing.py)
    # Why the last instance got a failure status: sent back as the response's Error Comment, so
    # that the sender's operator sees it (one C-STORE at a time per association).
    error_comment: str = ""

    def take_error_comment(self, status: int) -> str:
        """The comment for this response (none with a success status), cleared for the next one."""
        comment, self.error_comment = self.error_comment, ""
        return comment if status != 0x0000 else ""


class LocalBlobWriter:
    """Durable writes into a LocalBlobStore: file fsync (store flag) + fsync of new directories and
    of the directory holding the renamed file, so an acknowledged instance survives a power cut."""

    def __init__(self, store: LocalBlobStore, sync_dirs: bool = True) -> None:
        self.store = store
        self.sync_dirs = sync_dirs and store.fsync

    def put(self, key: str, data: bytes) -> BlobInfo:
        path = self.store.path(key)
        created = _missing_parents(path.parent, self.store.root)
        info = self.store.put_sync(key, data)
        if self.sync_dirs:
            # The rename lives in the file's directory; a new directory lives in its parent.
            for directory in {path.parent, *(d.parent for d in created)}:
                fsync_directory(directory)
        return info

    def read(self, key: str) -> bytes | None:
        return self.read_path(self.store.path(key))

    @staticmethod
    def read_path(path: Path) -> bytes | None:
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    @staticmethod
    def duplicate_of(path: Path, data: bytes) -> Duplicate:
        """How `data` compares with the copy stored at `path`; the stored file is read only when
        its size is the same (a stored copy may be a spooled instance of GBs)."""
        held = file_holds(path, data)
        return "new" if held is None else "identical" if held else "replaced"

    def free_bytes(self) -> int | None:
        return self.store.free_bytes()

    def place_bytes(self, path: Path, data: bytes, stamp: int, sha256: Callable[[], str],
                    staged: StagedFile | None = None, first: bool | None = None,
                    ) -> tuple[Duplicate, UnsyncedWrite | None]:
        """Place `data` at `path` (`store.path(key)`) unless the stored copy is newer (services/
        receiver/placing.py), from `staged` if it is in a temp file already; `make_durable()` on the
        write returned fsyncs it.

        Once this returns, the file is complete under its key for every reader on this machine, so
        `image.received` can be published before the fsyncs (Ingest._finish): the JetStream round
        trip then overlaps the disk flush. Only durability against a power cut is pending, and the
        sender hears success only after both. (A worker thread for the fsyncs measured the same
        wall time and cost about five times the context switches.)
        """
        copy = BytesCopy(self, data, stamp, sha256, staged)
        try:
            return place_newest(path, copy, first)
        finally:
            copy.discard()

    def place_spooled(self, spool: Spool, path: Path, stamp: int) -> tuple[Duplicate, UnsyncedWrite | None]:
        """As `place_bytes`, for a complete spool file (services/receiver/spool.py)."""
        return place_newest(path, SpoolCopy(self, spool, stamp))

    def stage(self, data: bytes, writeback: bool = True) -> StagedFile:
        """Write `data` to a new temp file of the store; `place()` on the result puts it under its key.

        With `writeback`, the kernel starts writing the pages to disk at once (`start_writeback`),
        so the device works while the caller reads the tags and builds the event, and the fsync
        in `make_durable` then waits for less.
        """
        tmp = self.store._tmp / f"{uuid.uuid4().hex}.part"  # the store's own temp dir (same filesystem)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += os.write(fd, view[written:])
            if writeback and self.store.fsync:
                start_writeback(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return StagedFile(self, fd, tmp)


    def place_spool(self, spool: Spool, path: Path, stamp: int | None = None, over: bool = True) -> UnsyncedWrite:
        """Put a complete spool file (services/receiver/spool.py) under `path` (`store.path(key)`),
        creating its directories, with `stamp` as its modification time; the fsyncs are still to
        do. Raises OSError (the spool keeps its file then: its owner discards it); FileExistsError
        if `path` exists and not `over`."""
        created = _missing_parents(path.parent, self.store.root)
        if created:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = spool.place(path, stamp, over)
        # The new name lives in the file's directory; a new directory lives in its parent.
        directories = {path.parent, *(d.parent for d in created)} if self.sync_dirs else set()
        return UnsyncedWrite(fd, directories, self.store.fsync)


class StagedFile:
    """Instance data in a temp file of the blob store, not yet under its key."""

    def __init__(self, writer: LocalBlobWriter, fd: int, tmp: Path) -> None:
        self.writer = writer
        self.fd: int | None = fd
        self.tmp = tmp

    def place(self, path: Path, stamp: int, over: bool) -> UnsyncedWrite:
        """Rename the temp file to `path` (creating its directories), with `stamp` as its
        modification time, set first: the file never has another under its key. The fsyncs are
        still to do. `over=False`: FileExistsError if `path` exists (the file stays staged)."""
        fd = self.fd
        assert fd is not None, "a staged file is placed or discarded once"
        store = self.writer.store
        try:
            created = _missing_parents(path.parent, store.root)
            if created:  # else the series directory exists: no mkdir (and no EEXIST) per image
                path.parent.mkdir(parents=True, exist_ok=True)
            os.utime(fd, ns=(stamp, stamp))
            if over:
                os.replace(self.tmp, path)
            else:
                rename_new(self.tmp, path)
        except FileExistsError:
            raise
        except BaseException:
            self.discard()
            raise
        self.fd = None
        # The rename lives in the file's directory; a new directory lives in its parent.
        directories = {path.parent, *(d.parent for d in created)} if self.writer.sync_dirs else set()
        return UnsyncedWrite(fd, directories, store.fsync)

    def discard(self) -> None:
        """Remove the temp file unless it was placed (a duplicate, a quarantined or journaled instance)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
            self.tmp.unlink(missing_ok=True)


class UnsyncedWrite:
    """A file in place under its key whose data and directory entries are not fsynced yet."""

    def __init__(self, fd: int, directories: set[Path], fsync: bool) -> None:
        self.fd: int | None = fd
        self.directories = directories
        self.fsync = fsync

    def make_durable(self) -> None:
        """Flush file and directories to disk (once); raises what fsync raised."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        for directory in self.directories:
            fsync_directory(directory)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class BytesCopy:
    """Instance bytes in memory, or in a staged temp file, as a placing.Copy."""

    def __init__(self, writer: LocalBlobWriter, data: bytes, stamp: int, sha256: Callable[[], str],
                 staged: StagedFile | None = None) -> None:
        self.writer = writer
        self.data = data
        self.stamp = stamp
        self.sha256 = sha256
        self.staged = staged
        self.own = staged is None  # a temp file written here, removed here unless placed

    def holds_same(self, handle: io.BufferedReader, size: int) -> bool:
        return size == len(self.data) and handle.read() == self.data  # (sizes first: a stored copy may be GBs)

    def place(self, path: Path, over: bool) -> UnsyncedWrite:
        if self.staged is None:  # (kept for a second try after FileExistsError)
            self.staged = self.writer.stage(self.data, writeback=False)
        return self.staged.place(path, self.stamp, over)

    def discard(self) -> None:
        if self.own and self.staged is not None:
            self.staged.discard()


class SpoolCopy:
    """A complete spool file (services/receiver/spool.py) as a placing.Copy."""

    def __init__(self, writer: LocalBlobWriter, spool: Spool, stamp: int) -> None:
        self.writer = writer
        self.spool = spool
        self.stamp = stamp

    def sha256(self) -> str:
        return self.spool.sha256

    def holds_same(self, handle: io.BufferedReader, size: int) -> bool:
        return self.spool.same_bytes(handle.fileno(), size)

    def place(self, path: Path, over: bool) -> UnsyncedWrite:
        return self.writer.place_spool(self.spool, path, self.stamp, over)


def _worth_a_helper(data: bytes, alone: bool) -> bool:
    return alone and len(data) >= HELPER_MIN_BYTES


def _accepted(assoc: AssociationInfo, duplicate: Any, ctx: dict[str, str]) -> int:
    """Count a stored instance (a duplicate is worth a log line) and answer success."""
    assoc.stored += 1
    if duplicate != "new":
        log.info("duplicate instance (%s)", duplicate, extra=ctx)
    return STATUS_SUCCESS


def _log_context(tags: ExtractedTags, request_sop_uid: str) -> dict[str, str]:
    """The instance's identity for log lines; warns if the C-STORE request named another SOP UID."""
    ctx = {"study_uid": tags.study_uid, "series_uid": tags.series_uid, "sop_uid": tags.sop_uid}
    if request_sop_uid and tags.sop_uid != request_sop_uid:
        log.warning("dataset SOP Instance UID differs from the C-STORE request's (%s); using the "
                    "dataset's", request_sop_uid, extra=ctx)
    return ctx


def _quarantine_key() -> str:
    return blob_key("quarantine", datetime.now(UTC).strftime("%Y-%m-%d"), uuid.uuid4().hex)


def _missing_parents(directory: Path, root: Path) -> list[Path]:
    missing = []
    while directory != root and not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing


class Ingest:
    def __init__(self, writer: BlobWriter, publish: Publisher, settings: Callable[[], SettingsItem],
                 publish_timeout: float = 5.0, journal: JournalApplier | None = None,
                 journal_max_bytes: int = 0) -> None:
        self.writer = writer
        self.publish = publish
        self.settings = settings
        self.publish_timeout = publish_timeout
        self.journal = journal
        self.journal_max_bytes = journal_max_bytes
        # sha256 of large instances, header reads of journaled ones: work that overlaps a disk wait.
        self.helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="receiver-helper")
        self._storing = 0  # store() calls in progress (one per association at most)
        self._storing_lock = threading.Lock()

    # ------------------------------------------------------------ the C-STORE path

    def store(self, assoc: AssociationInfo, data: bytes, context_ts: str, request_sop_uid: str,
              mark: int = 0) -> int:
        with self._storing_lock:
            self._storing += 1
            alone = self._storing == 1
        try:
            return self._store(assoc, data, context_ts, request_sop_uid, mark, alone)
        finally:
            with self._storing_lock:
                self._storing -= 1

    def _store(self, assoc: AssociationInfo, data: bytes, context_ts: str, request_sop_uid: str,
               mark: int, alone: bool) -> int:
        timer, mark = assoc.timer, mark or time.perf_counter_ns()
        settings = self.settings()
        data, dropped = part10.without_file_meta_elements(data, context_ts)
        if dropped:
            log.warning("dropped %d bytes of File Meta elements (group 0002) that %s put into its data set",
                        dropped, assoc.calling_aet,
                        extra={"sop_uid": request_sop_uid, "association_id": assoc.association_id})
        if not self._enough_space(settings):
            return self._reject(assoc, "free space below min_free_space_mb "
                                f"({settings.min_free_space_mb} MB)", request_sop_uid)
        if timer:
            mark = timer.mark("space", mark)
        if self.journal is not None and len(data) <= self.journal_max_bytes:
            return self._store_journaled(assoc, settings, data, context_ts, request_sop_uid, alone, mark)
        header = self._start_tags(data, settings, alone)
        digest = self._start_digest(data, alone)
        staged = self._stage(data)
        try:
            if timer and staged:
                mark = timer.mark("file", mark)
            return self._store_staged(assoc, settings, data, header, digest, staged, context_ts, request_sop_uid,
                                      mark)
        finally:
            if staged is not None:
                staged.discard()  # not placed under its key: an error, a duplicate, quarantine, journal

    def _stage(self, data: bytes) -> StagedFile | None:
        """A large instance on a local store goes to a temp file before anything else, so that the
        disk writes it while the tags are read (LocalBlobWriter.stage)."""
        if not isinstance(self.writer, LocalBlobWriter):
            return None
        if self.journal is not None and len(data) <= self.journal_max_bytes:
            return None
        try:
            return self.writer.stage(data)
        except OSError as exc:  # disk full, say: _start_write tries again and reports it
            log.debug("could not stage the instance ahead of its tags: %s", exc)
            return None

    def _store_staged(self, assoc: AssociationInfo, settings: SettingsItem, data: bytes,
                      header: Future[ExtractedTags] | None, digest: Future[str], staged: StagedFile | None,
                      context_ts: str, request_sop_uid: str, mark: int) -> int:
        timer = assoc.timer
        try:
            tags = header.result() if header else identified_tags(data, settings.extract_tags)
        except TagExtractionError as exc:
            return self.quarantine(assoc, data, str(exc), request_sop_uid)
        if timer:
            mark = timer.mark("tags", mark)
        ctx = _log_context(tags, request_sop_uid)
        key = instance_key(tags)
        if self.journal is not None and self.journal.pending_sha256(key) is not None:
            # A larger copy of an instance still waiting in the journal goes the same way, so that
            # the newest copy is the one written last.
            return self._journal_decided(assoc, data, digest.result(), tags, key, context_ts, ctx, mark)
        receipt = Receipt.now(assoc, context_ts)  # (before placing: the file gets its stamp first)
        try:
            duplicate, write = self._start_write(key, data, receipt_stamp(receipt.occurred_at), digest, staged)
        except Exception as exc:  # noqa: BLE001 - any storage failure is "try again later" for the sender
            log.error("blob write failed for %s: %s", key, exc, extra=ctx)
            return self._reject(assoc, f"blob store write failed: {exc}", tags.sop_uid, tags)
        if timer:
            mark = timer.mark("place" if staged else "file", mark)
        try:
            event = self._announced(received_event(receipt, tags, key, len(data), digest.result(), duplicate))
            if timer:
                mark = timer.mark("event", mark)
            return self._finish(assoc, event, write, tags, ctx, mark)
        finally:
            if write is not None:
                write.close()  # after an unexpected error; nothing left to do otherwise

    def store_spooled(self, assoc: AssociationInfo, spool: Spool, context_ts: str, request_sop_uid: str,
                      mark: int = 0) -> int:
        """An instance received into a spool file (services/receiver/spool.py): refused if the spool
        was, else stored like a large instance's staged temp file. The spool is consumed either way
        (placed under its key, moved to quarantine, or removed)."""
        with self._storing_lock:
            self._storing += 1
        try:
            return self._store_spooled(assoc, spool, context_ts, request_sop_uid, mark or time.perf_counter_ns())
        finally:
            spool.discard()  # unless placed or quarantined: then there is nothing left to remove
            with self._storing_lock:
                self._storing -= 1

    def _store_spooled(self, assoc: AssociationInfo, spool: Spool, context_ts: str, request_sop_uid: str,
                       mark: int) -> int:
        spool.finish()  # (the free-space floor was checked while it was written, its own bytes counted)
        if spool.refusal:
            return self._reject(assoc, spool.refusal, request_sop_uid, spool.identity)
        if spool.meta_error:
            return self._quarantine_spooled(assoc, spool, f"no file meta could be built: {spool.meta_error}",
                                            request_sop_uid)
        assert isinstance(self.writer, LocalBlobWriter), "only a local store spools"
        timer = assoc.timer
        try:
            with spool.mapped() as view:
                tags = identified_tags(view, self.settings().extract_tags)
        except TagExtractionError as exc:
            return self._quarantine_spooled(assoc, spool, str(exc), request_sop_uid)
        if timer:
            mark = timer.mark("tags", mark)
        ctx = _log_context(tags, request_sop_uid)
        key = instance_key(tags)
        if not self._no_journaled_copy(key):
            return self._reject(assoc, "an earlier copy of this instance is still being stored", tags.sop_uid, tags)
        receipt = Receipt.now(assoc, context_ts)
        try:
            duplicate, write = self.writer.place_spooled(spool, self.writer.store.path(key),
                                                         receipt_stamp(receipt.occurred_at))
        except Exception as exc:  # noqa: BLE001 - any storage failure is "try again later" for the sender
            log.error("blob write failed for %s: %s", key, exc, extra=ctx)
            return self._reject(assoc, f"blob store write failed: {exc}", tags.sop_uid, tags)
        if timer:
            mark = timer.mark("place", mark)
        try:
            event = self._announced(received_event(receipt, tags, key, spool.size, spool.sha256, duplicate))
            return self._finish(assoc, event, write, tags, ctx, mark)
        finally:
            if write is not None:
                write.close()  # after an unexpected error; nothing left to do otherwise

    def _announced(self, event: Event) -> Event:
        """The event of a copy placed (or not) by this thread: a superseded one names the stored copy
        (placing.as_superseded; only a local store finds copies superseded)."""
        if event.payload["duplicate"] != "superseded" or not isinstance(self.writer, LocalBlobWriter):
            return event
        return as_superseded(event, self.writer.store.path(str(event.payload["blob_key"])))

    def _no_journaled_copy(self, key: str) -> bool:
        """Whether no copy of `key` waits in the journal (waiting for the applier up to
        JOURNALED_COPY_WAIT_SECONDS).

        A spooled instance's file is written here, not through the journal as a larger copy of a
        journaled instance is (`_journal_decided`: its bytes would go into the journal); an older
        copy still in the journal would be written after it, over it. The applier writes it
        within about half a second, unless blob writes fail (then the sender retries later).
        """
        if self.journal is None:
            return True
        deadline = time.monotonic() + JOURNALED_COPY_WAIT_SECONDS
        while self.journal.pending_sha256(key) is not None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _store_journaled(self, assoc: AssociationInfo, settings: SettingsItem, data: bytes, context_ts: str,
                         request_sop_uid: str, alone: bool, mark: int) -> int:
        """Success once the instance is durable in the journal and its event decided; the applier
        does the rest.

        The bytes are written first (an `R` record, services/receiver/applier.py) and synced while
        the header is read: alone, on a helper thread, so that the fdatasync (which releases the
        GIL) and the header read overlap; with other instances in flight on this thread, before
        the sync (the cores are busy then, and another writer's fdatasync may cover the record
        meanwhile). 500 MR images in one process without the network: typically 0.5 ms per image
        this way against 0.75 ms reading the header first (docs/performance.md, "Session 10").
        """
        assert self.journal is not None
        timer = assoc.timer
        if self.journal.blob_error is not None:
            return self._reject(assoc, f"blob store write failed: {self.journal.blob_error}", request_sop_uid)
        receipt = Receipt.now(assoc, context_ts)
        try:
            record = self.journal.receive(receipt, data)
        except (JournalError, OSError) as exc:
            log.error("could not journal the instance: %s", exc, extra={"sop_uid": request_sop_uid})
            return self._reject(assoc, str(exc), request_sop_uid)
        try:
            header = self._read_header(data, settings, in_background=alone)
            self.journal.sync(record)
            if timer:
                mark = timer.mark("write", mark)
            try:
                tags, sha256 = header.result()
            except TagExtractionError as exc:
                return self.quarantine(assoc, data, str(exc), request_sop_uid)
            if timer:
                mark = timer.mark("tags", mark)
            ctx = _log_context(tags, request_sop_uid)
            key = instance_key(tags)
            duplicate = self._journaled_duplicate(key, data, sha256)
            self.journal.decide(record, received_event(receipt, tags, key, len(data), sha256, duplicate))
        except JournalError as exc:
            log.error("could not journal the instance: %s", exc, extra={"sop_uid": request_sop_uid})
            return self._reject(assoc, str(exc), request_sop_uid)
        finally:
            self.journal.refuse(record)  # unless decided: then it does nothing
        if timer:
            timer.mark("event", mark)
        return _accepted(assoc, duplicate, ctx)

    def _read_header(self, data: bytes, settings: SettingsItem, in_background: bool) -> Future[tuple[ExtractedTags, str]]:
        """Tags (TagExtractionError if unreadable) and sha256 of a journaled instance."""
        def read() -> tuple[ExtractedTags, str]:
            return identified_tags(data, settings.extract_tags), _sha256_hex(data)

        if in_background:
            return self.helpers.submit(read)
        done: Future[tuple[ExtractedTags, str]] = Future()
        try:
            done.set_result(read())
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(exc)
        return done

    def _journal_decided(self, assoc: AssociationInfo, data: bytes, sha256: str, tags: ExtractedTags,
                         key: str, context_ts: str, ctx: dict[str, str], mark: int) -> int:
        """Success once instance and its event are in the journal (one `W` or `-` record, fsynced)."""
        assert self.journal is not None
        timer = assoc.timer
        if self.journal.blob_error is not None:
            return self._reject(assoc, f"blob store write failed: {self.journal.blob_error}", tags.sop_uid, tags)
        duplicate = self._journaled_duplicate(key, data, sha256)
        event = received_event(Receipt.now(assoc, context_ts), tags, key, len(data), sha256, duplicate)
        if timer:
            mark = timer.mark("event", mark)
        # On a local store an identical copy's bytes are journaled too: the applier places it like
        # any copy (placing.py), which restamps the file for it, or puts it over a copy received
        # before it that another process placed meanwhile (the router routes this one, the newest).
        keep = duplicate != "identical" or isinstance(self.writer, LocalBlobWriter)
        try:
            self.journal.accept(event, key, sha256, data if keep else None)
        except (JournalError, OSError) as exc:
            log.error("could not journal the instance: %s", exc, extra=ctx)
            return self._reject(assoc, str(exc), tags.sop_uid, tags)
        if timer:
            timer.mark("write", mark)
        return _accepted(assoc, duplicate, ctx)

    def _journaled_duplicate(self, key: str, data: bytes, sha256: str) -> Duplicate:
        pending = self.journal.pending_sha256(key) if self.journal is not None else None
        if pending is not None:  # a copy is in the journal, its file not yet written
            return "identical" if pending == sha256 else "replaced"
        writer = self.writer
        if isinstance(writer, LocalBlobWriter):
            return writer.duplicate_of(writer.store.path(key), data)
        return duplicate_of(writer.read(key), data)

    def _finish(self, assoc: AssociationInfo, event: Event, write: UnsyncedWrite | None,
                tags: ExtractedTags, ctx: dict[str, str], mark: int) -> int:
        """Publish (the file is in place), answer success once it is durable *and* acknowledged."""
        if self.journal is not None and isinstance(self.writer, LocalBlobWriter):
            return self._finish_filed(assoc, event, write, tags, ctx, mark)
        timer, key = assoc.timer, str(event.payload.get("blob_key"))
        published = self.publish(event, self.publish_timeout)
        if write is not None:
            try:
                write.make_durable()
            except Exception as exc:  # noqa: BLE001 - not durable means not accepted
                log.error("blob write failed for %s after image.received was published: %s", key, exc, extra=ctx)
                # The event is out and the file is in place but not known to be on disk: the sender
                # keeps its copy and its retry publishes again; image.rejected records why.
                return self._reject(assoc, f"blob store write failed: {exc}", tags.sop_uid, tags)
        if timer:
            mark = timer.mark("write", mark)
        try:
            published.result(self.publish_timeout + 1)
        except Exception as exc:  # noqa: BLE001 - not acknowledged means not accepted
            log.error("image.received not acknowledged by JetStream: %s", exc, extra=ctx)
            return self._reject(assoc, f"event not acknowledged: {exc}", tags.sop_uid, tags)
        if timer:
            timer.mark("publish", mark)
        return _accepted(assoc, event.payload.get("duplicate"), ctx)

    def _finish_filed(self, assoc: AssociationInfo, event: Event, write: UnsyncedWrite | None,
                      tags: ExtractedTags, ctx: dict[str, str], mark: int) -> int:
        """Success once the file is durable and its event is in the journal (an `F` record; the
        journal applier publishes it). The record's fdatasync replaces the wait for JetStream's
        fsynced acknowledgement: docs/performance.md, "Session 11"."""
        assert self.journal is not None
        timer, key = assoc.timer, str(event.payload.get("blob_key"))
        try:
            record = self.journal.file(event)
        except (JournalError, OSError) as exc:
            log.error("could not journal the event of %s: %s", key, exc, extra=ctx)
            return self._reject(assoc, f"could not journal the event: {exc}", tags.sop_uid, tags)
        # Alone, the record's fdatasync runs on a helper beside the file's and the directory's
        # fsync: no order is needed among them (a replayed F record is published only if its file
        # is intact), and the device serves them together (0.58-0.68 ms instead of 0.76-0.83 for
        # the three in a row, measured alone: docs/performance.md, "Session 13"). With other
        # instances in flight the device is busy anyway and one fdatasync covers several records,
        # so the hop to a helper would only cost CPU.
        journal_synced = self.helpers.submit(self.journal.sync, record) if self._storing == 1 else None
        durable = False
        try:
            failure = "blob store write failed"
            if write is not None:
                write.make_durable()
            failure = "could not journal the event"
            if journal_synced is not None:
                journal_synced.result()
            else:
                self.journal.sync(record)
            durable = True
        except Exception as exc:  # noqa: BLE001 - not durable means not accepted
            log.error("%s for %s: %s", failure, key, exc, extra=ctx)
            return self._reject(assoc, f"{failure}: {exc}", tags.sop_uid, tags)
        finally:
            if journal_synced is not None:
                futures_wait([journal_synced])  # settled only once its sync is over, either way
            if durable:
                self.journal.confirm(record)
            else:
                self.journal.refuse(record)
        if timer:
            timer.mark("write", mark)
        return _accepted(assoc, event.payload.get("duplicate"), ctx)

    def _start_tags(self, data: bytes, settings: SettingsItem, alone: bool) -> Future[ExtractedTags] | None:
        """The tags of a large instance, read on a helper while this thread writes the temp file
        (`os.write` releases the GIL), if no other instance is being stored; else None: they are
        read on this thread after the write (the cores are busy then)."""
        if _worth_a_helper(data, alone):
            return self.helpers.submit(identified_tags, data, settings.extract_tags)
        return None

    def _start_digest(self, data: bytes, alone: bool) -> Future[str]:
        """sha256 of a large instance on a worker while this thread writes the file (and another
        reads the tags, `_start_tags`), if no other instance is being stored: the worker then uses a
        core that would be idle.

        hashlib releases the GIL for the whole digest, so it runs on the other core. Small instances
        are hashed here: the hand-over would cost more. So are large ones while other associations
        are storing too: the cores are busy then, and the two thread wake-ups per image cost more than
        the overlap saves (CT, alternating runs: 4 senders 2.60-2.66 ms per image hashed here vs
        2.75-2.90 on the worker; 1 sender 3.06-3.45 on the worker vs 3.49-3.72 here).
        """
        if _worth_a_helper(data, alone):
            return self.helpers.submit(_sha256_hex, data)
        done: Future[str] = Future()
        done.set_result(_sha256_hex(data))
        return done

    def _enough_space(self, settings: SettingsItem) -> bool:
        try:
            free = self.writer.free_bytes()
        except OSError:
            return False
        return free is None or free >= settings.min_free_space_mb * 1024 * 1024

    def _start_write(self, key: str, data: bytes, stamp: int, digest: Future[str],
                     staged: StagedFile | None = None) -> tuple[Duplicate, UnsyncedWrite | None]:
        """Deal with an existing copy, then write (on a local store, without the fsyncs yet, and
        only over an older copy; from `staged` if the data is already in a temp file).

        Returns the duplicate kind and the write still to be made durable (None: nothing to do).
        """
        if isinstance(self.writer, LocalBlobWriter):
            return self.writer.place_bytes(self.writer.store.path(key), data, stamp, digest.result, staged)
        duplicate = duplicate_of(self.writer.read(key), data)
        if duplicate != "identical":
            self.writer.put(key, data)
        return duplicate, None

    # ------------------------------------------------------------ failures

    def _reject(self, assoc: AssociationInfo, reason: str, sop_uid: str,
                tags: ExtractedTags | None = None) -> int:
        assoc.failed += 1
        assoc.error_comment = reason
        event = make_event("image.rejected", ACTOR, ImageRejected(
            reason=reason, status=STATUS_OUT_OF_RESOURCES, calling_aet=assoc.calling_aet,
            peer_host=assoc.peer_host, association_id=assoc.association_id),
            sop_uid=sop_uid or None, study_uid=tags.study_uid if tags else None,
            series_uid=tags.series_uid if tags else None)
        self._publish_quietly(event)
        return STATUS_OUT_OF_RESOURCES

    def quarantine(self, assoc: AssociationInfo, data: bytes, reason: str, sop_uid: str) -> int:
        key: str | None = _quarantine_key()
        try:
            self.writer.put(key, data)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - the sender still gets a failure and keeps its copy
            log.error("could not keep quarantined data: %s", exc)
            key = None
        return self._quarantined(assoc, reason, sop_uid, key, len(data))

    def _quarantine_spooled(self, assoc: AssociationInfo, spool: Spool, reason: str, sop_uid: str) -> int:
        """Quarantine a spooled instance: its file is moved there (durably, as `quarantine` writes)."""
        assert isinstance(self.writer, LocalBlobWriter)
        key: str | None = _quarantine_key()
        try:
            self.writer.place_spool(spool, self.writer.store.path(str(key))).make_durable()
        except Exception as exc:  # noqa: BLE001 - the sender still gets a failure and keeps its copy
            log.error("could not keep quarantined data: %s", exc)
            key = None
        return self._quarantined(assoc, reason, sop_uid, key, spool.size)

    def _quarantined(self, assoc: AssociationInfo, reason: str, sop_uid: str, key: str | None, size: int) -> int:
        assoc.failed += 1
        assoc.error_comment = reason
        log.warning("quarantined instance from %s: %s", assoc.calling_aet, reason,
                    extra={"sop_uid": sop_uid, "blob_key": key})
        event = make_event("image.quarantined", ACTOR, ImageQuarantined(
            reason=reason, blob_key=key, size=size, calling_aet=assoc.calling_aet,
            peer_host=assoc.peer_host, association_id=assoc.association_id,
            status=STATUS_CANNOT_UNDERSTAND), sop_uid=sop_uid or None)
        self._publish_quietly(event)
        return STATUS_CANNOT_UNDERSTAND

    def _publish_quietly(self, event: Event) -> None:
        """Failure events are best effort: the status code already tells the sender."""
        timeout = min(self.publish_timeout, 2.0)
        try:
            self.publish(event, timeout).result(timeout + 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not publish %s: %s", event.type, exc)
