"""The receiver's write-ahead journal: where an accepted instance is durable first.

Why: for small images the per-image cost of "durable before 0x0000" was the floor (docs/
performance.md, "Small images: the fsync floor"): a new file, its rename, an fsync of the file and
one of its directory (0.84 ms per 32 KB image on the test disk), and JetStream's own fsynced
publish round trip. Overwriting an already written, preallocated file and calling `fdatasync`
costs 0.20 ms, because no metadata changes. So an instance is appended here, the journal is synced,
and only then does the sender hear success; the blob file and `image.received` follow behind
(services/receiver/applier.py), and a record is forgotten only once both are durable.

Layout of a journal directory (one per receiver process, see `slot_directory`):
- `seg-<n>.wal`: segments of `segment_bytes`, zero-filled and fsynced when created, then only
  overwritten in place. A segment is reused once every record in it is checkpointed.
- `checkpoint`: two slots of (seq, crc32), written alternately; the higher valid one says that
  every record up to that seq has its blob file on disk and its event stored by JetStream.

A record is a header (magic, crc32, seq, meta length, data length), then meta, then data. Records
of a segment are written in seq order from offset 0; a scan reads them while the magic, the crc and
the next seq match, so the stale records of a reused segment (lower seqs) and a torn last write
end the scan. Group commit: records are written under one lock (so the written part of a segment
is always a prefix) and synced under another; one `fdatasync` covers everyone who wrote before it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.blobstore import fsync_directory, start_writeback

log = logging.getLogger(__name__)

MAGIC = b"CDJ1"
HEADER = struct.Struct("<4sIQII")  # magic, crc32, seq, meta length, data length
FIELDS = struct.Struct("<QII")  # the header part the crc covers (seq, meta length, data length)
CHECKPOINT = struct.Struct("<QI")  # seq, crc32 of seq
CHECKPOINT_SLOT = 16
ZERO_CHUNK = 1024 * 1024
# Data of journaled instances kept in memory until applied (beyond it, read back from the journal,
# i.e. from the page cache); for the whole receiver: its processes share it (services/receiver/
# service.py open_journal). 64 MB let the receiver's two processes peak at 184-208 MB in
# bench.memory (goal: 200); 16 MB: 177 MB, with the same MR speed (docs/performance.md, "Session 11").
MEMORY_BYTES = 16 * 1024 * 1024


class JournalError(RuntimeError):
    """The journal cannot take the record (I/O error, record too large): the sender retries."""


class JournalFull(JournalError):
    """Every segment holds records not yet applied (JetStream unreachable?)."""


@dataclass(eq=False)
class Segment:
    number: int
    path: Path
    fd: int
    size: int
    write_end: int = 0
    synced_end: int = 0
    last_seq: int = 0  # highest seq written into this segment in its current use


@dataclass(eq=False)
class JournalRecord:
    seq: int
    segment: Segment
    offset: int  # of the data, within the segment
    meta: bytes
    data_len: int
    data: bytes | None  # None: read it back from the segment (kept out of memory)
    attachment: Any = None  # what the appending process knows about the record (not written)
    settled: threading.Event = field(default_factory=threading.Event)
    durable: bool = False  # set before `settled`; False: the sender was refused


@dataclass(eq=False)
class Chain:
    """What a segment's scan found: its first and last seq (0: none) and the records not yet
    checkpointed."""

    first: int = 0
    last: int = 0
    unapplied: list[JournalRecord] = field(default_factory=list)


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = 32 * 1024 * 1024,
                 max_bytes: int = 1024 * 1024 * 1024, memory_bytes: int = MEMORY_BYTES) -> None:
        if segment_bytes < 64 * 1024 or max_bytes < 2 * segment_bytes:
            raise ValueError("journal: segments of at least 64 KiB and room for at least two of them")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_segments = max_bytes // segment_bytes
        self.memory_bytes = memory_bytes
        self.queue: queue.Queue[JournalRecord] = queue.Queue()  # for the applier, in seq order
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._segments: list[Segment] = []
        self._segment_count = 0  # segments on disk or being created
        self._last_number = 0
        self._in_use: deque[Segment] = deque()  # holding records not checkpointed; active last
        self._free: list[Segment] = []
        self._next_seq = 1
        self._checkpointed = 0
        self._checkpoint_writes = 0
        self._checkpoint_fd = -1
        self._held_bytes = 0  # record data kept in memory for the applier
        self._broken: str | None = None
        self._lock_fd = -1

    # ------------------------------------------------------------ opening and recovery

    def open(self) -> list[JournalRecord]:
        """Open (or create) the journal; returns the records a previous process left unapplied.

        They are queued for the applier, in seq order, ahead of anything appended from now on.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JournalError(f"journal {self.directory} is in use by another process (receivers sharing a "
                               "data dir need their own CADUCEUS_RECEIVER_JOURNAL_SLOT)") from None
        self._checkpointed = self._open_checkpoint()
        for leftover in self.directory.glob("seg-*.new"):  # a creation cut short
            leftover.unlink()
        chains: list[tuple[Segment, Chain]] = []
        for path in sorted(self.directory.glob("seg-*.wal"), key=_segment_number):
            segment = self._open_segment(path)
            chains.append((segment, self._scan(segment)))
        self._next_seq = max([self._checkpointed] + [chain.last for _, chain in chains]) + 1
        pending: list[JournalRecord] = []
        for segment, chain in sorted(chains, key=lambda item: item[1].first):
            if chain.unapplied:
                segment.last_seq = chain.last
                self._in_use.append(segment)
                pending.extend(chain.unapplied)
            elif segment.size != self.segment_bytes:  # the configured size changed: not reused
                self._drop_segment(segment)
            else:
                self._free.append(segment)
        pending.sort(key=lambda r: r.seq)
        # New records never go into a segment that still holds unapplied ones.
        self._in_use.append(self._take_free_segment())
        for record in pending:
            record.durable = True
            record.settled.set()
            self.queue.put(record)
        if pending:
            log.warning("journal %s: %d instance(s) accepted by a previous process are not yet applied; "
                        "applying them now", self.directory, len(pending))
        return pending

    def _open_checkpoint(self) -> int:
        path = self.directory / "checkpoint"
        created = not path.exists()
        self._checkpoint_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if created:
            os.pwrite(self._checkpoint_fd, bytes(2 * CHECKPOINT_SLOT), 0)
            os.fsync(self._checkpoint_fd)
            fsync_directory(self.directory)
        raw = os.pread(self._checkpoint_fd, 2 * CHECKPOINT_SLOT, 0)
        best = 0
        for slot in range(2):
            chunk = raw[slot * CHECKPOINT_SLOT:slot * CHECKPOINT_SLOT + CHECKPOINT.size]
            if len(chunk) == CHECKPOINT.size:
                seq, crc = CHECKPOINT.unpack(chunk)
                if crc == zlib.crc32(struct.pack("<Q", seq)):
                    best = max(best, seq)
        return best

    def _open_segment(self, path: Path) -> Segment:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        segment = Segment(_segment_number(path), path, fd, os.fstat(fd).st_size)
        self._segments.append(segment)
        self._segment_count += 1
        self._last_number = max(self._last_number, segment.number)
        return segment

    def _drop_segment(self, segment: Segment) -> None:
        os.close(segment.fd)
        segment.path.unlink()
        self._segments.remove(segment)
        self._segment_count -= 1

    def _scan(self, segment: Segment) -> Chain:
        """The valid chain of records from offset 0 (see the module docstring). Records up to the
        checkpoint are only counted: neither read nor kept."""
        chain = Chain()
        offset = 0
        while offset + HEADER.size <= segment.size:
            magic, crc, seq, meta_len, data_len = HEADER.unpack(os.pread(segment.fd, HEADER.size, offset))
            end = offset + HEADER.size + meta_len + data_len
            if magic != MAGIC or end > segment.size or (chain.last and seq != chain.last + 1):
                break
            if seq > self._checkpointed:
                body = os.pread(segment.fd, meta_len + data_len, offset + HEADER.size)
                if zlib.crc32(FIELDS.pack(seq, meta_len, data_len), zlib.crc32(body)) != crc:
                    break
                chain.unapplied.append(JournalRecord(seq, segment, offset + HEADER.size + meta_len,
                                                     body[:meta_len], data_len, None))
            chain.first = chain.first or seq
            chain.last = seq
            offset = end
        return chain

    # ------------------------------------------------------------ appending

    def append(self, meta: bytes, data: bytes, attachment: Any = None) -> JournalRecord:
        """Write a record and return once it is on disk; raises JournalError (JournalFull)."""
        record = self.write(meta, data, attachment)
        durable = False
        try:
            self.sync(record)
            durable = True
        finally:
            self.settle(record, durable)
        return record

    def write(self, meta: bytes, data: bytes, attachment: Any = None) -> JournalRecord:
        """Write a record (not yet synced) and queue it for the applier; raises JournalError.

        The applier waits until the record is settled (`settle`), so the writer can still decide
        what the record means (its attachment) after this returns.
        """
        size = HEADER.size + len(meta) + len(data)
        if size > self.segment_bytes:
            raise JournalError(f"record of {size} bytes is larger than a journal segment")
        body_crc = zlib.crc32(data, zlib.crc32(meta))
        with self._write_lock:
            if self._broken:
                raise JournalError(self._broken)
            segment = self._in_use[-1]
            if segment.write_end + size > segment.size:
                segment = self._next_segment()
            seq, offset = self._next_seq, segment.write_end
            header = HEADER.pack(MAGIC, zlib.crc32(FIELDS.pack(seq, len(meta), len(data)), body_crc),
                                 seq, len(meta), len(data))
            try:
                written = os.pwritev(segment.fd, [header, meta, data], offset)
            except OSError as exc:
                self._broken = f"journal write failed: {exc}"
                raise JournalError(self._broken) from exc
            if written != size:  # a preallocated file: a short write means the device failed
                self._broken = f"journal write was short ({written} of {size} bytes)"
                raise JournalError(self._broken)
            self._next_seq += 1
            segment.write_end = offset + size
            segment.last_seq = seq
            keep = self._held_bytes + len(data) <= self.memory_bytes
            if keep:
                self._held_bytes += len(data)
            record = JournalRecord(seq, segment, offset + HEADER.size + len(meta), meta, len(data),
                                   data if keep else None, attachment)
            self.queue.put(record)
        return record

    def sync(self, record: JournalRecord) -> None:
        """Return once `record` is on disk (one fdatasync may cover several writers); raises
        JournalError."""
        self._sync(record.segment, record.offset + record.data_len)

    @staticmethod
    def start_writeback(record: JournalRecord) -> None:
        """Let the disk start on a written record now, so that a later `sync` waits for less."""
        start_writeback(record.segment.fd)

    @staticmethod
    def settle(record: JournalRecord, durable: bool) -> None:
        """Hand the record to the applier: durable (apply it) or not (the sender was refused)."""
        record.durable = durable
        record.settled.set()

    def _sync(self, segment: Segment, end: int) -> None:
        with self._sync_lock:
            if segment.synced_end >= end:
                return  # someone else's fdatasync covered this record
            target = segment.write_end  # everything below it is written (under the write lock)
            try:
                os.fdatasync(segment.fd)
            except OSError as exc:
                # After a failed fdatasync the kernel may have dropped the dirty pages: nothing more
                # may be accepted on top of this journal until a restart has recovered it.
                self._broken = f"journal fdatasync failed: {exc}"
                raise JournalError(self._broken) from exc
            segment.synced_end = target

    def _next_segment(self) -> Segment:
        """Called with the write lock held, when the active segment is full."""
        segment = self._take_free_segment()
        self._in_use.append(segment)
        return segment

    def _take_free_segment(self) -> Segment:
        """Called with the write lock held. Creating a segment here is the fallback: the applier
        keeps a spare ready (`prepare_spare`)."""
        if self._free:
            segment = self._free.pop()
        elif self._segment_count < self.max_segments:
            self._last_number += 1
            self._segment_count += 1
            try:
                segment = self._create_segment(self._last_number)
            except OSError as exc:
                self._segment_count -= 1
                raise JournalError(f"could not create a journal segment: {exc}") from exc
            self._segments.append(segment)
        else:
            raise JournalFull(f"the receiver journal is full ({self._segment_count} segments of "
                              f"{self.segment_bytes // (1024 * 1024)} MB hold instances whose events are "
                              "not yet stored: is JetStream reachable?)")
        segment.write_end = segment.synced_end = segment.last_seq = 0
        return segment

    def prepare_spare(self) -> None:
        """Create a free segment ahead of need (called by the applier, off the C-STORE path)."""
        with self._write_lock:
            if self._free or self._segment_count >= self.max_segments:
                return
            self._last_number += 1
            self._segment_count += 1
            number = self._last_number
        try:
            segment = self._create_segment(number)
        except OSError:
            with self._write_lock:
                self._segment_count -= 1
            raise
        with self._write_lock:
            self._segments.append(segment)
            self._free.append(segment)

    def _create_segment(self, number: int) -> Segment:
        path = self.directory / f"seg-{number:06d}.wal"
        tmp = path.with_suffix(".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            zeros = bytes(ZERO_CHUNK)
            for offset in range(0, self.segment_bytes, ZERO_CHUNK):
                os.pwrite(fd, zeros[:min(ZERO_CHUNK, self.segment_bytes - offset)], offset)
            os.fsync(fd)
            os.replace(tmp, path)
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return Segment(number, path, fd, self.segment_bytes)

    # ------------------------------------------------------------ the applier's side

    def read_data(self, record: JournalRecord) -> bytes:
        if record.data is not None:
            return record.data
        return os.pread(record.segment.fd, record.data_len, record.offset)

    def release(self, record: JournalRecord) -> None:
        """The applier is done with the record's data in memory."""
        if record.data is not None:
            with self._write_lock:
                self._held_bytes -= len(record.data)
            record.data = None

    def checkpoint(self, seq: int) -> None:
        """Every record up to `seq` is applied and durable elsewhere; their segments may be reused."""
        if seq <= self._checkpointed:
            return
        slot = self._checkpoint_writes % 2
        os.pwrite(self._checkpoint_fd, CHECKPOINT.pack(seq, zlib.crc32(struct.pack("<Q", seq))),
                  slot * CHECKPOINT_SLOT)
        os.fdatasync(self._checkpoint_fd)
        self._checkpoint_writes += 1
        self._checkpointed = seq
        with self._write_lock:
            while len(self._in_use) > 1 and self._in_use[0].last_seq <= seq:
                self._free.append(self._in_use.popleft())

    @property
    def checkpointed(self) -> int:
        return self._checkpointed

    def stats(self) -> dict[str, int]:
        return {"journal_segments": len(self._segments), "journal_segments_in_use": len(self._in_use),
                "journal_unapplied": self._next_seq - 1 - self._checkpointed}

    def close(self) -> None:
        for segment in self._segments:
            with contextlib.suppress(OSError):
                os.close(segment.fd)
        if self._checkpoint_fd >= 0:
            os.close(self._checkpoint_fd)
            self._checkpoint_fd = -1
        self._segments.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def slot_directory(data_dir: Path, slot: str) -> Path:
    return Path(data_dir) / "journal" / slot


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-", 1)[1])
