"""Dispatcher end to end against real peers: DCMTK storescp and Orthanc."""

from __future__ import annotations

import asyncio
import getpass
import signal
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom.dsutils import split_dataset

from bench.common import stage_files
from services.dispatcher import handlers
from services.dispatcher.progress import ProgressStore
from services.dispatcher.service import DispatcherService
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from tests.peers import Orthanc, StoreScp, clone_instances, make_series, make_tls_files

from .conftest import (
    FAST_RETRIES,
    apply_config,
    apply_pacs_config,
    dicom_target,
    dispatcher_settings,
    events_of,
    request_dispatch,
    run_cli,
    running_dispatcher,
    start_dispatcher_process,
    wait_events,
)


async def test_delivers_series_to_storescp_and_orthanc(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                       blob_store: LocalBlobStore, storescp: StoreScp,
                                                       orthanc: Orthanc) -> None:
    files = make_series(tmp_path / "series", 8)
    manifest, key = await stage_files(blob_store, files)
    await apply_config(bus, {"settings": FAST_RETRIES, "targets": {
        "dcmtk": dicom_target(storescp.port, storescp.aet),
        "orthanc": dicom_target(orthanc.dicom_port, orthanc.aet, parallel_associations=2)}})
    async with running_dispatcher(nats_url, data_dir):
        to_dcmtk = await request_dispatch(bus, manifest, key, "dcmtk")
        to_orthanc = await request_dispatch(bus, manifest, key, "orthanc", priority="urgent")
        done = await wait_events(bus, "dispatch.completed", count=2)
    by_task = {e.payload["task_id"]: e for e in done}
    for request in (to_dcmtk, to_orthanc):
        completed = by_task[request.task_id or ""]
        assert completed.payload["sent"] == 8 and completed.payload["skipped_already_sent"] == 0
        assert completed.series_uid == manifest.series_uids[0]
        assert completed.causation_id == request.event_id
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    # storescp wrote the data sets bit-preserved: same UIDs, same pixel bytes.
    received = storescp.datasets()
    assert set(received) == set(originals)
    for uid, ds in received.items():
        assert ds.PixelData == originals[uid].PixelData
        assert ds.file_meta.TransferSyntaxUID == originals[uid].file_meta.TransferSyntaxUID
    assert orthanc.sop_uids() == set(originals)
    for uid, orthanc_id in orthanc.instances_by_sop().items():
        assert dcmread(BytesIO(orthanc.file(orthanc_id))).PixelData == originals[uid].PixelData
    assert await events_of(bus, "dispatch.attempt_failed") == []


async def test_target_down_fails_after_attempts_then_cli_retry_delivers(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(start=False)  # a port nobody listens on yet
    files = make_series(tmp_path / "series", 5)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, peer.port, peer.aet)
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        task_id = request.task_id or ""
        failed = await wait_events(bus, "dispatch.failed", task_id)
        attempts = await events_of(bus, "dispatch.attempt_failed", task_id)
        assert [e.payload["attempt"] for e in attempts] == [1, 2, 3]
        assert [e.payload["retry_in_seconds"] for e in attempts] == [0.2, 0.4, 0.0]
        assert all("could not connect" in e.payload["error"] for e in attempts)
        assert failed[0].payload["attempts"] == 3
        assert sorted(failed[0].payload["failed_sop_uids"]) == sorted(i.sop_uid for i in manifest.instances)
        alerts = await events_of(bus, "alert.raised", task_id)
        assert [a.payload["severity"] for a in alerts] == ["error"]
        assert alerts[0].series_uid == manifest.series_uids[0]
        # The files stay in the blob store: the error state is in the events.
        assert all([await blob_store.exists(i.blob_key) for i in manifest.instances])

        peer.start()
        result = await asyncio.to_thread(run_cli, nats_url, "retry", "--series", manifest.series_uids[0],
                                         "--comment", "PACS is back")
        assert result.returncode == 0, result.stderr
        assert task_id in result.stdout
        completed = await wait_events(bus, "dispatch.completed", task_id)
    retry = (await events_of(bus, "dispatch.retry_requested", task_id))[0]
    assert retry.actor == f"user:{getpass.getuser()}" and retry.payload["reason"] == "PACS is back"
    assert completed[0].payload["sent"] == 5 and completed[0].payload["attempt"] == 1
    started = await events_of(bus, "dispatch.started", task_id)
    assert [e.payload["attempt"] for e in started] == [1, 2, 3, 1]
    assert {e.payload["instance"] for e in started} == {started[0].payload["instance"]}
    assert completed[0].causation_id == retry.event_id
    assert peer.sop_uids() == {i.sop_uid for i in manifest.instances}
    # A completed task is not retried again.
    again = await asyncio.to_thread(run_cli, nats_url, "retry", task_id)
    assert again.returncode == 1 and "already completed" in again.stderr


