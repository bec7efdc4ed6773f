"""The receiver as a process, driven by DCMTK and pynetdicom senders, checked via blobs and events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import struct
from pathlib import Path

import psutil
import pydicom
import pytest
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)
from pynetdicom import AE, _config

from bench.common import Peer, echoscu, make_series, start_receiver, storescu
from services.receiver.applier import JournalApplier
from services.receiver.journal import Journal, slot_directory
from services.receiver.tests.helpers import apply_settings, blob_files, read_events, wait_events
from shared.blobstore import receipt_stamp
from shared.bus import Bus
from shared.events import make_event
from shared.natsserver import EmbeddedNats
from tests.harness import storescu_background, wait_for
from tests.peers import associate_rq, pdu_item

OUT_OF_RESOURCES = re.compile(r"(?i)out ?of ?resources|a700")


def _uids(path: Path) -> tuple[str, bytes]:
    ds = pydicom.dcmread(path)
    return str(ds.SOPInstanceUID), bytes(ds.PixelData)


async def test_store_series_blobs_and_events(receiver: Peer, bus: Bus, series5: Path, data_dir: Path) -> None:
    result = await asyncio.to_thread(storescu, receiver.port, series5)
    assert result.returncode == 0, result.output
    received = await wait_events(bus, "image.received", 5)
    assert len(received) == 5
    sent = {uid: pixels for uid, pixels in map(_uids, series5.iterdir())}
    stored = {uid: pixels for uid, pixels in map(_uids, blob_files(data_dir))}
    assert stored == sent  # same instances, same pixel data
    for event in received:
        payload = event.payload
        assert event.sop_uid in sent and event.study_uid and event.series_uid
        assert event.correlation_id is None
        assert payload["duplicate"] == "new" and payload["calling_aet"] == "BENCH"
        assert payload["tags"]["Modality"] == "CT" and payload["tags"]["SOPInstanceUID"] == event.sop_uid
        blob = data_dir / "blobs" / payload["blob_key"]
        assert blob.stat().st_size == payload["size"]
        # Stamped with its copy's receipt time (before its event went out).
        assert blob.stat().st_mtime_ns == receipt_stamp(event.occurred_at)
        assert blob.read_bytes()[128:132] == b"DICM"
    accepted = await read_events(bus, "association.accepted")
    ended = await wait_events(bus, "association.ended", 1)
    assert len(accepted) == 1
    assert ended[0].payload["instances_stored"] == 5 and ended[0].payload["how"] == "released"
    assert ended[0].payload["association_id"] == received[0].payload["association_id"]


async def test_duplicates_identical_and_replaced(receiver: Peer, bus: Bus, series5: Path, tmp_path: Path,
                                                 data_dir: Path) -> None:
    one = sorted(series5.iterdir())[0]
    assert (await asyncio.to_thread(storescu, receiver.port, one)).returncode == 0
    assert (await asyncio.to_thread(storescu, receiver.port, one)).returncode == 0
    changed = pydicom.dcmread(one)
    changed.SeriesDescription = "changed"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert (await asyncio.to_thread(storescu, receiver.port, changed_path)).returncode == 0
    events = await wait_events(bus, "image.received", 3)
    assert [e.payload["duplicate"] for e in events] == ["new", "identical", "replaced"]
    (blob,) = blob_files(data_dir)
    assert pydicom.dcmread(blob).SeriesDescription == "changed"


async def test_echo(receiver: Peer) -> None:
    result = await asyncio.to_thread(echoscu, receiver.port)
    assert result.returncode == 0, result.output


async def test_called_aet_required(receiver: Peer, bus: Bus, series5: Path) -> None:
    await apply_settings(bus, require_called_aet=True, ae_title="CADUCEUS")
    wrong = await asyncio.to_thread(storescu, receiver.port, series5, called_aet="SOMEONE")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.output, wrong.output
    right = await asyncio.to_thread(storescu, receiver.port, series5, called_aet="CADUCEUS")
    assert right.returncode == 0, right.output
    rejected = await wait_events(bus, "association.rejected", 1)
    assert rejected[0].payload["called_aet"] == "SOMEONE"


async def test_calling_aet_allow_list_live(receiver: Peer, bus: Bus, series5: Path) -> None:
    assert (await asyncio.to_thread(storescu, receiver.port, series5, calling_aet="ANYONE")).returncode == 0
    await apply_settings(bus, allowed_calling_aets=["GOOD"])
    bad = await asyncio.to_thread(storescu, receiver.port, series5, calling_aet="ANYONE")
    assert bad.returncode != 0 and "Calling AE Title Not Recognized" in bad.output, bad.output
    good = await asyncio.to_thread(storescu, receiver.port, series5, calling_aet="GOOD")
    assert good.returncode == 0, good.output
    await apply_settings(bus, allowed_hosts=["10.0.0.0/8"])
    host = await asyncio.to_thread(storescu, receiver.port, series5, calling_aet="ANYONE")
    assert host.returncode != 0
    reasons = [e.payload["reason"] for e in await wait_events(bus, "association.rejected", 2)]
    assert any("allowed_calling_aets" in r for r in reasons) and any("allowed_hosts" in r for r in reasons)


async def test_free_space_floor_answers_out_of_resources(receiver: Peer, bus: Bus, series5: Path,
                                                          data_dir: Path) -> None:
    await apply_settings(bus, min_free_space_mb=10**9)
    result = await asyncio.to_thread(storescu, receiver.port, sorted(series5.iterdir())[0], extra=["-v"])
    assert result.returncode != 0 and OUT_OF_RESOURCES.search(result.output), result.output
    assert blob_files(data_dir) == []
    rejected = await wait_events(bus, "image.rejected", 1)
    assert rejected[0].payload["status"] == 0xA700 and "free space" in rejected[0].payload["reason"]
    assert await read_events(bus, "image.received") == []


def _send_raw_files(port: int, paths: list[Path]) -> list[int]:
    """pynetdicom SCU sending files as they are (chunked: the dataset bytes are not decoded)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(p).Status) for p in paths]
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def _with_body(template: Path, body: bytes, out: Path) -> Path:
    """A file with the template's preamble and file meta and `body` as the dataset."""
    raw = template.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")  # group length element + group
    out.write_bytes(raw[:meta_end] + body)
    return out


