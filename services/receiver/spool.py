"""Large instances: received into a spool file of the blob store instead of memory, and refused
above `settings.max_instance_mb`.

Why: both C-STORE paths collected a data set in memory and joined it into one Part 10 byte string
before storing it, so one instance cost about twice its size (a 256 MB C-STORE took the receiver
from 124 to 638 MB), a few breast tomosynthesis or whole-slide instances at once could take the
machine's memory, and a peer could send a P-DATA stream as long as it liked.

Now a data set stays in memory, as before, until it passes `settings.spool_threshold_mb` (CT and MR
never do, so their path is unchanged), or until the associations of the process hold their memory
budget (`MemoryBudget`, `settings.spool_memory_budget_mb`). Then what arrived so far, and
everything after it as it arrives, is written to a temp file in the blob store's staging directory
(`blobs/.tmp`, on the store's file system, so placing it under its key is a link or a rename) and
hashed on the way (`Spool`). Once the message is complete, `Ingest.store_spooled` reads its tags from a
read-only memory map of the file (the header and the element headers behind it: a few pages) and
places the file under its key; durability is the rule of the other large instances (file fsynced
and its event journaled, or acknowledged by JetStream, before 0x0000). The file holds the same
bytes the in-memory path writes: preamble, the receiver's File Meta, the data set as it came,
without group 0002 elements at its start (`part10.without_file_meta_elements`, applied to the first
HEAD_BYTES; a hostile run of such elements longer than that is left in place, and the header
reader then quarantines the instance, where the in-memory path dropped them).

A data set that passes `settings.max_instance_mb` is refused at once: what was written is
removed, the rest is read and dropped as it arrives (nothing held, nothing written), and the
sender gets 0xA700 with an Error Comment once its message is complete (it reads the response only
then); the refusal is logged when it happens, `image.rejected` follows with the response. A spool
write that fails (disk full), or free space that falls below `min_free_space_mb` while the
instance is written (checked every WRITEBACK_BYTES), is refused the same way.

A spool file is removed on every path that does not place it under its key: a refusal, an
identical duplicate, an error, quarantine (moved there), and the association ending before the
message is complete (StorageSCP._abandon_receiving, on EVT_ABORTED and EVT_CONN_CLOSE). It has no
name until it is handed over to be placed (O_TMPFILE, `create_spool_file`), so a killed process
leaves none behind; where the file system does not allow that, it is named from the start, and one
left by a killed process goes with the store's other stale temp files (older than an hour).

Where it is wired in: the direct path (services/receiver/direct.py, `LargeData`, which also reads a
P-DATA-TF PDU above 4 MB in pieces) and pynetdicom's own path (`watch_dimse`), both through
StorageSCP. A blob store that is not local (NATS) spools nothing; only the maximum applies there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mmap
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pynetdicom.dimse_messages import C_STORE_RQ

from services.receiver import part10
from shared.blobstore import LocalBlobStore, rename_new, start_writeback
from shared.config.model import SettingsItem
from shared.dicomtags import ExtractedTags

log = logging.getLogger(__name__)

MB = 1024 * 1024
NEVER = 1 << 62
# Fragments are gathered up to this much and written with one writev.
WRITE_BATCH = MB
# Every this many bytes written: start the kernel's writeback (so the final fsync waits for little)
# and check the free-space floor.
WRITEBACK_BYTES = 16 * MB
# The start of the file kept contiguous: the File Meta elements check reads it.
HEAD_BYTES = MB
IOV_MAX = 1024
COMPARE_CHUNK = MB
# A data set in memory claims its share of the process's MemoryBudget from this size on, in steps
# of CLAIM_STEP, at COPIES bytes per byte: storing it from memory joins it into one byte string, a
# copy beside the fragments received.
FIRST_CLAIM = MB
CLAIM_STEP = MB
COPIES = 2
Buffer = bytes | bytearray | memoryview


def too_large(settings: SettingsItem) -> str:
    return f"instance larger than max_instance_mb ({settings.max_instance_mb} MB)"


def below_floor(settings: SettingsItem) -> str:
    return f"free space below min_free_space_mb ({settings.min_free_space_mb} MB)"


class Spool:
    """The Part 10 file of one C-STORE being received, in a temp file of the blob store.

    Written by the thread that receives the message (the DUL thread; pynetdicom's DIMSE for its
    own path); `discard` may come from any thread (the association ended), hence the lock. Once
    refused or discarded, `write` only counts what it is given.
    """

    def __init__(self, settings: SettingsItem, free_bytes: Callable[[], int | None], sync: bool,
                 context: dict[str, str]) -> None:
        self.settings = settings  # as they were when the data set outgrew memory
        self.max_bytes = settings.max_instance_mb * MB or NEVER
        self.floor = settings.min_free_space_mb * MB
        self.free_bytes = free_bytes
        self.sync = sync
        self.context = context  # log context: sop_uid, association_id
        self.directory = Path()  # where the file is (blobs/.tmp)
        self.path: Path | None = None  # its name there, if it has one (create_spool_file)
        self.fd: int | None = None
        self.received = 0   # data set bytes received, also those dropped after a refusal
        self.size = 0       # bytes in the file
        self.refusal = ""   # why the instance is refused ("": it is not)
        self.identity: ExtractedTags | None = None  # read from the head on refusal (log line, event)
        self.meta_error = ""  # pynetdicom's path: no File Meta could be built (the file is the data set)
        self._sha256 = hashlib.sha256()
        self._pending: list[Buffer] = []
        self._pending_bytes = 0
        self._next_writeback = WRITEBACK_BYTES
        self._lock = threading.Lock()

    # ------------------------------------------------------------ receiving

    def start(self, directory: Path, head: bytes, rest: Sequence[Buffer], context_ts: str) -> None:
        """Write the data received so far: `head` (preamble, File Meta, the first data set bytes)
        and `rest`. Refuses the instance instead if it is too large already or the disk too full."""
        if self.received > self.max_bytes:
            self._refuse(too_large(self.settings), head)
            return
        if not self._room():
            self._refuse(below_floor(self.settings), head)
            return
        head, dropped = part10.without_file_meta_elements(head, context_ts)
        if dropped:
            log.warning("dropped %d bytes of File Meta elements (group 0002) that the sender put into "
                        "its data set", dropped, extra=self.context)
        self.directory = directory
        try:
            self.fd, self.path = create_spool_file(directory)
        except OSError as exc:
            self._refuse(f"blob store write failed: {exc}", head)
            return
        with self._lock:
            self._add(head)
            for part in rest:
                self._add(part)
            self._flush()

    def write(self, fragment: Buffer) -> None:
        """The next data set fragment (kept by reference until written: at most WRITE_BATCH)."""
        size = len(fragment)
        with self._lock:
            self.received += size
            if self.fd is None:
                return  # refused or discarded: dropped
            if self.received > self.max_bytes:
                self._refuse(too_large(self.settings))
                return
            self._add(fragment)
            if self._pending_bytes >= WRITE_BATCH:
                self._flush()

    def finish(self) -> None:
        """The message is complete: write what is pending. `refusal` says whether it was accepted."""
        with self._lock:
            if self.fd is not None:
                self._flush()
            if self.fd is not None and not self._room():
                self._refuse(below_floor(self.settings))
            if self.fd is None and not self.refusal:
                self.refusal = "the association ended while the instance was received"

    def _add(self, part: Buffer) -> None:
        if len(part):
            self._pending.append(part)
            self._pending_bytes += len(part)

    def _flush(self) -> None:
        """Write and hash what is pending (lock held, fd open); a failure refuses the instance."""
        parts, self._pending, self._pending_bytes = self._pending, [], 0
        assert self.fd is not None
        try:
            _write_all(self.fd, parts)
        except OSError as exc:
            log.error("spool write failed: %s", exc, extra=self.context)
            self._refuse(f"blob store write failed: {exc}")
            return
        for part in parts:
            self._sha256.update(part)  # (releases the GIL for anything larger than 2 KB)
            self.size += len(part)
        if self.size >= self._next_writeback:
            self._next_writeback = self.size + WRITEBACK_BYTES
            if self.sync:
                start_writeback(self.fd)
            if not self._room():
                self._refuse(below_floor(self.settings))

    def _room(self) -> bool:
        """Free space at or above the floor (with what this spool wrote so far counted)."""
        try:
            free = self.free_bytes()
        except OSError:
            return False
        return free is None or free >= self.floor

    def _refuse(self, reason: str, head: bytes | None = None) -> None:
        """Refuse the instance: remove what was written, drop the rest (lock held, or not yet shared)."""
        if head is None and self.fd is not None:
            with contextlib.suppress(OSError):
                head = os.pread(self.fd, HEAD_BYTES, 0)
        self.refusal = reason
        self.identity = head_identity(head or b"")
        self._close()
        log.warning("instance refused while it is received: %s", reason, extra={
            **self.context, "study_uid": self.identity.study_uid if self.identity else "",
            "series_uid": self.identity.series_uid if self.identity else ""})

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        self._pending, self._pending_bytes = [], 0
        if fd is not None:
            os.close(fd)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def discard(self) -> None:
        """Remove the file unless it was placed; any thread, any number of times."""
        with self._lock:
            self._close()

    def __del__(self) -> None:
        # A safety net: a spool that some path lost without discarding it (a descriptor left open
        # would hold an unnamed file's space for as long as the process lives).
        with contextlib.suppress(Exception):
            self._close()

    # ------------------------------------------------------------ the complete file

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    @contextlib.contextmanager
    def mapped(self) -> Iterator[mmap.mmap]:
        """The file, read-only and memory-mapped: reading its header touches only those pages."""
        assert self.fd is not None
        view = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        try:
            yield view
        finally:
            view.close()

    def same_bytes(self, other: int, size: int) -> bool:
        """Whether the open file `other` (of `size` bytes) holds the spool's bytes, read in chunks."""
        assert self.fd is not None
        if size != self.size:
            return False
        for offset in range(0, self.size, COMPARE_CHUNK):
            if os.pread(other, COMPARE_CHUNK, offset) != os.pread(self.fd, COMPARE_CHUNK, offset):
                return False
        return True

    def place(self, path: Path, stamp: int | None = None, over: bool = True) -> int:
        """Put the complete file under `path` (whose directory exists), with `stamp` as its
        modification time (set first), and hand over its open descriptor (the caller fsyncs and
        closes it). Raises OSError if it cannot be placed (then the spool still has it, and
        `discard` removes it); FileExistsError if `path` exists and not `over`.

        An unnamed file gets `path` as its first name (linkat: the whole file appears there at
        once); only over an existing copy (a replaced one) does it get a temp name first, for the
        rename over the old copy, so a kill between the two leaves a temp file only then.
        """
        with self._lock:
            fd = self.fd
            assert fd is not None, "a spool is placed once, complete"
            if stamp is not None:
                os.utime(fd, ns=(stamp, stamp))
            if self.path is None:
                try:
                    _name(fd, path)
                except FileExistsError:
                    if not over:
                        raise
                    self._rename_over(fd, path)
            elif over:
                os.replace(self.path, path)
            else:
                rename_new(self.path, path)
            self.fd, self.path = None, None
            return fd

    def _rename_over(self, fd: int, path: Path) -> None:
        temp = self.directory / f"{uuid.uuid4().hex}.part"
        _name(fd, temp)
        try:
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise


