"""Which copy of an instance its blob file holds when several arrive: the newest, in one order.

Why: the receiver runs several processes (two by default), each with its own journal applier and
association threads. Two of them storing two different copies of one SOP instance at the same
moment each compared and renamed on their own, so the file held whichever copy was renamed last,
while the router routed whichever event came last on the stream. When the two orders differed,
the dispatcher found the file changed since routing and sent nothing for that instance (a review
of session 17). Now both follow the copies' rank (`shared.blobstore.copy_rank`: receipt stamp,
then sha256): a copy is placed only over an older one, the router routes the newest copy of a
batch, and a copy older than the stored one is published as `duplicate: superseded`, naming the
stored copy (`as_superseded`), which the router routes unless its batch holds that copy's own event.

How, at no cost for the usual case: a first copy is placed with a rename that fails if the name
exists (`rename_new`), so two first copies cannot both succeed. Only when a file is there already
is the instance's directory locked (flock, across processes and threads), and under that lock the
stored file's stamp (its modification time, set before the file got its name) is compared, a
newer identical copy restamps the file, and the rename over it happens.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import mmap
import os
from pathlib import Path
from typing import Protocol, TypeVar

from services.receiver.receipt import Duplicate
from shared.dicomtags import TagExtractionError, extract_tags
from shared.events import Event, StoredCopy

log = logging.getLogger(__name__)

W = TypeVar("W", covariant=True)


class Copy(Protocol[W]):
    """A copy of an instance, ready to be placed under its key."""

    @property
    def stamp(self) -> int:
        """Its receipt stamp (shared.blobstore.receipt_stamp), which its file gets."""

    def sha256(self) -> str:
        """Its digest: only asked for when the stored copy has the same stamp."""

    def holds_same(self, handle: io.BufferedReader, size: int) -> bool:
        """Whether the open file `handle` (of `size` bytes) holds these very bytes."""

    def place(self, path: Path, over: bool) -> W:
        """Put it at `path` with its stamp as modification time. `over=False`: FileExistsError
        if `path` exists (the copy stays ready for another try)."""


def place_newest(path: Path, copy: Copy[W], first: bool | None = None) -> tuple[Duplicate, W | None]:
    """Place `copy` unless the stored copy is newer; returns the verdict and what `place` returned
    (None: not placed: `identical` or `superseded`).

    `first`: whether the caller found no copy stored (the journal applier knows it from the
    verdict given on receipt), so nothing is looked up first; None: look.
    """
    if first is None:
        try:
            os.stat(path)
            first = False
        except FileNotFoundError:
            first = True
    while True:
        if first:
            try:
                return "new", copy.place(path, over=False)
            except FileExistsError:
                pass  # another process or thread placed a copy meanwhile: compare under the lock
        lock = _lock(path.parent)
        if lock is not None:
            try:
                return _place_locked(path, copy)
            finally:
                os.close(lock)  # (releases the lock)
        first = True  # no directory, so no copy yet (a replayed record of a hint that was wrong)


def _place_locked(path: Path, copy: Copy[W]) -> tuple[Duplicate, W | None]:
    while True:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # removed meanwhile (retention)
            try:
                return "new", copy.place(path, over=False)
            except FileExistsError:
                continue  # a first copy placed without the lock (place_newest): compare with it
        with handle:
            stat = os.fstat(handle.fileno())
            if copy.holds_same(handle, stat.st_size):
                if stat.st_mtime_ns < copy.stamp:
                    # The stored file now stands for this copy: a copy placed later must be newer
                    # than it, and its event's stamp is the file's.
                    os.utime(handle.fileno(), ns=(copy.stamp, copy.stamp))
                return "identical", None
            if _stored_is_newer(handle, stat, copy):
                return "superseded", None
        return "replaced", copy.place(path, over=True)


def _stored_is_newer(handle: io.BufferedReader, stat: os.stat_result, copy: Copy[W]) -> bool:
    if stat.st_mtime_ns != copy.stamp:
        return stat.st_mtime_ns > copy.stamp
    handle.seek(0)  # same stamp (same microsecond): the greater sha256 wins, as in the router
    return hashlib.file_digest(handle, "sha256").hexdigest() > copy.sha256()


def as_superseded(event: Event, path: Path) -> Event:
    """`event` (a copy found `superseded` at `path`) as published: naming the copy stored there.

    Why: that stored copy may never be announced (its process killed between placing a large
    instance and its F record being durable; or, without the journal, its publish failed and its
    sender heard 0xA700 while the file stayed), yet this copy's sender hears success. The router
    routes the copy named here when its batch holds no event of that copy (docs/reliability.md).

    Why the router, not an event of the stored copy published from here: this process cannot tell
    whether the stored copy's own event is still coming (the usual case: another process's applier
    placed it and publishes it next), so such an event would mostly announce a second time, with
    another association's sender, a copy that is announced anyway; this one says only what
    happened here and lets the router, which sees the batch, use it when nothing else does.
    """
    payload = {**event.payload, "duplicate": "superseded"}
    stored = stored_copy(path)
    if stored is not None:
        payload["stored"] = stored.model_dump()
    return event.model_copy(update={"payload": payload})


def stored_copy(path: Path) -> StoredCopy | None:
    """What the file at `path` holds (stamp, digest, size, and from its header SOP class and
    transfer syntax), read under the instance's lock; None if it cannot be read.

    Read after the placement that found the copy superseded, under the lock again (so the verdict
    keeps its plain type through the layers that pass it on): every rename or restamp over an
    existing file happens under this lock, so the stamp, digest and header are of one copy; and a
    stored copy is only ever replaced by a newer one, so the copy read is at least as new as the
    one that superseded, and is the one the file holds for the router to route.
    """
    lock = _lock(path.parent)
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:  # (read in place: may be GBs)
                tags = extract_tags(view)
    except (OSError, ValueError, TagExtractionError) as exc:  # (mmap of an empty file: ValueError)
        log.warning("a superseded copy's event cannot name the stored copy of %s (%s): the router "
                    "will not route it from this event", path, exc)
        return None
    finally:
        if lock is not None:
            os.close(lock)
    return StoredCopy(received_stamp=stat.st_mtime_ns, sha256=digest, size=stat.st_size,
                      sop_class_uid=tags.sop_class_uid, transfer_syntax_uid=tags.transfer_syntax_uid)


_LOCK_FAILED_LOGGED = False


def _lock(directory: Path) -> int | None:
    """An exclusive flock on the instance's directory (its series), for every thread and process:
    the descriptor to close when done, None if there is no such directory.

    Where the file system has no flock for a directory (NFS may refuse it), the placement goes on
    without it, as it did before this lock existed; logged once.
    """
    global _LOCK_FAILED_LOGGED
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        if not _LOCK_FAILED_LOGGED:
            _LOCK_FAILED_LOGGED = True
            log.warning("cannot lock %s (%s): two receiver processes storing copies of one instance "
                        "at once may keep another copy than the one routed", directory, exc)
    except BaseException:
        os.close(fd)
        raise
    return fd