async def test_garbage_and_truncated_are_quarantined(receiver: Peer, bus: Bus, series5: Path, tmp_path: Path,
                                                     data_dir: Path) -> None:
    template = sorted(series5.iterdir())[0]
    raw = template.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    garbage = _with_body(template, os.urandom(3000), tmp_path / "garbage.dcm")
    truncated = _with_body(template, raw[meta_end:len(raw) - 1000], tmp_path / "truncated.dcm")
    statuses = await asyncio.to_thread(_send_raw_files, receiver.port, [garbage, truncated])
    assert statuses == [0xC000, 0xC000]
    quarantined = await wait_events(bus, "image.quarantined", 2)
    assert len(quarantined) == 2
    assert "truncated" in quarantined[1].payload["reason"]
    kept = blob_files(data_dir, "quarantine")
    assert len(kept) == 2
    assert {p.stat().st_size for p in kept} == {q.payload["size"] for q in quarantined}
    assert blob_files(data_dir) == []


async def test_a_request_full_of_unknown_transfer_syntaxes_does_not_flood_the_log(receiver: Peer) -> None:
    # 300 presentation contexts of 50 UIDs each that are no transfer syntax: pynetdicom warns once
    # per UID (twice, in fact), so one 60 KB A-ASSOCIATE-RQ wrote 28,200 log lines (6.9 MB).
    contexts = b"".join(
        pdu_item(0x20, bytes([(2 * i + 1) & 0xFF, 0, 0, 0]) + pdu_item(0x30, CTImageStorage.encode())
                 + b"".join(pdu_item(0x40, b"1.2.840.10008.1.2.%d" % j) for j in range(50)))
        for i in range(300))
    request = associate_rq(contexts=contexts)
    assert receiver.log_path is not None
    before = receiver.log_path.stat().st_size
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(10)
        assert sock.recv(1)[:1] in (b"\x02", b"\x03")  # accepted or rejected: an answer either way
    assert (await asyncio.to_thread(echoscu, receiver.port)).returncode == 0
    assert receiver.log_path.stat().st_size - before < 64 * 1024