# Directories where files without a name (O_TMPFILE) can be created and named later: probed once.
_UNNAMED_WORKS: dict[Path, bool] = {}
_UNNAMED_LOCK = threading.Lock()


def create_spool_file(directory: Path) -> tuple[int, Path | None]:
    """A new file in `directory` for a spool, open for reading and writing: without a name
    (O_TMPFILE) where the file system and /proc allow it to be named later (`Spool.take`), else
    named `<uuid>.part`. Returns the descriptor and the name (None: unnamed).

    Why unnamed: a receiver killed while an instance arrives (the kernel's out-of-memory killer,
    kill -9) leaves no file behind, so no spool of up to `max_instance_mb` waits in the blob store
    for the next start's clean-up of temp files older than an hour; a crash loop while large
    instances arrive would otherwise fill the disk with them.
    """
    if _unnamed_works(directory):
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644), None
    path = directory / f"{uuid.uuid4().hex}.part"
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), path


def _unnamed_works(directory: Path) -> bool:
    with _UNNAMED_LOCK:
        works = _UNNAMED_WORKS.get(directory)
        if works is None:
            works = _UNNAMED_WORKS[directory] = _probe_unnamed(directory)
            if not works:
                log.info("spool files in %s are named: the file system or /proc does not allow unnamed "
                         "ones (O_TMPFILE), so a killed receiver leaves its spool file until the next "
                         "clean-up of temp files older than an hour", directory)
        return works