async def test_kill_9_mid_send_second_dispatcher_resumes(tmp_path: Path, bus: Bus, nats_url: str,
                                                         data_dir: Path, blob_store: LocalBlobStore,
                                                         storescp: StoreScp) -> None:
    # Enough data that the fast sender is still busy when the first progress flush (0.5 s) lands.
    count = 1500
    template = make_series(tmp_path / "template", 1, size=128)[0]
    files = clone_instances(template, tmp_path / "series", count)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    first = start_dispatcher_process(nats_url, data_dir, tmp_path / "dispatcher-1.log",
                                     CADUCEUS_DISPATCH_ACK_WAIT_SECONDS="3")
    try:
        request = await request_dispatch(bus, manifest, key, "pacs")
        task_id = request.task_id or ""
        progress = await ProgressStore.open(bus.js)
        deadline = time.monotonic() + 60
        while True:  # kill once the progress record shows confirmed instances
            record = await progress.get(task_id)
            if record and record.delivered_set().count() >= 20:
                break
            assert time.monotonic() < deadline, "first dispatcher never recorded progress"
            assert first.poll() is None, (tmp_path / "dispatcher-1.log").read_text()[-3000:]
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    delivered_before = record.delivered_set().count()
    assert delivered_before < count, "the first dispatcher finished before it was killed: test proves nothing"
    assert await events_of(bus, "dispatch.completed", task_id) == []
    async with running_dispatcher(nats_url, data_dir, dispatch_ack_wait_seconds=3):
        completed = (await wait_events(bus, "dispatch.completed", task_id, timeout=60))[0]
    assert completed.payload["skipped_already_sent"] >= delivered_before
    assert completed.payload["sent"] + completed.payload["skipped_already_sent"] == count
    assert completed.payload["sent"] < count
    assert storescp.sop_uids() == {i.sop_uid for i in manifest.instances}
    # The history shows both sends of attempt 1: the one cut off and the one that resumed it.
    started = await events_of(bus, "dispatch.started", task_id)
    assert [(e.payload["attempt"], e.payload["delivery"]) for e in started] == [(1, 1), (1, 2)]
    assert started[0].payload["to_send"] == count and started[0].payload["already_sent"] == 0
    assert started[1].payload["already_sent"] == completed.payload["skipped_already_sent"]
    assert started[0].payload["instance"] != started[1].payload["instance"]
    assert {e.payload["destination"] for e in started} == {f"{storescp.aet}@127.0.0.1:{storescp.port}"}


