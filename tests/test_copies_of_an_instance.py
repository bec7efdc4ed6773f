"""Two receiver processes store two different copies of one SOP instance at the same moment: the
copy the blob store keeps and the copy the router routes must be the same one, so that the
dispatcher's check of the file against the manifest passes and the instance is delivered.

Reported open by the session 17 reviews (docs/reliability.md): the blob store kept the copy written
last and the router routed the event that came last on the stream; in the other order the
dispatcher found the file changed since routing and sent nothing for that instance. Here the
receiver's processes, the router's fold and manifest, and the dispatcher's check are the services'
own code, in one process, with the order of placing and publishing forced."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from services.dispatcher.handlers import _check_routed
from services.dispatcher.sender import SendItem
from services.receiver.ingest import STATUS_SUCCESS, AssociationInfo, Ingest, LocalBlobWriter
from services.receiver.tests.test_copies import EXPLICIT, SETTINGS, Process, Stream, apply_in_order, copy_of
from services.router.service import batch_manifest
from services.router.state import RouterState
from shared.blobstore import LocalBlobStore
from shared.events import Event


def _large_copies_at_once(root: Path, stream: Stream) -> LocalBlobStore:
    """Without the journal (or for instances above it), each association places its own file and
    publishes its event: process 1 places copy A, process 2 places copy B and publishes it, then
    process 1 publishes A."""
    store = LocalBlobStore(root / "blobs")
    placed, go = threading.Event(), threading.Event()
    publish = stream.publisher()

    def held_back(event: Event, timeout: float) -> Future[int]:
        placed.set()
        assert go.wait(10)
        return publish([(event, None)], timeout)[0]

    def at_once(event: Event, timeout: float) -> Future[int]:
        return publish([(event, None)], timeout)[0]

    first = Ingest(LocalBlobWriter(store), held_back, lambda: SETTINGS)
    second = Ingest(LocalBlobWriter(store), at_once, lambda: SETTINGS)
    statuses: list[int] = []
    try:
        thread = threading.Thread(target=lambda: statuses.append(first.store(
            AssociationInfo("a1", "M1", "CADUCEUS", "127.0.0.1", 104), copy_of("A", 300 * 1024), EXPLICIT, "")))
        thread.start()
        assert placed.wait(10)
        time.sleep(0.002)
        statuses.append(second.store(AssociationInfo("a2", "M2", "CADUCEUS", "127.0.0.1", 104),
                                     copy_of("B", 300 * 1024), EXPLICIT, ""))
        go.set()
        thread.join(10)
    finally:
        go.set()
        first.helpers.shutdown()
        second.helpers.shutdown()
    assert statuses == [STATUS_SUCCESS, STATUS_SUCCESS]
    return store


def _journaled_copies_at_once(root: Path, stream: Stream, newer_first: bool) -> LocalBlobStore:
    """Small instances: each process's journal applier places and publishes behind the C-STORE."""
    placed, go = threading.Event(), threading.Event()
    first = Process(root, "w1", stream, placed, go)
    second = Process(root, "w2", stream)
    first.receive(copy_of("A"))
    time.sleep(0.002)
    second.receive(copy_of("B"))
    apply_in_order(first, second, placed, go, newer_first)
    return first.store


@pytest.mark.parametrize("case", ["large, placed A B, published B A", "journaled, placed A B, published B A",
                                  "journaled, placed B A, published B A"])
def test_the_routed_copy_is_the_stored_copy_and_is_sent(tmp_path: Path, case: str) -> None:
    stream = Stream()
    if case.startswith("large"):
        store = _large_copies_at_once(tmp_path, stream)
    else:
        store = _journaled_copies_at_once(tmp_path, stream, newer_first="placed B A" in case)
    assert [e.payload["tags"]["SeriesDescription"] for e in stream.events] == ["B", "A"]

    router = RouterState()
    for seq, event in enumerate(stream.events, start=1):
        event.stream_seq = seq
        router.apply(event)
    [batch] = router.series.values()
    manifest = batch_manifest(batch)
    [routed] = manifest.instances
    assert routed.sha256 == stream.events[0].payload["sha256"]  # copy B, received last

    path = store.path(routed.blob_key)
    items, changed = _check_routed(manifest, [SendItem(0, routed.sop_uid, routed.sop_class_uid,
                                                       routed.transfer_syntax_uid, path)])
    assert changed == set() and [item.index for item in items] == [0]
    assert path.stat().st_mtime_ns == routed.received_stamp  # the dispatcher's one-stat check holds


def test_a_stored_copy_never_announced_is_routed_from_the_superseded_copys_event(tmp_path: Path) -> None:
    """Copy N is stored but never announced (its process was killed before its F record was
    durable); copy O, received before it and placed after, is superseded while its sender hears
    success. The router routes N from O's event, and the dispatcher's check of the file passes."""
    store = LocalBlobStore(tmp_path / "blobs")
    newer = copy_of("N", 300 * 1024)
    stamp = time.time_ns() // 1000 * 1000 + 3600 * 10**9
    key = "instances/1.2.3/1.2.3.4/1.2.3.4.5.6.dcm"
    store.put_sync(key, newer)
    os.utime(store.path(key), ns=(stamp, stamp))
    stream = Stream()
    publish = stream.publisher()
    ingest = Ingest(LocalBlobWriter(store), lambda event, timeout: publish([(event, None)], timeout)[0],
                    lambda: SETTINGS)
    try:
        assert ingest.store(AssociationInfo("a1", "M1", "CADUCEUS", "127.0.0.1", 104), copy_of("O"), EXPLICIT,
                            "") == STATUS_SUCCESS
    finally:
        ingest.helpers.shutdown()
    [event] = stream.events
    assert event.payload["duplicate"] == "superseded"

    router = RouterState()
    event.stream_seq = 1
    router.apply(event)
    [batch] = router.series.values()
    [routed] = batch_manifest(batch).instances
    assert (routed.sha256, routed.size, routed.received_stamp) == (hashlib.sha256(newer).hexdigest(), len(newer), stamp)
    items, changed = _check_routed(batch_manifest(batch), [SendItem(0, routed.sop_uid, routed.sop_class_uid,
                                                                    routed.transfer_syntax_uid, store.path(key))])
    assert changed == set() and [item.index for item in items] == [0]
