"""Where image files live. Events carry blob keys, never pixel data.

Keys are '/'-joined segments built with `blob_key(...)`, which makes every segment safe: a UID
such as '../../etc' or one with NUL bytes or 300 characters becomes a hashed token, so no key can
name a path outside the store.

Two implementations with one contract (tests/test_blobstore.py runs against both):
- LocalBlobStore: files under <data dir>/blobs; writes go to a temp file, are fsynced, then renamed.
- NatsObjectBlobStore: a JetStream object store bucket, for hosts without a shared volume.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from shared.libc import LIBC

_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,95}$")


class BlobError(RuntimeError):
    pass


class BlobNotFound(BlobError):
    pass


def fsync_directory(directory: Path) -> None:
    """Make the entries of `directory` (a new file, a rename) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages, do not wait


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting.

    Only a head start for a later fsync (which is what makes the data durable): the device writes
    while the caller does other work, and the fsync then waits for less. Linux only; elsewhere,
    or if the call fails, the fsync does all the work as before.
    """
    if LIBC is None or not hasattr(LIBC, "sync_file_range"):
        return
    LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


def file_holds(path: Path, data: bytes) -> bool | None:
    """Whether the file at `path` holds exactly `data`; None if there is no file. The sizes are
    compared first: a file of another size is never read (a spooled instance's may be GBs)."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below; a missing file is a common case
    except FileNotFoundError:
        return None
    with handle:
        return os.fstat(handle.fileno()).st_size == len(data) and handle.read() == data


def receipt_stamp(received_at: datetime) -> int:
    """The modification time (ns) an instance's blob file gets: its copy's receipt time.

    The receiver stamps every instance file it writes on a local store; the router records the
    stamp in the manifest; so a later reader tells, with one stat, that a file still holds the copy
    it expects (the dispatcher; a journal replay deciding which copy is newer).
    """
    return int(received_at.timestamp()) * 1_000_000_000 + received_at.microsecond * 1000


CopyRank = tuple[int, str]


def copy_rank(received_at: datetime, sha256: str) -> CopyRank:
    """Where a copy of an instance stands among its copies: by receipt stamp, then (equal stamps,
    other bytes) by sha256. The one order the receiver keeps the newest copy in the blob store by
    and the router routes the newest copy of a batch by, so the two never disagree (docs/
    reliability.md, "De-duplication rules")."""
    return receipt_stamp(received_at), sha256


RENAME_NOREPLACE = 1  # <linux/fs.h>
AT_FDCWD = -100
_NOREPLACE_WORKS = LIBC is not None and hasattr(LIBC, "renameat2")


def rename_new(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists: FileExistsError then, and `source` stays.

    Atomic: of two processes placing a first copy of an instance at once, one gets the name and
    the other learns that a copy is there. renameat2(RENAME_NOREPLACE) where kernel and file system
    have it (one call, as os.replace), else a hard link and the unlink of `source`.
    """
    global _NOREPLACE_WORKS
    if _NOREPLACE_WORKS:
        assert LIBC is not None
        if LIBC.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))  # (EEXIST: a FileExistsError)
        _NOREPLACE_WORKS = False  # this kernel or file system has no RENAME_NOREPLACE
    os.link(source, target)
    os.unlink(source)


def safe_segment(value: str) -> str:
    if _SAFE_SEGMENT.match(value) and value not in (".", ".."):
        return value
    return "h" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def blob_key(*segments: str) -> str:
    if not segments:
        raise BlobError("empty blob key")
    return "/".join(safe_segment(s) for s in segments)


def _check_key(key: str) -> list[str]:
    parts = key.split("/")
    if not parts or any(not _SAFE_SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise BlobError(f"unsafe blob key {key!r}")
    return parts


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> BlobInfo: ...
    async def put_file(self, key: str, path: Path) -> BlobInfo: ...
    async def get(self, key: str) -> bytes: ...
    async def exists(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def list(self, prefix: str) -> list[str]: ...
    def local_file(self, key: str) -> contextlib.AbstractAsyncContextManager[Path]: ...


class LocalBlobStore:
    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self._root_prefix = os.path.join(str(self.root), "")  # with the trailing separator
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._tmp = self.root / ".tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, key: str) -> Path:
        path = self.root.joinpath(*_check_key(key))
        # _check_key admits no separator and no dot segment, so this cannot fail today; it guards the
        # store against a later change there. (A string test: `root in path.parents` built a Path per
        # parent and cost more than the rest of this method, on every image the receiver stores.)
        if not str(path).startswith(self._root_prefix):
            raise BlobError(f"blob key escapes the store: {key!r}")
        return path

    # The receiver calls the *_sync methods from pynetdicom's association threads.
    def put_sync(self, key: str, data: bytes | memoryview) -> BlobInfo:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                if self.fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            # A failed write (disk full) must not leave a partial temp file taking the space.
            tmp.unlink(missing_ok=True)
            raise
        return BlobInfo(key, len(data), hashlib.sha256(data).hexdigest())

    def get_sync(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    async def put(self, key: str, data: bytes) -> BlobInfo:
        return self.put_sync(key, data)

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        return self.put_sync(key, Path(path).read_bytes())

    async def get(self, key: str) -> bytes:
        return self.get_sync(key)

    async def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    async def list(self, prefix: str) -> list[str]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and self._tmp not in p.parents)

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        yield path

    def remove_stale_temp(self, older_than_seconds: float = 3600.0) -> int:
        """Delete temp files left by writes that never finished (a process killed mid-write).

        Such a file never became a blob and no sender got a success for it. Only files older than
        `older_than_seconds` go: another process may be writing into the same temp directory now.
        Returns how many were removed.
        """
        cutoff = time.time() - older_than_seconds
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed

    def sync_filesystem(self) -> None:
        """Make every write so far on the store's filesystem durable: one syncfs(2) instead of an
        fsync per file and directory (the receiver's journal applier, once a second)."""
        if not self.fsync:
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if LIBC is None or not hasattr(LIBC, "syncfs"):
                os.sync()
            elif LIBC.syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"syncfs: {os.strerror(code)}")
        finally:
            os.close(fd)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize


class NatsObjectBlobStore:
    """Blobs in a JetStream object store bucket (128 KiB chunks)."""

    def __init__(self, js: object, bucket: str) -> None:
        self.js = js
        self.bucket_name = bucket
        self._store: object | None = None

    async def _bucket(self):  # type: ignore[no-untyped-def]
        if self._store is None:
            from nats.js.api import ObjectStoreConfig
            from nats.js.errors import BucketNotFoundError

            try:
                self._store = await self.js.object_store(self.bucket_name)  # type: ignore[attr-defined]
            except BucketNotFoundError:
                self._store = await self.js.create_object_store(  # type: ignore[attr-defined]
                    self.bucket_name, config=ObjectStoreConfig(bucket=self.bucket_name))
        return self._store

    async def put(self, key: str, data: bytes) -> BlobInfo:
        _check_key(key)
        store = await self._bucket()
        await store.put(key, data)
        return BlobInfo(key, len(data), hashlib.sha256(data).hexdigest())

    async def put_file(self, key: str, path: Path) -> BlobInfo:
        return await self.put(key, Path(path).read_bytes())

    async def get(self, key: str) -> bytes:
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        _check_key(key)
        store = await self._bucket()
        try:
            result = await store.get(key)
        except (ObjectNotFoundError, NotFoundError):
            raise BlobNotFound(key) from None
        return bytes(result.data or b"")

    async def exists(self, key: str) -> bool:
        from nats.js.errors import NotFoundError, ObjectDeletedError, ObjectNotFoundError

        _check_key(key)
        store = await self._bucket()
        try:
            info = await store.get_info(key)
        except (ObjectNotFoundError, NotFoundError, ObjectDeletedError):
            return False
        return not getattr(info, "deleted", False)

    async def delete(self, key: str) -> None:
        from nats.js.errors import NotFoundError, ObjectNotFoundError

        store = await self._bucket()
        with contextlib.suppress(ObjectNotFoundError, NotFoundError):
            await store.delete(key)

    async def list(self, prefix: str) -> list[str]:
        from nats.js.errors import NotFoundError

        store = await self._bucket()
        try:
            infos = await store.list()
        except NotFoundError:
            return []
        base = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(i.name for i in infos if not i.deleted and i.name.startswith(base))

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        data = await self.get(key)
        with tempfile.TemporaryDirectory(prefix="caduceus-blob-") as tmp:
            path = Path(tmp) / "blob.dcm"
            path.write_bytes(data)
            yield path


def open_blob_store(kind: str, data_dir: Path, js: object | None = None) -> BlobStore:
    if kind == "local":
        return LocalBlobStore(Path(data_dir) / "blobs")
    if kind == "nats":
        if js is None:
            raise BlobError("the nats blob store needs a JetStream connection")
        from shared.subjects import BLOB_BUCKET

        return NatsObjectBlobStore(js, BLOB_BUCKET)
    raise BlobError(f"unknown blob store {kind!r} (expected 'local' or 'nats')")