async def test_a_target_repointed_at_another_peer_gets_the_whole_task(tmp_path: Path, bus: Bus, nats_url: str,
                                                                        data_dir: Path, blob_store: LocalBlobStore,
                                                                        storescp: StoreScp) -> None:
    # Four of five instances were confirmed by the peer the target named before (an old archive);
    # after `config apply` repoints it, a retry must not count them as delivered to the new one.
    files = make_series(tmp_path / "series", 5)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    request = await request_dispatch(bus, manifest, key, "pacs")
    task_id = request.task_id or ""
    progress = await ProgressStore.open(bus.js)
    await progress.ensure(request)
    await progress.deliver_to(task_id, "OLDPACS@127.0.0.1:1")
    await progress.add_delivered(task_id, [1, 2, 3, 4], warnings=0)
    async with running_dispatcher(nats_url, data_dir):
        completed = (await wait_events(bus, "dispatch.completed", task_id))[0]
    assert completed.payload["sent"] == 5 and completed.payload["skipped_already_sent"] == 0
    assert storescp.sop_uids() == {i.sop_uid for i in manifest.instances}
    record = await progress.get(task_id)
    assert record is not None and record.delivered_to == f"{storescp.aet}@127.0.0.1:{storescp.port}"


async def test_an_instance_replaced_after_routing_is_not_sent_as_routed(tmp_path: Path, bus: Bus, nats_url: str,
                                                                        data_dir: Path, blob_store: LocalBlobStore,
                                                                        storescp: StoreScp) -> None:
    # A sender re-sent one instance with other content while the task waited: its blob now holds
    # bytes this task's rule never matched (another rule may send them elsewhere). They stay home.
    files = make_series(tmp_path / "series", 5)
    manifest, key = await stage_files(blob_store, files)
    changed = manifest.instances[2]
    other = make_series(tmp_path / "other", 1)[0].read_bytes()
    await blob_store.put(changed.blob_key, other)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    request = await request_dispatch(bus, manifest, key, "pacs")
    task_id = request.task_id or ""
    async with running_dispatcher(nats_url, data_dir):
        completed = (await wait_events(bus, "dispatch.completed", task_id))[0]
    assert completed.payload["changed_since_routed"] == [changed.sop_uid] and completed.payload["sent"] == 4
    assert storescp.sop_uids() == {i.sop_uid for i in manifest.instances} - {changed.sop_uid}
    [alert] = await events_of(bus, "alert.raised", task_id)
    assert alert.payload["severity"] == "warning" and "re-sent with other content" in alert.payload["message"]


async def test_an_instance_replaced_while_its_task_sends_is_not_sent_as_routed(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore, storescp: StoreScp,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The check that the files still hold the routed copies runs before the first instance goes
    # out; a large series then takes minutes to send. A re-send that replaces a file meanwhile
    # must not go out under this task's decision either.
    files = make_series(tmp_path / "series", 5)
    manifest, key = await stage_files(blob_store, files)
    changed = manifest.instances[3]
    other = make_series(tmp_path / "other", 1)[0].read_bytes()
    check = handlers._check_routed

    def check_then_replaced(*args: Any) -> Any:
        outcome = check(*args)
        blob_store.put_sync(changed.blob_key, other)  # the re-send lands right after the check
        return outcome

    monkeypatch.setattr(handlers, check.__name__, check_then_replaced)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    request = await request_dispatch(bus, manifest, key, "pacs")
    task_id = request.task_id or ""
    async with running_dispatcher(nats_url, data_dir):
        completed = (await wait_events(bus, "dispatch.completed", task_id))[0]
    assert storescp.sop_uids() == {i.sop_uid for i in manifest.instances} - {changed.sop_uid}
    assert completed.payload["changed_since_routed"] == [changed.sop_uid] and completed.payload["sent"] == 4


COMPRESSED_AND_OTHER_SYNTAXES = ["JPEG2000.dcm", "SC_rgb_rle_32bit.dcm", "JPEG-lossy.dcm", "rtplan.dcm",
                                 "SC_rgb_small_odd_big_endian.dcm"]
# Deflated, but its deflate stream has an odd length (PS3.5 A.5 wants it padded): sent as stored,
# DCMTK aborts the association ("Odd Fragment Length"). It must not keep the others from going out.
NONCONFORMANT = "image_dfl.dcm"


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta header: what goes on the wire when nothing is transcoded."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


async def test_files_go_out_in_their_own_transfer_syntax_without_transcoding(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp: StoreScp) -> None:
    files = [Path(str(get_testdata_file(name))) for name in COMPRESSED_AND_OTHER_SYNTAXES]
    bad = Path(str(get_testdata_file(NONCONFORMANT)))
    # The bad file in the middle: the instances after it go out on a fresh association.
    manifest, key = await stage_files(blob_store, files[:2] + [bad] + files[2:])
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        failed = await wait_events(bus, "dispatch.failed", request.task_id)
    attempts = await events_of(bus, "dispatch.attempt_failed", request.task_id)
    assert [a.payload["sent"] for a in attempts] == [len(files), 0, 0]  # later attempts resend only the bad one
    assert failed[0].payload["failed_sop_uids"] == [str(dcmread(bad, stop_before_pixels=True).SOPInstanceUID)]
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in storescp.files()}
    assert len(received) == len(files)
    for source in files:
        ds = dcmread(source, stop_before_pixels=True)
        copy = received[str(ds.SOPInstanceUID)]
        assert dcmread(copy, stop_before_pixels=True).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert _dataset_bytes(copy) == _dataset_bytes(source), source.name


