"""C-STORE statuses: warnings count as delivered, failures fail the attempt, and the retry sends
only what the peer has not confirmed. The peer is a pynetdicom Storage SCP answering per instance."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from bench.common import stage_files
from services.dispatcher import sender
from services.dispatcher.sender import Destination, SendItem, send_items
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.natsserver import free_port
from tests.peers import make_series

from .conftest import (
    FAST_RETRIES,
    apply_config,
    dicom_target,
    events_of,
    request_dispatch,
    run_cli,
    running_dispatcher,
    start_dispatcher_process,
    wait_events,
)


class ScriptedScp:
    """Answers each SOP Instance UID with the next status of its script, 0x0000 when none is left."""

    def __init__(self, max_associations: int = 10, store_seconds: float = 0.0) -> None:
        self.port = free_port()
        self.script: dict[str, list[int]] = {}
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.store_seconds = store_seconds
        self.comments: dict[str, str] = {}  # SOP Instance UID -> Error Comment sent with its status
        self.rejected = 0  # associations rejected (more than max_associations at once)
        self.open = self.most_open = 0  # associations open now / at most at once
        ae = AE(ae_title="SCRIPTED")
        ae.maximum_associations = max_associations  # more are rejected: transient, local limit exceeded
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established), (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended)])
        assert server is not None
        self.server = server

    def _on_rejected(self, event: evt.Event) -> None:
        with self.lock:
            self.rejected += 1

    def _on_established(self, event: evt.Event) -> None:
        with self.lock:
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def _on_ended(self, event: evt.Event) -> None:
        with self.lock:
            self.open -= 1

    def _on_store(self, event: evt.Event) -> int | Dataset:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        time.sleep(self.store_seconds)
        with self.lock:
            self.received.append(uid)
            statuses = self.script.get(uid)
            status = statuses.pop(0) if statuses else 0x0000
        if uid not in self.comments:
            return status
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = self.comments[uid]
        return answer


@pytest.fixture
def scripted_scp() -> Iterator[ScriptedScp]:
    scp = ScriptedScp()
    yield scp
    scp.server.shutdown()


async def test_warning_is_delivered_failure_is_retried_alone(tmp_path: Path, bus: Bus, nats_url: str,
                                                             data_dir: Path, blob_store: LocalBlobStore,
                                                             scripted_scp: ScriptedScp) -> None:
    files = make_series(tmp_path / "series", 4)
    manifest, key = await stage_files(blob_store, files)
    warned, refused = manifest.instances[0].sop_uid, manifest.instances[2].sop_uid
    scripted_scp.script = {warned: [0xB000], refused: [0xA700]}  # out of resources, then fine
    await apply_config(bus, {"settings": FAST_RETRIES,
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        completed = (await wait_events(bus, "dispatch.completed", request.task_id))[0]
    attempts = await events_of(bus, "dispatch.attempt_failed", request.task_id)
    assert len(attempts) == 1
    assert attempts[0].payload["sent"] == 3 and attempts[0].payload["failed"] == 1
    assert "0xA700" in attempts[0].payload["error"]
    # Per-instance outcomes: the warned and the refused instance, each with its status and meaning.
    outcomes = {o["sop_uid"]: o for o in attempts[0].payload["outcomes"]}
    assert set(outcomes) == {warned, refused} and attempts[0].payload["outcomes_omitted"] == 0
    assert outcomes[warned]["status"] == 0xB000 and "Coercion" in outcomes[warned]["reason"], outcomes
    assert outcomes[refused]["status"] == 0xA700 and "0xA700" in outcomes[refused]["reason"], outcomes
    assert completed.payload == {**completed.payload, "sent": 1, "skipped_already_sent": 3, "warnings": 1,
                                 "attempt": 2, "outcomes": []}
    # The peer got every instance once, and the refused one a second time.
    assert sorted(scripted_scp.received) == sorted([i.sop_uid for i in manifest.instances] + [refused])


class HangingScp(ScriptedScp):
    """Never answers the C-STORE of the instances in `hang` (the handler blocks until released)."""

    def __init__(self, hang: set[str]) -> None:
        self.hang = hang
        self.release = threading.Event()
        super().__init__()

    def _on_store(self, event: evt.Event) -> int | Dataset:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        if uid in self.hang:
            self.hang.discard(uid)  # once
            self.release.wait(60)
        return super()._on_store(event)


def test_a_destination_that_never_answers_a_c_store_times_out_and_the_rest_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The C-STORE response never comes: the send must end (DIMSE timeout, here 1 s instead of
    # 120 s), abort that association, count the instance as failed for this attempt (its retry
    # sends it) and deliver the others on a new association.
    files = make_series(tmp_path / "series", 4)
    items = []
    for index, path in enumerate(files):
        ds = dcmread(path, stop_before_pixels=True)
        items.append(SendItem(index, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                              str(ds.file_meta.TransferSyntaxUID), path))
    scp = HangingScp({items[1].sop_uid})
    original = sender._associate

    def associate_with_short_dimse_timeout(dest: Destination, group: Any) -> Any:
        assoc = original(dest, group)
        assoc.dimse_timeout = 1.0
        return assoc

    monkeypatch.setattr(sender, "_associate", associate_with_short_dimse_timeout)
    try:
        started = time.monotonic()
        result = send_items(Destination("127.0.0.1", scp.port, "SCRIPTED", "CADUCEUS"), items,
                            lambda index, status: None, threading.Event())
        assert time.monotonic() - started < 10
        assert sorted(result.delivered) == [0, 2, 3] and list(result.failed) == [1], result
        # The retry delivers it.
        again = send_items(Destination("127.0.0.1", scp.port, "SCRIPTED", "CADUCEUS"), [items[1]],
                           lambda index, status: None, threading.Event())
        assert again.delivered == [1], again
    finally:
        scp.release.set()
        scp.server.shutdown()


async def test_a_peer_taking_fewer_parallel_associations_still_gets_the_whole_series(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore) -> None:
    # A PACS that limits associations per caller (here to 1) rejects the others as "local limit
    # exceeded" (transient): their share of the series must go over the association it accepted,
    # not fail at every attempt while the task runs out of retries.
    scp = ScriptedScp(max_associations=1, store_seconds=0.2)
    try:
        files = make_series(tmp_path / "series", 8)
        manifest, key = await stage_files(blob_store, files)
        await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1}, "targets": {
            "scripted": dicom_target(scp.port, "SCRIPTED", parallel_associations=4)}})
        async with running_dispatcher(nats_url, data_dir):
            request = await request_dispatch(bus, manifest, key, "scripted")
            done = await wait_events(bus, "dispatch.completed", request.task_id, timeout=30)
        assert done[0].payload["sent"] == 8
        assert sorted(scp.received) == sorted(i.sop_uid for i in manifest.instances)
    finally:
        scp.server.shutdown()


async def test_every_warning_status_counts_as_delivered(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                        blob_store: LocalBlobStore, scripted_scp: ScriptedScp) -> None:
    # PS3.7 Annex C: besides the storage warnings (B000, B006, B007) a peer may answer the general
    # warnings 0107 (attribute list error) and 0116 (attribute value out of range), or another Bxxx.
    # The peer stored the instance: sending it again would not change its answer.
    files = make_series(tmp_path / "series", 4)
    manifest, key = await stage_files(blob_store, files)
    scripted_scp.script = {instance.sop_uid: [status] for instance, status in
                           zip(manifest.instances, (0x0107, 0x0116, 0xB00A, 0xB007), strict=True)}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        completed = (await wait_events(bus, "dispatch.completed", request.task_id, timeout=15))[0]
    assert completed.payload["sent"] == 4 and completed.payload["warnings"] == 4
    assert await events_of(bus, "dispatch.attempt_failed", request.task_id) == []


async def test_two_dispatchers_send_each_task_once(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                   blob_store: LocalBlobStore, scripted_scp: ScriptedScp) -> None:
    # Two dispatcher processes on the same durables, in the normal case (nobody dies): every task
    # is started once, by one of them, and the peer receives every instance once per task.
    scripted_scp.store_seconds = 0.01
    files = make_series(tmp_path / "series", 3)
    manifest, key = await stage_files(blob_store, files)
    await apply_config(bus, {"settings": FAST_RETRIES,
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    processes = [start_dispatcher_process(nats_url, data_dir, tmp_path / f"dispatcher-{n}.log") for n in (1, 2)]
    try:
        tasks = [(await request_dispatch(bus, manifest, key, "scripted")).task_id or "" for _ in range(24)]
        await wait_events(bus, "dispatch.completed", count=len(tasks), timeout=60)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    started = await events_of(bus, "dispatch.started")
    assert sorted(e.payload["task_id"] for e in started) == sorted(tasks)
    assert len({e.payload["instance"] for e in started}) == 2, "one dispatcher did all the work: test proves little"
    assert len(scripted_scp.received) == len(tasks) * len(files)


async def test_a_refusal_says_what_the_status_means_and_what_the_peer_commented(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        scripted_scp: ScriptedScp) -> None:
    # "C-STORE status 0xA900" alone sends the admin to the standard; the peer's Error Comment
    # (0000,0902) usually says what it did not like.
    files = make_series(tmp_path / "series", 2)
    manifest, key = await stage_files(blob_store, files)
    refused = manifest.instances[1].sop_uid
    scripted_scp.script = {refused: [0xA900]}
    scripted_scp.comments = {refused: "Patient ID missing"}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        [failed] = await wait_events(bus, "dispatch.failed", request.task_id, timeout=15)
    assert "1 instance(s) refused (C-STORE status 0xA900 (Data Set Does Not Match SOP Class): " \
           "Patient ID missing)" in failed.payload["error"], failed.payload["error"]


async def test_refusals_a_resend_cannot_change_are_not_resent_and_end_the_task_at_once(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        scripted_scp: ScriptedScp) -> None:
    # A PACS that refuses an instance with 0xA900 (data set does not match SOP class) or 0x0122 (SOP
    # class not supported) answers the same every time. Later attempts resend only what failed for a
    # transient reason (0xA700), and the task fails as soon as nothing else is left, naming the
    # refused instances, instead of resending them through every attempt and waiting out the backoff.
    files = make_series(tmp_path / "series", 4)
    manifest, key = await stage_files(blob_store, files)
    mismatch, unsupported, busy, fine = (i.sop_uid for i in manifest.instances)
    scripted_scp.script = {mismatch: [0xA900] * 9, unsupported: [0x0122] * 9, busy: [0xA700]}
    scripted_scp.comments = {mismatch: "Patient ID missing"}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 5},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        task_id = request.task_id or ""
        [failed] = await wait_events(bus, "dispatch.failed", task_id, timeout=20)
        attempts = await events_of(bus, "dispatch.attempt_failed", task_id)
        assert [(e.payload["attempt"], e.payload["sent"], e.payload["failed"], e.payload["not_resent"])
                for e in attempts] == [(1, 1, 3, 0), (2, 1, 2, 2)], [e.payload for e in attempts]
        assert [e.payload["retry_in_seconds"] for e in attempts] == [0.2, 0.0]
        finals = {o["sop_uid"]: o["final"] for o in attempts[0].payload["outcomes"]}
        assert finals == {mismatch: True, unsupported: True, busy: False}
        assert failed.payload["attempts"] == 2
        assert sorted(failed.payload["failed_sop_uids"]) == sorted([mismatch, unsupported])
        refused = {o["sop_uid"]: o for o in failed.payload["refused"]}
        assert set(refused) == {mismatch, unsupported} and failed.payload["refused_omitted"] == 0
        assert refused[mismatch]["status"] == 0xA900 and "Patient ID missing" in refused[mismatch]["reason"]
        assert refused[unsupported]["status"] == 0x0122 and "SOP Class Not Supported" in refused[unsupported]["reason"]
        assert "2 instance(s) refused" in failed.payload["error"] and "cannot change" in failed.payload["error"]
        [alert] = await events_of(bus, "alert.raised", task_id)
        assert mismatch in alert.payload["message"] and f"caduceus retry {task_id}" in alert.payload["message"]
        # Each refused instance went out once; the busy one twice.
        assert sorted(scripted_scp.received) == sorted([mismatch, unsupported, busy, busy, fine])

        # The operator fixed the PACS: a manual retry resends the refused instances too.
        scripted_scp.script, scripted_scp.comments = {}, {}
        result = await asyncio.to_thread(run_cli, nats_url, "retry", task_id)
        assert result.returncode == 0, result.stderr
        [completed] = await wait_events(bus, "dispatch.completed", task_id, timeout=20)
    assert completed.payload["sent"] == 2 and completed.payload["skipped_already_sent"] == 2
    assert sorted(scripted_scp.received) == sorted([mismatch, unsupported, busy, busy, fine, mismatch, unsupported])


async def test_cannot_understand_is_retried_and_refusals_for_good_are_not(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        scripted_scp: ScriptedScp) -> None:
    # 0xCxxx "cannot understand" is what SCP toolkits answer when anything goes wrong while storing
    # (pynetdicom 0xC211 for an exception in its handler, a PACS for its database being down): it is
    # resent at every attempt. 0x0124 (not authorized) is sent once; the task's dispatch.failed,
    # after its attempts, still names it among the refusals.
    files = make_series(tmp_path / "series", 3)
    manifest, key = await stage_files(blob_store, files)
    hiccup, forbidden, _ = (i.sop_uid for i in manifest.instances)
    scripted_scp.script = {hiccup: [0xC211] * 9, forbidden: [0x0124] * 9}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 3},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        [failed] = await wait_events(bus, "dispatch.failed", request.task_id, timeout=20)
    assert failed.payload["attempts"] == 3
    assert [(o["sop_uid"], o["status"]) for o in failed.payload["refused"]] == [(forbidden, 0x0124)]
    assert sorted(failed.payload["failed_sop_uids"]) == sorted([hiccup, forbidden])
    assert sorted(scripted_scp.received) == sorted([i.sop_uid for i in manifest.instances] + [hiccup, hiccup])
    attempts = await events_of(bus, "dispatch.attempt_failed", request.task_id)
    assert [e.payload["not_resent"] for e in attempts] == [0, 1, 1]


async def test_a_task_refused_for_good_in_its_first_attempt_fails_without_waiting(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        scripted_scp: ScriptedScp) -> None:
    files = make_series(tmp_path / "series", 2)
    manifest, key = await stage_files(blob_store, files)
    scripted_scp.script = {manifest.instances[0].sop_uid: [0xA901] * 9}
    await apply_config(bus, {"settings": {"dispatch_retries": 5, "dispatch_retry_wait_seconds": 60},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        [failed] = await wait_events(bus, "dispatch.failed", request.task_id, timeout=15)
    assert failed.payload["attempts"] == 1
    [attempt] = await events_of(bus, "dispatch.attempt_failed", request.task_id)
    assert attempt.payload["retry_in_seconds"] == 0.0 and attempt.payload["sent"] == 1


async def test_a_sop_class_the_destination_does_not_support_is_refused_for_good(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        scripted_scp: ScriptedScp) -> None:
    # The peer supports CT Image Storage only: it answers the MR instance's presentation contexts
    # "abstract syntax not supported", here in an association that proposed nothing else. That is
    # its set-up, not a passing state: the MR instance is not resent by the next attempt (which
    # resends the one that failed for a transient reason), and the task fails as soon as nothing
    # else is left, naming it and why. Once the peer takes MR, a manual retry delivers it.
    files = [*make_series(tmp_path / "series", 2), Path(str(get_testdata_file("MR_small.dcm")))]
    manifest, key = await stage_files(blob_store, files)
    fine, busy, mr = (i.sop_uid for i in manifest.instances)
    scripted_scp.script = {busy: [0xA700]}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 5},
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    why = f"SOP class 'MR Image Storage' not accepted by SCRIPTED@127.0.0.1:{scripted_scp.port} " \
          "(abstract syntax not supported)"
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        task_id = request.task_id or ""
        [failed] = await wait_events(bus, "dispatch.failed", task_id, timeout=20)
        attempts = await events_of(bus, "dispatch.attempt_failed", task_id)
        assert [(e.payload["attempt"], e.payload["sent"], e.payload["failed"], e.payload["not_resent"])
                for e in attempts] == [(1, 1, 2, 0), (2, 1, 1, 1)], [e.payload for e in attempts]
        outcomes = {o["sop_uid"]: o for o in attempts[0].payload["outcomes"]}
        assert {uid: (o["status"], o["final"]) for uid, o in outcomes.items()} == \
            {mr: (None, True), busy: (0xA700, False)}
        assert outcomes[mr]["reason"] == why
        assert failed.payload["attempts"] == 2 and failed.payload["failed_sop_uids"] == [mr]
        assert failed.payload["refused"] == [{"sop_uid": mr, "status": None, "reason": why, "final": True}]
        assert why in failed.payload["error"] and "cannot change" in failed.payload["error"]
        [alert] = await events_of(bus, "alert.raised", task_id)
        assert alert.payload["severity"] == "error"
        assert mr in alert.payload["message"] and why in alert.payload["message"]
        assert sorted(scripted_scp.received) == sorted([fine, busy, busy])

        # The PACS is configured for MR: a manual retry resends the refused instance.
        more = AE()
        more.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        scripted_scp.server.contexts.extend(more.supported_contexts)
        result = await asyncio.to_thread(run_cli, nats_url, "retry", task_id)
        assert result.returncode == 0, result.stderr
        [completed] = await wait_events(bus, "dispatch.completed", task_id, timeout=20)
    assert completed.payload["sent"] == 1 and completed.payload["skipped_already_sent"] == 2
    assert sorted(scripted_scp.received) == sorted([fine, busy, busy, mr])