def _probe_unnamed(directory: Path) -> bool:
    """Whether an O_TMPFILE file can be created in `directory` and linked to a name."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag:
        return False
    try:
        fd = os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o644)
    except OSError:  # EOPNOTSUPP (file system), EISDIR or EINVAL (kernel): no O_TMPFILE there
        return False
    probe = directory / f"{uuid.uuid4().hex}.probe"
    try:
        _name(fd, probe)
    except OSError:  # no /proc: it could not be named
        return False
    finally:
        os.close(fd)
    probe.unlink(missing_ok=True)
    return True


def _name(fd: int, path: Path) -> None:
    """Give the unnamed file open as `fd` the name `path` (linkat through /proc with
    AT_SYMLINK_FOLLOW, which needs no privilege; os.link without a directory descriptor would call
    link(2), which links the /proc symlink itself and fails with EXDEV)."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=directory, follow_symlinks=True)
    finally:
        os.close(directory)


def _write_all(fd: int, parts: list[Buffer]) -> None:
    """writev until every part is written (a write may be short). `parts` is left as it was."""
    parts, index = list(parts), 0
    while index < len(parts):
        written = os.writev(fd, parts[index:index + IOV_MAX])
        while written:
            size = len(parts[index])
            if written >= size:
                written -= size
                index += 1
            else:
                parts[index] = memoryview(parts[index])[written:]
                written = 0