@pytest.mark.parametrize("pdu_type", [0x01, 0x04], ids=["a-associate-rq", "p-data-before-association"])
async def test_a_huge_pdu_outside_data_transfer_is_refused_before_its_body_is_read(receiver: Peer,
                                                                                  pdu_type: int) -> None:
    # An unknown peer announces a 64 MB A-ASSOCIATE-RQ (or P-DATA-TF before any association) and
    # sends it: pynetdicom read it whole and copied it twice (200 MB cost 600-900 MB of RSS).
    assert receiver.process is not None
    process = psutil.Process(receiver.process.pid)
    before = sum(p.memory_info().rss for p in [process, *process.children()])

    def attack() -> bytes:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as sock:
            sock.sendall(struct.pack(">BBI", pdu_type, 0, 64 << 20))
            sock.settimeout(1)
            with contextlib.suppress(OSError):  # refused: the receiver stops reading (or closes)
                for _ in range(8):
                    sock.sendall(b"\x10\x00" * (1 << 19))
            sock.settimeout(3)
            try:
                return sock.recv(10)
            except TimeoutError:
                return b"(no answer: still reading)"

    answer = await asyncio.to_thread(attack)
    assert answer[:1] == b"\x07" or answer == b"", answer  # A-ABORT, or closed
    after = sum(p.memory_info().rss for p in [process, *process.children()])
    assert after - before < 32 << 20, f"{(after - before) >> 20} MB more"
    assert (await asyncio.to_thread(echoscu, receiver.port)).returncode == 0


def _send_ct_datasets(port: int, datasets: list[Dataset]) -> list[int]:
    """pynetdicom SCU encoding each data set as it is (group 0002 elements included)."""
    ae = AE(ae_title="RAWSCU")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


async def test_file_meta_elements_inside_the_data_set_are_dropped(receiver: Peer, bus: Bus, series5: Path,
                                                                  data_dir: Path) -> None:
    # The sender's data set starts with group 0002 elements (File Meta, not allowed in a data set):
    # behind the receiver's own File Meta they read as part of it, so the stored file and its event
    # claimed JPEG Baseline for the uncompressed explicit VR data negotiated, and another SOP
    # Instance UID in its File Meta. Like storescp and Orthanc, the receiver drops them.
    good = pydicom.dcmread(sorted(series5.iterdir())[0])
    lying = pydicom.dcmread(sorted(series5.iterdir())[1])
    lying.add_new(0x00020003, "UI", "1.2.3")
    lying.add_new(0x00020010, "UI", JPEGBaseline8Bit)
    lying.add_new(0x00020001, "OB", b"\x00\x01")
    statuses = await asyncio.to_thread(_send_ct_datasets, receiver.port, [lying, good])
    assert statuses == [0x0000, 0x0000]
    received = await wait_events(bus, "image.received", 2)
    assert {e.payload["transfer_syntax_uid"] for e in received} == {good.file_meta.TransferSyntaxUID}
    stored = {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, blob_files(data_dir))}
    assert set(stored) == {str(good.SOPInstanceUID), str(lying.SOPInstanceUID)}
    kept = stored[str(lying.SOPInstanceUID)]
    assert kept.file_meta.MediaStorageSOPInstanceUID == lying.SOPInstanceUID
    assert kept.file_meta.TransferSyntaxUID == good.file_meta.TransferSyntaxUID
    assert not [tag for tag in kept.keys() if tag.group == 0x0002]
    assert kept.PixelData == lying.PixelData