async def test_peer_taking_only_the_default_syntax_gets_reencoded_copies(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(extra_args=["+xi"])  # Implicit VR Little Endian only, like many old PACS
    files = make_series(tmp_path / "series", 5)  # Explicit VR Little Endian
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, peer.port, peer.aet)
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        [completed] = await wait_events(bus, "dispatch.completed", request.task_id)
    assert (completed.payload["sent"], completed.payload["reencoded"]) == (5, 5)
    originals = {str(dcmread(f).SOPInstanceUID): dcmread(f) for f in files}
    received = peer.datasets()
    assert set(received) == set(originals)
    for uid, ds in received.items():
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert ds.PixelData == originals[uid].PixelData and ds.PatientName == originals[uid].PatientName


async def test_a_refused_syntax_alert_says_what_to_change(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp_factory: Callable[..., StoreScp]) -> None:
    # Proposed alone and refused as "transfer syntax not supported": refused for good, so the task
    # fails after its first attempt, and the alert says what to change.
    peer = storescp_factory(extra_args=["+xi"])  # no JPEG 2000
    manifest, key = await stage_files(blob_store, [Path(str(get_testdata_file("JPEG2000.dcm")))])
    await apply_pacs_config(bus, peer.port, peer.aet)
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        [failed] = await wait_events(bus, "dispatch.failed", request.task_id)
        [alert] = await wait_events(bus, "alert.raised", request.task_id)
    assert failed.payload["attempts"] == 1
    message = alert.payload["message"]
    assert "'Secondary Capture Image Storage' in 'JPEG 2000 Image Compression' not accepted by" in message
    assert manifest.instances[0].sop_uid in message
    assert "correct what the destination accepts from us (it does not accept these SOP classes / transfer " \
           f"syntaxes), then `caduceus retry {request.task_id}`" in message, message


async def test_a_task_published_while_a_dispatcher_stops_is_not_held_for_the_ack_wait(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp: StoreScp) -> None:
    """A dispatcher that cancelled its polls at shutdown left their pull requests open at the
    server: a task reaching one waited the whole ack wait (60 s) before the next dispatcher got it."""
    manifest, key = await stage_files(blob_store, make_series(tmp_path / "series", 2))
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    service = DispatcherService(dispatcher_settings(nats_url, data_dir, dispatch_ack_wait_seconds=60))
    first = asyncio.create_task(service.run())
    await asyncio.sleep(1.5)  # started, polls waiting at the server
    service.request_stop("test: stop")
    requests = []
    for _ in range(12):  # while the shutdown is under way, its polls' requests open for up to a second
        requests.append(await request_dispatch(bus, manifest, key, "pacs"))
        await asyncio.sleep(0.1)
    await asyncio.wait_for(first, 30)
    async with running_dispatcher(nats_url, data_dir, dispatch_ack_wait_seconds=60):
        for request in requests:
            await wait_events(bus, "dispatch.completed", request.task_id, timeout=20)


