"""One contract, run against each blob store implementation."""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared import blobstore
from shared.blobstore import BlobError, BlobNotFound, BlobStore, LocalBlobStore, NatsObjectBlobStore, blob_key
from shared.bus import Bus


@pytest.fixture(params=["local", "nats"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, nats_url: str) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        yield LocalBlobStore(tmp_path / "blobs")
        return
    bus = await Bus.connect(nats_url, actor="test", declare=False)
    yield NatsObjectBlobStore(bus.js, "test-blobs")
    await bus.close()


async def test_put_get_roundtrip(store: BlobStore) -> None:
    key = blob_key("instances", "1.2.3", "1.2.3.4", "1.2.3.4.5.dcm")
    info = await store.put(key, b"DICM" * 1000)
    assert info.size == 4000 and len(info.sha256) == 64
    assert await store.get(key) == b"DICM" * 1000
    assert await store.exists(key)


async def test_overwrite_replaces_content(store: BlobStore) -> None:
    key = blob_key("a", "b")
    await store.put(key, b"one")
    await store.put(key, b"two")
    assert await store.get(key) == b"two"


async def test_missing_blob_raises_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.get(blob_key("nope", "x"))
    assert not await store.exists(blob_key("nope", "x"))


async def test_delete_and_list(store: BlobStore) -> None:
    for name in ("x1", "x2", "x3"):
        await store.put(blob_key("series", "s1", name), name.encode())
    await store.put(blob_key("series", "s2", "y"), b"y")
    assert await store.list("series/s1") == ["series/s1/x1", "series/s1/x2", "series/s1/x3"]
    await store.delete(blob_key("series", "s1", "x2"))
    assert await store.list("series/s1") == ["series/s1/x1", "series/s1/x3"]
    await store.delete(blob_key("series", "s1", "x2"))  # deleting twice is harmless


def test_local_store_removes_only_stale_temp_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    stale, fresh = store._tmp / "stale.part", store._tmp / "fresh.part"
    stale.write_bytes(b"half an instance")
    fresh.write_bytes(b"being written right now")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    key = blob_key("kept", "k.dcm")
    store.put_sync(key, b"a blob")
    assert store.remove_stale_temp(older_than_seconds=3600) == 1
    assert not stale.exists() and fresh.exists()
    assert store.get_sync(key) == b"a blob"


async def test_local_file_gives_a_readable_path(store: BlobStore) -> None:
    key = blob_key("f", "g.dcm")
    await store.put(key, b"content")
    async with store.local_file(key) as path:
        assert path.read_bytes() == b"content"


@pytest.mark.parametrize("hostile", ["../../etc/passwd", "..", ".", "a/b", "x\x00y", "1" * 300, "", " ", "C:\\win",
                                     "uid with space", "\u00e9\u00e8"])
async def test_hostile_segments_cannot_escape(store: BlobStore, hostile: str, tmp_path: Path) -> None:
    key = blob_key("instances", hostile, hostile + ".dcm")
    assert ".." not in key.split("/") and "\x00" not in key and len(key.split("/")) == 3
    await store.put(key, b"safe")
    assert await store.get(key) == b"safe"
    if isinstance(store, LocalBlobStore):
        assert store.root in store.path(key).parents


@pytest.mark.parametrize("raw", ["../x", "a/../../b", "/abs", "a//b", "a/\x00"])
async def test_raw_unsafe_keys_are_refused(store: BlobStore, raw: str) -> None:
    with pytest.raises(BlobError):
        await store.put(raw, b"x")


def test_distinct_hostile_values_get_distinct_keys() -> None:
    assert blob_key("../a") != blob_key("../b")
    assert blob_key("1.2.3") == "1.2.3"


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "link and unlink"])
def test_rename_new_never_replaces_and_keeps_the_source_when_the_name_is_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, noreplace: bool) -> None:
    """Both ways (renameat2 RENAME_NOREPLACE, and a hard link then unlink where the kernel or file
    system lacks it): the first copy gets the name, a second one gets FileExistsError and keeps its
    temp file for the comparison under the lock (services/receiver/placing.py)."""
    if noreplace and not blobstore._NOREPLACE_WORKS:
        pytest.skip("no renameat2 here")
    monkeypatch.setattr(blobstore, "_NOREPLACE_WORKS", noreplace)
    first, second, target = tmp_path / "a.part", tmp_path / "b.part", tmp_path / "x.dcm"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    blobstore.rename_new(first, target)
    assert target.read_bytes() == b"first" and not first.exists()
    with pytest.raises(FileExistsError):
        blobstore.rename_new(second, target)
    assert target.read_bytes() == b"first" and second.read_bytes() == b"second"
    assert os.stat(target).st_nlink == 1  # (no name of the temp file left on it)


def test_rename_new_falls_back_to_link_and_unlink_where_renameat2_says_einval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without RENAME_NOREPLACE answers EINVAL: the rename is done by link and
    unlink, and from then on without asking renameat2 again."""
    calls = []

    class NoNoreplace:
        def renameat2(self, *args: object) -> int:
            calls.append(args)
            ctypes.set_errno(errno.EINVAL)
            return -1

    monkeypatch.setattr(blobstore, "LIBC", NoNoreplace())
    monkeypatch.setattr(blobstore, "_NOREPLACE_WORKS", True)
    source, target = tmp_path / "a.part", tmp_path / "x.dcm"
    for _ in range(2):
        source.write_bytes(b"data")
        target.unlink(missing_ok=True)
        blobstore.rename_new(source, target)
        assert target.read_bytes() == b"data" and not source.exists()
    assert len(calls) == 1 and blobstore._NOREPLACE_WORKS is False