@pytest.mark.parametrize("journal_max_kb", ["0", "1"], ids=["event-acknowledged", "event-journaled"])
async def test_direct_path_stores_from_a_staged_temp_file_and_leaves_none(
        nats_url: str, bus: Bus, data_dir: Path, series5: Path, tmp_path: Path, journal_max_kb: str) -> None:
    # Instances above receiver_journal_max_kb (here: all) go to a temp file before their tags are
    # read; placed under their key, or removed for a duplicate or quarantine. Their events wait for
    # JetStream's ack (journal off) or go into the journal (F records).
    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                              env={"CADUCEUS_RECEIVER_JOURNAL_MAX_KB": journal_max_kb})
    try:
        first = sorted(series5.iterdir())[0]
        changed = pydicom.dcmread(first)
        changed.SeriesDescription = "changed"
        changed.save_as(tmp_path / "changed.dcm")
        raw = first.read_bytes()
        meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
        truncated = _with_body(first, raw[meta_end:len(raw) - 1000], tmp_path / "truncated.dcm")
        paths = [*sorted(series5.iterdir()), first, tmp_path / "changed.dcm", truncated]
        statuses = await asyncio.to_thread(_send_raw_files, receiver.port, paths)
        assert statuses == [0] * 7 + [0xC000]
        events = await wait_events(bus, "image.received", 7)
        assert [e.payload["duplicate"] for e in events] == ["new"] * 5 + ["identical", "replaced"]
        stored = {uid: pixels for uid, pixels in map(_uids, blob_files(data_dir))}
        assert stored == dict(map(_uids, series5.iterdir()))
        assert len(blob_files(data_dir, "quarantine")) == 1
        assert list((data_dir / "blobs" / ".tmp").iterdir()) == []
    finally:
        receiver.stop()


async def test_nats_down_is_not_success_without_the_journal(nats_url: str, data_dir: Path, bus: Bus,
                                                             nats_server: EmbeddedNats, series5: Path,
                                                             tmp_path: Path) -> None:
    # Instances above receiver_journal_max_kb (here: all) are accepted only once JetStream stored
    # their event.
    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log",
                              env={"CADUCEUS_RECEIVER_PUBLISH_TIMEOUT": "1.5", "CADUCEUS_RECEIVER_JOURNAL_MAX_KB": "0"})
    try:
        nats_server.stop()
        result = await asyncio.to_thread(storescu, receiver.port, sorted(series5.iterdir())[0], extra=["-v"])
        assert result.returncode != 0 and OUT_OF_RESOURCES.search(result.output), result.output
        assert "Received Store Response (Success)" not in result.output
    finally:
        receiver.kill()  # its graceful stop would wait for the missing broker


async def test_nats_down_journaled_instances_are_published_when_it_returns(
        receiver: Peer, bus: Bus, nats_server: EmbeddedNats, series5: Path, data_dir: Path) -> None:
    nats_server.stop()
    result = await asyncio.to_thread(storescu, receiver.port, series5)
    assert result.returncode == 0, result.output  # accepted: durable in the receiver's journal
    nats_server.start()
    received = await wait_events(bus, "image.received", 5, timeout=40)
    assert sorted(e.sop_uid or "" for e in received) == sorted(_uids(p)[0] for p in series5.iterdir())
    assert len(blob_files(data_dir)) == 5