async def test_tls_target_with_client_certificate(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path,
                                                  blob_store: LocalBlobStore,
                                                  storescp_factory: Callable[..., StoreScp]) -> None:
    tls = make_tls_files(tmp_path / "tls")
    peer = storescp_factory(extra_args=StoreScp.tls_args(tls))
    files = make_series(tmp_path / "series", 3)
    manifest, key = await stage_files(blob_store, files)
    target_tls = {"ca": str(tls.ca), "certificate": str(tls.client_cert), "key": str(tls.client_key)}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1}, "targets": {
        "secure": dicom_target(peer.port, peer.aet, tls=target_tls),
        "no-client-cert": dicom_target(peer.port, peer.aet, tls={"ca": str(tls.ca)}),
        "plain": dicom_target(peer.port, peer.aet)}})
    async with running_dispatcher(nats_url, data_dir):
        secure = await request_dispatch(bus, manifest, key, "secure")
        await wait_events(bus, "dispatch.completed", secure.task_id)
        for target in ("no-client-cert", "plain"):  # the peer refuses both
            refused = await request_dispatch(bus, manifest, key, target)
            await wait_events(bus, "dispatch.failed", refused.task_id)
    assert peer.sop_uids() == {i.sop_uid for i in manifest.instances}


async def test_tls_setup_mistakes_are_named_in_the_task_error(tmp_path: Path, bus: Bus, nats_url: str,
                                                               data_dir: Path, blob_store: LocalBlobStore,
                                                               storescp_factory: Callable[..., StoreScp]) -> None:
    # The common ways a TLS target is set up wrong; each used to read "could not connect ... (it
    # accepted a connection on a second try)" or "association aborted", the cause only in a traceback.
    tls, other = make_tls_files(tmp_path / "tls"), make_tls_files(tmp_path / "other-ca")
    secure = storescp_factory(extra_args=StoreScp.tls_args(tls))
    plain = storescp_factory()
    files = make_series(tmp_path / "series", 1)
    manifest, key = await stage_files(blob_store, files)
    client = {"certificate": str(tls.client_cert), "key": str(tls.client_key)}
    targets = {
        "untrusted": dicom_target(secure.port, secure.aet, tls={**client, "ca": str(other.ca)}),
        "not-tls": dicom_target(plain.port, plain.aet, tls={**client, "ca": str(tls.ca)}),
        "no-client-cert": dicom_target(secure.port, secure.aet, tls={"ca": str(tls.ca)}),
        "missing-ca": dicom_target(secure.port, secure.aet, tls={**client, "ca": str(tmp_path / "gone.pem")}),
    }
    expected = {"untrusted": "TLS: the peer's certificate is not accepted (",
                "not-tls": "TLS handshake failed:", "no-client-cert": "CERTIFICATE_REQUIRED",
                "missing-ca": f"TLS ca {tmp_path / 'gone.pem'}: No such file or directory"}
    await apply_config(bus, {"settings": {**FAST_RETRIES, "dispatch_retries": 1}, "targets": targets})
    async with running_dispatcher(nats_url, data_dir):
        for target, words in expected.items():
            request = await request_dispatch(bus, manifest, key, target)
            [failed] = await wait_events(bus, "dispatch.failed", request.task_id)
            assert words in failed.payload["error"], (target, failed.payload["error"])