def head_identity(head: bytes) -> ExtractedTags | None:
    """Study, Series and SOP Instance UID from the start of a Part 10 file (for a refusal's log
    line and event); None if they cannot be read there."""
    if not head:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(head), stop_before_pixels=True, force=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        uids = [str(ds.get(name, "") or "") for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    except Exception:  # noqa: BLE001 - only a log line and the event's subject depend on it
        return None
    return ExtractedTags(uids[0], uids[1], uids[2], "", "") if uids[0] and uids[1] else None


def split_head(meta: bytes, fragments: Sequence[Buffer]) -> tuple[bytes, Sequence[Buffer]]:
    """`meta` (preamble + File Meta) joined with the first HEAD_BYTES of the data set, and the rest
    of `fragments` (by reference)."""
    taken: list[Buffer] = [meta]
    size = len(meta)
    for index, fragment in enumerate(fragments):
        if size >= HEAD_BYTES:
            return b"".join(taken), fragments[index:]
        need = HEAD_BYTES - size
        if len(fragment) > need:
            view = memoryview(fragment)
            return b"".join((*taken, view[:need])), [view[need:], *fragments[index + 1:]]
        taken.append(fragment)
        size += len(fragment)
    return b"".join(taken), []


class MemoryBudget:
    """What the associations of this process hold in memory of data sets above FIRST_CLAIM, against
    `limit()` bytes (settings.spool_memory_budget_mb, per receiver process).

    Why: each association may keep a data set in memory up to spool_threshold_mb, so N
    associations sending such instances at once held N times that (and twice as much while they
    were stored): 8 senders of 24 MB instances took a receiver process +338-447 MB (now
    +112-145 MB), and the receiver accepts 200 associations. Now, once the budget is taken, a growing data set goes to its
    spool at once, whatever its own threshold allows.

    A data set claims its share in steps of CLAIM_STEP, once it passes FIRST_CLAIM (CT and MR never
    do: their path never takes the lock), so a data set takes the lock once per CLAIM_STEP received.
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.held = 0  # bytes claimed (COPIES per byte of data set)
        self.lock = threading.Lock()


class Claim:
    """One data set's share of a MemoryBudget. `release` gives it back: any thread, any number of
    times (the data set was stored or spooled, or its association ended)."""

    def __init__(self, budget: MemoryBudget, holders: set[Claim]) -> None:
        self.budget = budget
        self.holders = holders  # the claims of its association (released when it ends)
        self.size = 0  # the data set size claimed for
        self.released = False
        holders.add(self)

    def cover(self, size: int) -> bool:
        """Claim what a data set of `size` bytes costs, if the budget has it."""
        budget = self.budget
        with budget.lock:
            if self.released or size <= self.size:
                return True  # (released: its association ended meanwhile, nothing to count any more)
            more = (size - self.size) * COPIES
            if budget.held + more > budget.limit():
                return False
            budget.held += more
            self.size = size
            return True

    def release(self) -> None:
        with self.budget.lock:
            self.budget.held -= self.size * COPIES
            self.size, self.released = 0, True
        self.holders.discard(self)


class Spooler:
    """Where a data set goes once it outgrows memory (for both C-STORE paths of StorageSCP)."""

    def __init__(self, store: LocalBlobStore | None, settings: Callable[[], SettingsItem]) -> None:
        self.store = store  # None: not a local store, nothing is spooled (only the maximum applies)
        self.settings = settings
        self.budget = MemoryBudget(self._budget_bytes)

    def _budget_bytes(self) -> int:
        budget = self.settings().spool_memory_budget_mb * MB
        return budget if budget and self.store is not None else NEVER  # (not local: nothing can be spooled)

    def watch_at(self) -> int:
        """The data set size at which `open` is to be called, whatever the budget says."""
        settings = self.settings()
        threshold = settings.spool_threshold_mb * MB if self.store is not None else NEVER
        return min(threshold, settings.max_instance_mb * MB or NEVER)

    def claim(self, holders: set[Claim]) -> Claim:
        """A data set's share of the budget (none yet), kept in `holders` until released."""
        return Claim(self.budget, holders)

    def in_memory_until(self, claim: Claim, size: int) -> int:
        """How far a data set of `size` bytes (above FIRST_CLAIM) may grow in memory before it is
        asked again (claimed now); 0: it goes to a spool now (`open`), past `watch_at()` or the budget."""
        limit = self.watch_at()
        if size > limit:
            return 0
        until = min(limit, size + CLAIM_STEP)
        return until if claim.cover(until) else 0

    def open(self, meta: bytes, fragments: Sequence[Buffer], size: int, context_ts: str,
             context: dict[str, str]) -> Spool:
        """A spool holding `meta` and the `size` bytes of `fragments` received so far (or refused)."""
        settings = self.settings()
        store = self.store
        spool = Spool(settings, store.free_bytes if store is not None else lambda: None,
                      store is not None and store.fsync, context)
        spool.received = size
        head, rest = split_head(meta, fragments)
        if store is None:  # watch_at() is the maximum then
            spool._refuse(too_large(settings), head)
            return spool
        try:
            spool.start(store._tmp, head, rest, context_ts)  # the store's own temp dir (same filesystem)
        except BaseException:
            spool.discard()
            raise
        return spool


# ---------------------------------------------------------------- pynetdicom's own path


class DimseSink:
    """What pynetdicom's DIMSE message writes its data set into once it outgrew memory: the
    `_data_set_file` of its STORE_RECV_CHUNKED_DATASET mode (write, file.flush, close, name)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.file = self
        self.name = str(spool.path or "")

    def write(self, data: Buffer) -> None:
        self.spool.write(data)

    def flush(self) -> None:
        pass  # (pynetdicom flushes after every fragment; the spool writes in batches)

    def close(self) -> None:
        self.spool.discard()  # after the handler: a no-op unless the handler never took it


class HeldData(io.BytesIO):
    """pynetdicom's buffer of a C-STORE data set that passed FIRST_CLAIM, with its claim on the
    memory budget (released once the instance is stored, StorageSCP._store, or spooled)."""

    def __init__(self, received: io.BytesIO, claim: Claim) -> None:
        super().__init__()
        with received.getbuffer() as view:
            self.write(view)
        self.claim = claim
        self.until = 0  # the size it may reach before the budget is asked again


def watch_dimse(assoc: Any, spooler: Spooler, holders: set[Claim], on_spool: Callable[[Spool], None]) -> None:
    """Bound pynetdicom's own C-STORE path (messages the direct path hands over, or all of them
    with CADUCEUS_RECEIVER_DIRECT=0) like the direct path: once a C-STORE-RQ's data set passes
    `spooler.watch_at()`, or the memory budget is taken (its claim is kept in `holders`), it
    continues in a Spool, through pynetdicom's chunked-dataset hook.

    Why not pynetdicom's own `_config.STORE_RECV_CHUNKED_DATASET`: it is global and all or
    nothing (every C-STORE, CT and MR too, would go through a file), writes to the system temp
    directory (often a tmpfs, i.e. memory, and another file system than the blob store, so a copy
    instead of a rename), flushes after every fragment and knows no size limit. The check runs
    after each primitive pynetdicom decodes: a PDV on the direct path, a whole PDU without it.
    """
    dimse = assoc.dimse
    original = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        original(primitive)
        message = dimse.message
        if message is None or message._data_set_file is not None or not isinstance(message, C_STORE_RQ):
            return
        data_set = message.data_set
        if data_set is None or data_set.tell() <= FIRST_CLAIM:
            return
        size = data_set.tell()
        if not isinstance(data_set, HeldData):
            data_set = message.data_set = HeldData(data_set, spooler.claim(holders))
        if size <= data_set.until:
            return
        data_set.until = spooler.in_memory_until(data_set.claim, size)
        if data_set.until:
            return
        spool = _spool_message(assoc, message, spooler, size)
        data_set.claim.release()
        on_spool(spool)

    dimse.receive_primitive = receive_primitive


def _spool_message(assoc: Any, message: Any, spooler: Spooler, size: int) -> Spool:
    command = message.command_set
    sop_class, sop_uid = str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID)
    context_ts = str(assoc._accepted_cx[message.context_id].transfer_syntax[0])
    meta_error = ""
    try:
        meta = part10.PREAMBLE + part10.any_file_meta(sop_class, sop_uid, context_ts)
    except Exception as exc:  # noqa: BLE001 - as the in-memory path: quarantined as the bare data set
        meta, meta_error = b"", str(exc)
    info = getattr(assoc, "caduceus_info", None)
    context = {"sop_uid": sop_uid, "association_id": getattr(info, "association_id", "")}
    with message.data_set.getbuffer() as received:
        spool = spooler.open(meta, [received], size, context_ts, context)
    spool.meta_error = meta_error
    message.data_set = io.BytesIO()
    message._data_set_file = DimseSink(spool)
    message._data_set_path = spool.path
    return spool