@pytest.mark.parametrize("journal_max_kb", ["256", "1"], ids=["journaled-data", "own-file-journaled-event"])
async def test_journaled_instances_survive_kill_9(nats_url: str, bus: Bus, nats_server: EmbeddedNats,
                                                  series5: Path, data_dir: Path, tmp_path: Path,
                                                  journal_max_kb: str) -> None:
    # 256 KB: the instances (and their events) are in the journal; 1 KB: each instance is above the
    # journal's limit, so it gets its own fsynced blob file and only its event goes to the journal.
    env = {"CADUCEUS_RECEIVER_JOURNAL_MAX_KB": journal_max_kb}
    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver-1.log", env=env)
    nats_server.stop()  # nothing can be applied: the instances exist only in the journal
    try:
        result = await asyncio.to_thread(storescu, receiver.port, series5)
        assert result.returncode == 0, result.output
    finally:
        receiver.kill()
    nats_server.start()
    restarted = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver-2.log", env=env)
    try:
        received = await wait_events(bus, "image.received", 5, timeout=40)
        assert sorted(e.sop_uid or "" for e in received) == sorted(_uids(p)[0] for p in series5.iterdir())
        stored = {uid: pixels for uid, pixels in map(_uids, blob_files(data_dir))}
        assert stored == {uid: pixels for uid, pixels in map(_uids, series5.iterdir())}
        assert "not yet applied" in restarted.log_text()
    finally:
        restarted.stop()