async def test_retry_of_a_waiting_task_resets_its_attempts(tmp_path: Path, bus: Bus, nats_url: str,
                                                           data_dir: Path, blob_store: LocalBlobStore,
                                                           storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(start=False)
    files = make_series(tmp_path / "series", 2)
    manifest, key = await stage_files(blob_store, files)
    # The wait must outlast starting the CLI and its stream scan on a loaded machine, or the second
    # (last) attempt fails the task before the retry request arrives.
    await apply_config(bus, {"settings": {"dispatch_retries": 2, "dispatch_retry_wait_seconds": 8},
                             "targets": {"pacs": dicom_target(peer.port, peer.aet)}})
    unknown = await asyncio.to_thread(run_cli, nats_url, "retry", "no-such-task")
    assert unknown.returncode == 1 and "no dispatch task no-such-task" in unknown.stderr
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "pacs")
        task_id = request.task_id or ""
        await wait_events(bus, "dispatch.attempt_failed", task_id)
        result = await asyncio.to_thread(run_cli, nats_url, "retry", task_id)
        assert result.returncode == 0 and "was retrying" in result.stdout, result
        progress = await ProgressStore.open(bus.js)
        deadline = time.monotonic() + 10
        while (record := await progress.get(task_id)) is None or record.generation == 0:
            assert time.monotonic() < deadline, "the dispatcher did not take the retry"
            await asyncio.sleep(0.05)
        assert record.attempts == 0 and record.state == "pending"
        peer.start()
        completed = (await wait_events(bus, "dispatch.completed", task_id))[0]
    # The original message carried on, counting from 1 again after the reset: attempt numbers are
    # [1] before, then [1] more if the target was still down at the next try (without the reset
    # that would have been attempt 2 of 2, the last one, and the task would have failed).
    failed_attempts = [e.payload["attempt"] for e in await events_of(bus, "dispatch.attempt_failed", task_id)]
    assert failed_attempts in ([1], [1, 1])
    assert completed.payload["attempt"] == len(failed_attempts)
    assert await events_of(bus, "dispatch.failed", task_id) == []
    assert peer.sop_uids() == {i.sop_uid for i in manifest.instances}


async def test_retry_before_any_dispatcher_saw_the_task_runs_it_once(
        tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path, blob_store: LocalBlobStore,
        storescp: StoreScp) -> None:
    files = make_series(tmp_path / "series", 2)
    manifest, key = await stage_files(blob_store, files)
    await apply_pacs_config(bus, storescp.port, storescp.aet)
    request = await request_dispatch(bus, manifest, key, "pacs", priority="urgent")
    result = await asyncio.to_thread(run_cli, nats_url, "retry", request.task_id or "")
    assert result.returncode == 0 and "was queued" in result.stdout
    # Normal work (where retries are) pulled first: the retry finds no progress record, looks the
    # request up in the EVENTS stream and runs it; the request itself is then acknowledged.
    async with running_dispatcher(nats_url, data_dir, dispatch_concurrency=1, dispatch_normal_every=1):
        completed = await wait_events(bus, "dispatch.completed", request.task_id)
        retry = (await events_of(bus, "dispatch.retry_requested", request.task_id))[0]
        deadline = time.monotonic() + 10
        while (await bus.js.consumer_info("EVENTS", "dispatcher-urgent")).num_ack_pending or \
                (await bus.js.consumer_info("EVENTS", "dispatcher-urgent")).num_pending:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert completed[0].causation_id == retry.event_id
    assert len(await events_of(bus, "dispatch.completed", request.task_id)) == 1
    assert storescp.sop_uids() == {i.sop_uid for i in manifest.instances}


async def test_process_stops_cleanly_on_sigterm(tmp_path: Path, bus: Bus, nats_url: str, data_dir: Path) -> None:
    process = start_dispatcher_process(nats_url, data_dir, tmp_path / "dispatcher.log")
    try:
        started = await wait_events(bus, "service.started", timeout=30)
        assert started[0].payload["service"] == "dispatcher"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stopped = await wait_events(bus, "service.stopped")
    assert stopped[0].payload["instance"] == started[0].payload["instance"]
