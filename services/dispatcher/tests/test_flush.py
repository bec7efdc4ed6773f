"""The progress flush loop of an attempt ends on its event alone.

Python 3.11's asyncio.wait_for (used by nats-py requests such as the KV reads/writes of a flush)
returns the reply and drops a cancellation that arrives together with it; the attempt then
awaited a flush loop that never ended (seen under load: every instance sent, no
dispatch.completed). The loop must stop when the send is over even without the cancel.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import pytest

from services.dispatcher import handlers, sender
from services.dispatcher.handlers import Dispatcher, _check_routed
from services.dispatcher.progress import ProgressStore
from services.dispatcher.sender import SendItem
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.events import DispatchRequested, make_event
from shared.manifest import Manifest, ManifestInstance


async def test_flush_loop_stops_on_its_event_without_a_cancel(bus: Bus, blob_store: LocalBlobStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    progress = await ProgressStore.open(bus.js)
    request = make_event("dispatch.requested", "router", DispatchRequested(
        task_id="flush-task", rule="r", target="t", manifest_key="m", instance_count=3), task_id="flush-task")
    await progress.ensure(request)
    dispatcher = Dispatcher(bus, progress, blob_store, CaduceusConfig, keep_alive_seconds=1, counters={})
    monkeypatch.setattr(handlers, "FLUSH_SECONDS", 0.05)
    confirmed: list[tuple[int, int]] = [(0, 0), (2, 0xB000)]
    sent = asyncio.Event()
    loop = asyncio.create_task(dispatcher._flush_loop("flush-task", confirmed, sent))
    deadline = time.monotonic() + 10
    while confirmed:  # the loop records what the sender confirmed, while it runs
        assert time.monotonic() < deadline, "nothing flushed"
        await asyncio.sleep(0.02)
    sent.set()  # no cancel: the event alone must end the loop
    await asyncio.wait_for(loop, 2)
    record = await progress.get("flush-task")
    assert record is not None
    assert sorted(i for i in range(3) if i in record.delivered_set()) == [0, 2] and record.warnings == 1


def test_a_file_with_the_routed_copys_stamp_is_not_read_again(tmp_path: Path) -> None:
    # The receiver stamps each blob with its copy's receipt time and the manifest carries it: one
    # stat tells the file is unchanged; only a file without it is hashed (and caught if replaced).
    path = tmp_path / "a.dcm"
    path.write_bytes(b"routed bytes")
    stamp = path.stat().st_mtime_ns
    def entry(sop_uid: str, sha256: str, received_stamp: int = 0) -> ManifestInstance:
        return ManifestInstance(sop_uid=sop_uid, series_uid="1", study_uid="1", blob_key="k", sop_class_uid="1.2",
                                transfer_syntax_uid="1.2", sha256=sha256, size=12, stream_seq=1,
                                received_stamp=received_stamp)

    manifest = Manifest(batch_id="b", level="series", study_uid="1", series_uids=["1"], instances=[
        entry("stamped", "not the hash", stamp), entry("unstamped", hashlib.sha256(b"routed bytes").hexdigest()),
        entry("replaced", "0" * 64, stamp + 1)])
    items = [SendItem(i, m.sop_uid, "1.2", "1.2", path) for i, m in enumerate(manifest.instances)]
    routed, changed = _check_routed(manifest, items)
    assert changed == {2} and [item.index for item in routed] == [0, 1]
    assert all(item.file_id is not None for item in routed)


def test_the_sender_skips_a_file_replaced_with_other_bytes_after_the_check(tmp_path: Path) -> None:
    path = tmp_path / "a.dcm"
    path.write_bytes(b"routed bytes")
    manifest = Manifest(batch_id="b", level="series", study_uid="1", series_uids=["1"], instances=[ManifestInstance(
        sop_uid="a", series_uid="1", study_uid="1", blob_key="k", sop_class_uid="1.2", transfer_syntax_uid="1.2",
        sha256=hashlib.sha256(b"routed bytes").hexdigest(), size=12, stream_seq=1)])
    [item], _ = _check_routed(manifest, [SendItem(0, "a", "1.2", "1.2", path)])
    assert not sender._replaced(item)

    def replace(data: bytes) -> None:  # as the receiver writes: a temp file renamed over the blob
        (tmp_path / "new").write_bytes(data)
        os.replace(tmp_path / "new", path)

    replace(b"routed bytes")  # the same bytes again (a journal replay): still the routed copy
    assert not sender._replaced(item)
    replace(b"a re-send's other bytes")
    assert sender._replaced(item)