def _send_datasets(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="DSSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def _secondary_capture(study: str, series: str, sop: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.PatientName, ds.PatientID, ds.Modality = "Hostile^Uids", "H1", "OT"
    return ds


async def test_hostile_uids_stored_safely(receiver: Peer, bus: Bus, data_dir: Path) -> None:
    datasets = [_secondary_capture("../../etc", "1." * 120 + "1", "..")]
    statuses = await asyncio.to_thread(_send_datasets, receiver.port, datasets)
    assert statuses == [0]
    (event,) = await wait_events(bus, "image.received", 1)
    assert event.study_uid == "../../etc"
    key = event.payload["blob_key"]
    assert ".." not in key.split("/")
    path = (data_dir / "blobs" / key).resolve()
    assert (data_dir / "blobs").resolve() in path.parents and path.is_file()
    assert not Path("/etc/...dcm").exists()


def _negotiate(port: int, proposals: list[list[str]]) -> list[str]:
    """The transfer syntax accepted for each proposed CT Image Storage context (one per proposal)."""
    ae = AE(ae_title="PROPOSER")
    for syntaxes in proposals:
        ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
    try:
        assert assoc.is_established
        return [str(cx.transfer_syntax[0]) for cx in sorted(assoc.accepted_contexts, key=lambda c: c.context_id or 0)]
    finally:
        assoc.release()


async def test_explicit_little_endian_is_preferred_when_a_context_offers_it(receiver: Peer) -> None:
    accepted = await asyncio.to_thread(_negotiate, receiver.port, [
        [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian],  # pynetdicom's default order
        [JPEGLosslessSV1, ExplicitVRLittleEndian, ImplicitVRLittleEndian],      # storescu -xs
        [JPEG2000Lossless, ImplicitVRLittleEndian],                             # no Explicit LE: sender's order
        [JPEGBaseline8Bit],                                                     # a compressed file alone
    ])
    assert accepted == [ExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit]


async def test_charset_files(receiver: Peer, bus: Bus, tmp_path: Path) -> None:
    names = ["chrH31.dcm", "chrX1.dcm", "chrX2.dcm", "chrGerm.dcm", "chrI2.dcm", "chrRuss.dcm"]
    folder = tmp_path / "charsets"
    folder.mkdir()
    for name in names:
        shutil.copy(get_charset_files(name)[0], folder / name)
    result = await asyncio.to_thread(storescu, receiver.port, folder)
    assert result.returncode == 0, result.output
    events = await wait_events(bus, "image.received", len(names))
    names_by_patient = {e.payload["tags"]["PatientID"]: e.payload["tags"]["PatientName"] for e in events}
    assert "山田^太郎" in names_by_patient["H31EXAMPLE"]
    assert names_by_patient["X1EXAMPLE"] == "Wang^XiaoDong=王^小東"
    assert names_by_patient["X2EXAMPLE"] == "Wang^XiaoDong=王^小东"
    assert names_by_patient["SCSGERM"] == "Äneas^Rüdiger"
    assert "홍^길동" in names_by_patient["I2EXAMPLE"]


async def test_parallel_associations(receiver: Peer, bus: Bus, tmp_path: Path) -> None:
    folders = [make_series(tmp_path / f"s{i}", 5, size=64) for i in range(4)]
    results = await asyncio.gather(*(asyncio.to_thread(storescu, receiver.port, f) for f in folders))
    assert all(r.returncode == 0 for r in results), [r.output for r in results]
    events = await wait_events(bus, "image.received", 20)
    assert len({e.sop_uid for e in events}) == 20
    assert len({e.payload["association_id"] for e in events}) == 4


@pytest.mark.parametrize("journal_max_kb", ["256", "0"], ids=["journal", "no-journal"])
async def test_kill_9_mid_association_keeps_every_acknowledged_instance(
        nats_url: str, bus: Bus, tmp_path: Path, data_dir: Path, journal_max_kb: str) -> None:
    env = {"CADUCEUS_RECEIVER_JOURNAL_MAX_KB": journal_max_kb}
    receiver = start_receiver(nats_url, data_dir, env=env, log_path=tmp_path / "receiver-1.log")
    files = sorted(make_series(tmp_path / "big", 300, size=256).glob("*.dcm"))  # 128 KB instances
    running = storescu_background(receiver.port, files, tmp_path / "storescu.log")
    # The sender's own log says when it got its first successes (blob files of journaled instances
    # appear only once the journal applier gets to them).
    await asyncio.to_thread(wait_for, lambda: running.successes_so_far() >= 10, 30, "10 successes", None, 0.005)
    receiver.kill()
    sent = await asyncio.to_thread(running.finish, 60)
    assert 0 < len(sent.accepted) < 300, sent.output[-2000:]
    # The supervisor would start it again: a journaled instance's file and event may come only then.
    restarted = start_receiver(nats_url, data_dir, env=env, log_path=tmp_path / "receiver-2.log")
    try:
        events = await wait_events(bus, "image.received", len(sent.accepted), timeout=30)
    finally:
        restarted.stop()
    received = {e.sop_uid: e for e in events}
    for sop_uid in sent.accepted:
        assert sop_uid in received, f"acknowledged {sop_uid} has no image.received event"
        blob = data_dir / "blobs" / received[sop_uid].payload["blob_key"]
        assert blob.is_file() and blob.stat().st_size == received[sop_uid].payload["size"]


async def test_journal_of_a_former_worker_is_applied_and_removed(nats_url: str, bus: Bus, data_dir: Path,
                                                                 tmp_path: Path, series5: Path) -> None:
    # A worker slot (w3) left by a receiver that ran with more worker processes than now.
    path = sorted(series5.iterdir())[0]
    sop_uid, _ = _uids(path)
    journal = Journal(slot_directory(data_dir, "w3"), segment_bytes=16 * 1024 * 1024,
                      max_bytes=64 * 1024 * 1024)
    journal.open()
    key = f"instances/orphan/{sop_uid}.dcm"
    event = make_event("image.received", "receiver", {
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "blob_key": key, "size": path.stat().st_size, "sha256": "0" * 64, "calling_aet": "GONE",
        "called_aet": "CADUCEUS", "peer_host": "127.0.0.1", "peer_port": 1, "association_id": "orphan",
        "duplicate": "new", "tags": {}}, sop_uid=sop_uid)
    never_started = JournalApplier(journal, lambda key, data, replayed, placing: "new", lambda events, timeout: [], None,
                                   lambda receipt, data, sha256, verdict: None)
    never_started.accept(event, key, "0" * 64, path.read_bytes())
    journal.close()

    receiver = start_receiver(nats_url, data_dir, log_path=tmp_path / "receiver.log")
    try:
        (received,) = await wait_events(bus, "image.received", 1, timeout=30)
        assert received.event_id == event.event_id and received.payload["calling_aet"] == "GONE"
        assert (data_dir / "blobs" / key).read_bytes() == path.read_bytes()
        assert not slot_directory(data_dir, "w3").exists()
        assert slot_directory(data_dir, "main").is_dir()
    finally:
        receiver.stop()

