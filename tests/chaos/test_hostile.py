"""Hostile input at the receiver: broken and malicious datasets over a real association, malformed
PDUs on a raw socket, thousands of simultaneous connections.

The receiver must stay up (same process, healthy, echoscu and storescu still work), keep its
memory bounded, answer every C-STORE with a clear status (0xC000 + `image.quarantined` with a
reason for what it cannot read; success only for what it stored), and never write outside the
blob store whatever the UIDs say.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.e2e.dicomfiles import dataset_bytes
from tests.harness import Caduceus, StoreResult, echoscu, pid_alive, settings_doc, storescu, wait_for
from tests.peers import associate_rq, make_series, open_connections

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

CT = str(CTImageStorage)
RSS_LIMIT = 600 * 1024 * 1024
FLOOD = 2000  # simultaneous connection attempts (well above the receiver's 200 associations + 32)
BIG_ELEMENT = 24 * 1024 * 1024


# ---------------------------------------------------------------- crafting bytes

def _element(group: int, element: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit VR little endian element; `length` may lie about the value's length."""
    size = len(value) if length is None else length
    if vr in ("OB", "OW", "UN", "SQ", "UT", "UC", "UR"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, size) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), size) + value


def _uid(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return raw + (b"\0" if len(raw) % 2 else b"")


def _identity(study: str, series: str, sop: str, extra: bytes = b"") -> bytes:
    """A minimal CT data set with the given (possibly hostile) identity UIDs, in tag order."""
    return b"".join([
        _element(0x0008, 0x0016, "UI", _uid(CT)),
        _element(0x0008, 0x0018, "UI", _uid(sop)),
        _element(0x0008, 0x0060, "CS", b"CT"),
        _element(0x0010, 0x0010, "PN", b"Hostile^Input"),
        extra,
        _element(0x0020, 0x000D, "UI", _uid(study)),
        _element(0x0020, 0x000E, "UI", _uid(series)),
    ])


def _write(path: Path, body: bytes, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """A file whose meta is valid (so pynetdicom can send it) and whose data set is `body`, sent
    as is (pynetdicom's chunked send does not decode it)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = generate_uid()
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta, enforce_standard=True)  # type: ignore[arg-type]
        handle.write(body)
    return path


PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def hostile_files(out: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the receiver must answer: 'quarantine', 'store' or 'any')."""
    out.mkdir(parents=True, exist_ok=True)
    real = dataset_bytes(good)
    cases: dict[str, tuple[bytes, str, str]] = {
        "garbage": (os.urandom(4000), ExplicitVRLittleEndian, "quarantine"),
        "empty": (b"", ExplicitVRLittleEndian, "quarantine"),
        "truncated in pixel data": (real[: len(real) * 2 // 3], ExplicitVRLittleEndian, "quarantine"),
        "truncated in header": (real[:37], ExplicitVRLittleEndian, "quarantine"),
        # Cut inside an element's header: pydicom stops reading there without a word, and such a
        # CT (identity complete, no pixel data) used to be stored and sent on.
        "cut in the pixel data tag": (real[:real.rindex(PIXEL_DATA_TAG) + 2], ExplicitVRLittleEndian, "quarantine"),
        "cut after the pixel data VR": (real[:real.rindex(PIXEL_DATA_TAG) + 6], ExplicitVRLittleEndian,
                                        "quarantine"),
        "cut in a header mid-data": (real[:real.index(b"\x28\x00\x10\x00") + 3], ExplicitVRLittleEndian,
                                     "quarantine"),
        "element length beyond the data": (_identity(generate_uid(), generate_uid(), generate_uid(),
                                                     _element(0x0009, 0x1001, "OB", b"x" * 64, 0x7FFFFFF0)),
                                           ExplicitVRLittleEndian, "quarantine"),
        "no identity": (_element(0x0008, 0x0060, "CS", b"CT"), ExplicitVRLittleEndian, "quarantine"),
        "claims implicit VR, is explicit": (real, ImplicitVRLittleEndian, "any"),
        "claims JPEG, is uncompressed": (real, JPEGBaseline8Bit, "any"),
        "path traversal UIDs": (_identity("../../../../../../tmp/caduceus-escape", "..",
                                          "../../evil.dcm"), ExplicitVRLittleEndian, "any"),
        "NUL and slash in UIDs": (_identity("1.2.3\0/../x", "1.2\0\0.3/", "1.2.3.4\0"), ExplicitVRLittleEndian,
                                  "any"),
        "300-character UIDs": (_identity("1." + "9" * 300, "2." + "8" * 300, "3." + "7" * 300),
                               ExplicitVRLittleEndian, "any"),
        "24 MB private element": (_identity(generate_uid(), generate_uid(), generate_uid(),
                                            _element(0x0009, 0x0010, "LO", b"BIG ") +
                                            _element(0x0009, 0x1001, "OB", b"\x5a" * BIG_ELEMENT)),
                                  ExplicitVRLittleEndian, "store"),
    }
    return {name: (_write(out / f"case-{i:02d}.dcm", body, ts), expect)
            for i, (name, (body, ts, expect)) in enumerate(cases.items())}


# ---------------------------------------------------------------- raw PDUs

def _raw_send(port: int, data: bytes, hold: float = 0.5) -> bytes:
    """Send `data`, wait a moment, return whatever the receiver answered (b'' if it just closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b""
        time.sleep(hold)
        sock.settimeout(2)
        try:
            return sock.recv(65536)
        except (TimeoutError, OSError):
            return b""


MALFORMED_PDUS: dict[str, bytes] = {
    "random bytes": os.urandom(2048),
    "A-ASSOCIATE-RQ header claiming 4 GB": struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * 64,
    "truncated A-ASSOCIATE-RQ": associate_rq()[:50],
    "P-DATA before association": struct.pack(">BBI", 0x04, 0, 6) + struct.pack(">IBB", 2, 1, 3),
    "unknown PDU type": struct.pack(">BBI", 0x7F, 0, 4) + b"abcd",
    "A-ASSOCIATE-RQ with broken items": associate_rq()[:10] + b"\xff" * 200,
    "zero-length A-ASSOCIATE-RQ": struct.pack(">BBI", 0x01, 0, 0),
}


# ---------------------------------------------------------------- the test

@pytest.fixture
def chunked_send() -> Iterator[None]:
    """pynetdicom sends a file's bytes as they are, without decoding (so broken data goes out)."""
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    yield
    _config.STORE_SEND_CHUNKED_DATASET = old


def _send_each(port: int, files: dict[str, tuple[Path, str]],
               comments: dict[str, str] | None = None) -> dict[str, int | None]:
    """One association per file (a broken one must not decide the fate of the next); the failure
    responses' Error Comments go into `comments`."""
    ae = AE(ae_title="HOSTILE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
        ae.add_requested_context(CT, ts)
    statuses: dict[str, int | None] = {}
    for name, (path, _) in files.items():
        assoc = ae.associate("127.0.0.1", port, ae_title="CADUCEUS")
        assert assoc.is_established, f"{name}: association refused"
        response = assoc.send_c_store(path)
        statuses[name] = int(response.Status) if response and "Status" in response else None
        if comments is not None and response and "ErrorComment" in response:
            comments[name] = str(response.ErrorComment)
        if assoc.is_established:
            assoc.release()
    return statuses


def _flood_size(wanted: int = FLOOD) -> int:
    """FLOOD, or what this process may open: raise the soft descriptor limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            target = wanted + 512 if hard == resource.RLIM_INFINITY else min(hard, wanted + 512)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return min(wanted, soft - 256)


def _flood(port: int, count: int = 300, hold: float = 3.0) -> int:
    """`count` simultaneous connection attempts (non-blocking, all at once): of those the receiver
    accepts within a few seconds, half send a valid A-ASSOCIATE-RQ, half a partial one; all are
    held for `hold` seconds, then closed. Returns how many got connected."""
    request = associate_rq()

    def send_request(sock: socket.socket, n: int) -> None:
        with contextlib.suppress(OSError):
            sock.send(request if n % 2 else request[:20])

    connected = open_connections(port, count, timeout=5, on_connect=send_request)
    time.sleep(hold)
    for sock in connected:
        sock.close()
    return len(connected)


def test_receiver_survives_hostile_input(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                         chunked_send: None) -> None:
    cad = caduceus_factory(config={"settings": settings_doc()})
    receiver = psutil.Process(cad.pid("receiver"))
    good = make_series(tmp_path / "good", 2, size=64)
    files = hostile_files(tmp_path / "hostile", good[0])

    # Peak RSS sampled while the attack runs.
    peak = [receiver.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak.append(receiver.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        comments: dict[str, str] = {}
        statuses = _send_each(cad.dicom_port, files, comments)
        answers = {name: _raw_send(cad.dicom_port, data) for name, data in MALFORMED_PDUS.items()}
        flood = _flood_size()
        opened = _flood(cad.dicom_port, flood)
    finally:
        stop.set()
        sampler.join()

    # Every C-STORE got an answer, and the expected one.
    for name, (_, expect) in files.items():
        status = statuses[name]
        assert status is not None, f"{name}: no C-STORE response"
        if expect == "quarantine":
            assert status == 0xC000, f"{name}: status 0x{status:04X}"
            assert comments.get(name), f"{name}: no Error Comment with the failure"  # the sender's operator sees why
        elif expect == "store":
            assert status == 0x0000, f"{name}: status 0x{status:04X}"
        else:
            assert status in (0x0000, 0xC000), f"{name}: status 0x{status:04X}"
    quarantined = cad.wait_events("image.quarantined",
                                  lambda found: len(found) >= sum(1 for s in statuses.values() if s == 0xC000), 30)
    assert all(e.payload["reason"] and e.payload["status"] == 0xC000 for e in quarantined)
    for event in quarantined:
        key = event.payload["blob_key"]
        assert key and key.startswith("quarantine/") and (cad.blob_root / key).is_file(), event.payload
    # What the operator is shown: status points at them, the audit log says why and where the bytes are.
    status = wait_for(lambda: (out := cad.cli("status").stdout) and "quarantined in the last 24 h" in out and out,
                      30, "status reports the quarantined images")
    assert f"ATTENTION: {len(quarantined)} image(s) quarantined" in status, status
    listed = cad.cli("bookkeeper", "events", "--type", "image.quarantined").stdout
    assert listed.count("kept=quarantine/") == len(quarantined) and "truncated" in listed, listed

    # Whatever the UIDs said, every stored file is inside the blob store, under a safe key.
    for event in cad.events("image.received"):
        path = (cad.blob_root / event.payload["blob_key"]).resolve()
        assert cad.blob_root.resolve() in path.parents and path.is_file(), event.payload
    assert not Path("/tmp/caduceus-escape").exists()
    assert not any("evil" in p.name for p in cad.data.rglob("*"))

    # Malformed PDUs: the receiver answered with an A-ASSOCIATE-RJ/A-ABORT or just closed; never
    # an accepted association.
    for name, answer in answers.items():
        assert not answer.startswith(b"\x02"), f"{name}: association accepted"
    assert opened >= 50, f"only {opened} of {flood} connections could be opened"

    # Still the same healthy receiver, still serving.
    assert pid_alive(receiver.pid) and cad.pid("receiver") == receiver.pid, "the receiver was restarted"
    assert not [e for e in cad.events("service.crashed") if e.payload["service"] == "receiver"]
    flood_end = time.monotonic()
    wait_for(lambda: echoscu(cad.dicom_port), 90, "echoscu answered")
    echo_after = time.monotonic() - flood_end
    # Connections beyond the limit are closed at accept and dead ones end at once (admission.py).
    assert echo_after < 15, f"echo answered only {echo_after:.1f} s after the flood"
    # The flood's last connections may still be closing (seen once in CI: the echo got in, the next
    # association was closed at accept while the count was still at the limit); a sender that is
    # refused tries again, as a modality would.
    def store_good() -> StoreResult | None:
        result = storescu(cad.dicom_port, good)
        return result if result.returncode == 0 else None

    after = wait_for(store_good, 30, "storescu accepted after the flood", cad.logs, interval=1.0)
    assert len(after.accepted) == 2, after.output
    cad.wait_service_healthy("receiver", receiver.pid)
    rss_now = receiver.memory_info().rss
    assert max(peak) < RSS_LIMIT, f"receiver peak RSS {max(peak) / 2**20:.0f} MB"
    print(f"RESULT hostile: statuses { {k: hex(v) if v is not None else None for k, v in statuses.items()} }; "
          f"PDU answers { {k: a[:1].hex() for k, a in answers.items()} }; flood connected {opened}/{flood}, "
          f"first echo answered {echo_after:.1f} s after the flood; "
          f"receiver RSS peak {max(peak) / 2**20:.0f} MB, after {rss_now / 2**20:.0f} MB")
    assert dcmread(good[0], stop_before_pixels=True).SOPInstanceUID in after.accepted
