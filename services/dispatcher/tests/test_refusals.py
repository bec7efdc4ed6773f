"""What a task's error says when a real peer refuses: the association, or every proposed context."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pynetdicom.acse
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from services.dispatcher import cstore, sender
from services.dispatcher.sender import Destination, SendItem, send_items
from shared.natsserver import free_port
from tests.peers import Orthanc, StoreScp, make_series


def _items(files: list[Path]) -> list[SendItem]:
    items = []
    for index, path in enumerate(files):
        ds = dcmread(path, stop_before_pixels=True)
        items.append(SendItem(index, str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                              str(ds.file_meta.TransferSyntaxUID), path))
    return items


def test_rejected_association_says_why(tmp_path: Path, orthanc_factory: Callable[..., Orthanc],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender, "BUSY_PAUSES", (5.0,), raising=False)
    peer = orthanc_factory(DicomCheckCalledAet=True)
    items = _items(make_series(tmp_path / "s", 2))
    started = time.monotonic()
    result = send_items(Destination("127.0.0.1", peer.dicom_port, "NOT-ORTHANC", "CADUCEUS"), items,
                        lambda index, status: None, threading.Event())
    assert not result.delivered
    assert result.errors == [f"association rejected by NOT-ORTHANC@127.0.0.1:{peer.dicom_port}: "
                             "called ae title not recognised (rejected permanent, by the service user)"]
    assert time.monotonic() - started < 4, "a permanent rejection is not asked again"


def test_a_busy_peer_is_asked_again_within_the_attempt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PACS at its association limit rejects one more as transient ("local limit exceeded"), here
    # because another sender holds its only association for a moment. That is no reason to fail the
    # attempt and wait the retry back-off (a minute, then doubling): the association is asked for
    # again after a short pause.
    monkeypatch.setattr(sender, "BUSY_PAUSES", (0.3,) * 10, raising=False)
    ae = AE(ae_title="BUSY")
    ae.maximum_associations = 1
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
    assert server is not None
    other = AE(ae_title="MODALITY")
    other.add_requested_context(CTImageStorage)
    held = other.associate("127.0.0.1", port, ae_title="BUSY")
    try:
        assert held.is_established
        threading.Timer(1.5, held.release).start()
        started = time.monotonic()
        result = send_items(Destination("127.0.0.1", port, "BUSY", "CADUCEUS"), _items(make_series(tmp_path / "s", 2)),
                            lambda index, status: None, threading.Event())
    finally:
        held.release()
        server.shutdown()
    assert (sorted(result.delivered), result.failed, result.errors) == ([0, 1], {}, [])
    assert time.monotonic() - started > 1, "the peer was not busy: test proves nothing"


def test_a_transfer_syntax_refused_when_proposed_alone_is_refused_for_good(
        tmp_path: Path, storescp_factory: Callable[..., StoreScp]) -> None:
    # The only context of the association, refused with "transfer syntax not supported" (PS3.8
    # result 4): the peer was not short of contexts, it does not take JPEG 2000. The instance fails
    # for good (not resent by later attempts), and says why.
    peer = storescp_factory(extra_args=["+xi"])  # Implicit VR Little Endian only
    items = _items([Path(str(get_testdata_file("JPEG2000.dcm")))])
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"), items,
                        lambda index, status: None, threading.Event())
    assert not result.delivered and result.errors == []
    assert result.failed == {0: "'Secondary Capture Image Storage' in 'JPEG 2000 Image Compression' not accepted "
                                f"by STORESCP@127.0.0.1:{peer.port} (transfer syntax not supported)"}
    assert result.context_refused == {0}


# storescp's configuration: CT and Secondary Capture, uncompressed only (no MR, no JPEG 2000).
CT_AND_SC_UNCOMPRESSED = """
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[[PresentationContexts]]
[CtAndSc]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = CTImageStorage\\Uncompressed
PresentationContext3 = SecondaryCaptureImageStorage\\Uncompressed
[[Profiles]]
[CtAndSc]
PresentationContexts = CtAndSc
"""


def test_what_a_configured_storescp_does_not_take_is_proposed_alone_then_refused_for_good(
        tmp_path: Path, storescp_factory: Callable[..., StoreScp], monkeypatch: pytest.MonkeyPatch) -> None:
    # A series the destination takes in part: CT goes through; MR (SOP class not configured:
    # "abstract syntax not supported") and a JPEG 2000 secondary capture ("transfer syntax not
    # supported") were refused in an association that proposed five contexts, so each is proposed
    # alone once more within the attempt: refused again, they are refused for good.
    config = tmp_path / "storescp.cfg"
    config.write_text(CT_AND_SC_UNCOMPRESSED)
    peer = storescp_factory(accept_all=False, extra_args=["-xf", str(config), "CtAndSc"])
    proposals: list[int] = []
    associate = sender._associate

    def counting(dest: Destination, group: Any) -> Any:
        assoc = associate(dest, group)
        proposals.append(len(assoc.requestor.requested_contexts))
        return assoc

    monkeypatch.setattr(sender, "_associate", counting)
    files = [*make_series(tmp_path / "s", 2), Path(str(get_testdata_file("MR_small.dcm"))),
             Path(str(get_testdata_file("JPEG2000.dcm")))]
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"), _items(files),
                        lambda index, status: None, threading.Event())
    where = f"STORESCP@127.0.0.1:{peer.port}"
    assert sorted(result.delivered) == [0, 1] and result.errors == []
    assert result.failed == {
        2: f"SOP class 'MR Image Storage' not accepted by {where} (abstract syntax not supported)",
        3: f"'Secondary Capture Image Storage' in 'JPEG 2000 Image Compression' not accepted by {where} "
           "(transfer syntax not supported)"}
    assert result.context_refused == {2, 3}
    assert proposals == [5, 2, 1], "each refused pair proposed alone once"
    assert len(peer.files()) == 2


def test_a_peer_that_takes_few_contexts_per_association_gets_the_rest_in_the_same_attempt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Some peers accept only so many presentation contexts per association and answer the others
    # "abstract syntax not supported" though they do support them. Proposed alone, they are
    # accepted: nothing is refused for good, and everything arrives in the one attempt.
    negotiate = pynetdicom.acse.negotiate_as_acceptor

    def two_contexts_at_most(*args: Any, **kwargs: Any) -> Any:
        contexts, roles = negotiate(*args, **kwargs)
        for cx in [cx for cx in contexts if cx.result == 0x00][2:]:
            cx.result = 0x03
        return contexts, roles

    monkeypatch.setattr(pynetdicom.acse, "negotiate_as_acceptor", two_contexts_at_most)
    ae = AE(ae_title="FEW")
    for sop_class in (CTImageStorage, MRImageStorage):
        ae.add_supported_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    received: list[str] = []

    def store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert server is not None
    try:
        files = [*make_series(tmp_path / "s", 2), Path(str(get_testdata_file("MR_small.dcm")))]
        result = send_items(Destination("127.0.0.1", port, "FEW", "CADUCEUS"), _items(files),
                            lambda index, status: None, threading.Event())
    finally:
        server.shutdown()
    assert (sorted(result.delivered), result.failed, result.errors) == ([0, 1, 2], {}, [])
    assert result.context_refused == set() and len(received) == 3


def test_unreachable_peer_says_how(tmp_path: Path, storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(start=False)  # nothing listens on its port
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"),
                        _items(make_series(tmp_path / "s", 1)), lambda index, status: None, threading.Event())
    assert result.errors == [f"could not connect to STORESCP@127.0.0.1:{peer.port}: Connection refused"]


def test_a_peer_that_never_answers_is_named_as_such(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PACS that takes the data and never answers: the dispatcher aborts after the DIMSE timeout.
    # The error must say so; "aborted by the peer" sends the admin looking for an abort in the
    # PACS's log that never happened.
    monkeypatch.setattr(sender, "DIMSE_TIMEOUT", 1)
    release = threading.Event()
    ae = AE(ae_title="SILENT")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: release.wait(30) and 0)])
    assert server is not None
    try:
        result = send_items(Destination("127.0.0.1", port, "SILENT", "CADUCEUS"),
                            _items(make_series(tmp_path / "s", 1)), lambda index, status: None, threading.Event())
    finally:
        release.set()
        server.shutdown()
    # (The network timeout, as long, may notice the silence first.)
    reason = result.failed[0]
    assert reason in ("no C-STORE response within 1 s", "nothing received from the peer for 1 s")
    assert result.errors == [f"association with SILENT@127.0.0.1:{port} aborted by caduceus: {reason}"]


class ThrottledProxy:
    """A TCP relay to `port` that forwards what the client sends at `rate` bytes/s: a slow WAN link."""

    def __init__(self, port: int, rate: int) -> None:
        self.target, self.rate = port, rate
        self.stalled = threading.Event()  # set: the link stops taking what the client sends
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                server = socket.create_connection(("127.0.0.1", self.target))
                threading.Thread(target=self._relay, args=(client, server, self.rate, self.stalled),
                                 daemon=True).start()
                threading.Thread(target=self._relay, args=(server, client, 0, threading.Event()),
                                 daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket, rate: int, stalled: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 14):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
                while stalled.is_set():
                    time.sleep(0.05)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stalled.clear()
        self.listener.close()


def test_an_instance_that_takes_longer_than_the_network_timeout_to_send_is_delivered(
        tmp_path: Path, storescp: StoreScp, monkeypatch: pytest.MonkeyPatch) -> None:
    # A large instance (tomosynthesis, whole-slide, long cine) over a slow link: while its data set
    # is still being written the peer has nothing to say. The network timeout is for a silent peer,
    # not a busy link: it used to abort the send at the same point at every attempt.
    # The timeout leaves the peer time to store the instance and answer on a loaded machine (1 s
    # did not, once, in CI), and the transfer takes twice that at least.
    monkeypatch.setattr(sender, "NETWORK_TIMEOUT", 3)
    proxy = ThrottledProxy(storescp.port, rate=2 << 20)
    try:
        items = _items(make_series(tmp_path / "s", 1, size=2560))  # ~13 MB: ~6.5 s through the proxy
        started = time.monotonic()
        result = send_items(Destination("127.0.0.1", proxy.port, storescp.aet, "CADUCEUS"), items,
                            lambda index, status: None, threading.Event())
    finally:
        proxy.close()
    assert time.monotonic() - started > 6, "the link was not slow: test proves nothing"
    assert (result.delivered, result.failed, result.errors) == ([0], {}, [])


def test_a_link_still_draining_the_end_of_an_instance_does_not_time_out(
        tmp_path: Path, storescp: StoreScp, monkeypatch: pytest.MonkeyPatch) -> None:
    # The last block of an instance goes into the socket's send buffer (up to 4 MB) and the write
    # returns; over a slow link that buffer takes longer than the network timeout to drain (4 MB
    # at 35 KB/s: 2 minutes), and the peer has nothing to say until it has the whole request. Both
    # the network timeout and the DIMSE timeout used to run from the last write, and aborted a
    # transfer that was still moving. Here both are 2 s and the link drains for longer than that.
    monkeypatch.setattr(sender, "NETWORK_TIMEOUT", 2)
    monkeypatch.setattr(sender, "DIMSE_TIMEOUT", 2)
    last_write: list[float] = []
    write_data_set = cstore._write_data_set

    def noting_the_last_write(*args: Any) -> None:
        write_data_set(*args)
        last_write.append(time.monotonic())

    monkeypatch.setattr(cstore, "_write_data_set", noting_the_last_write)
    proxy = ThrottledProxy(storescp.port, rate=256 << 10)
    try:
        items = _items(make_series(tmp_path / "s", 1, size=1024))  # ~2 MB: ~8 s through the proxy
        result = send_items(Destination("127.0.0.1", proxy.port, storescp.aet, "CADUCEUS"), items,
                            lambda index, status: None, threading.Event())
        answered = time.monotonic()
    finally:
        proxy.close()
    assert (result.delivered, result.failed, result.errors) == ([0], {}, [])
    assert answered - last_write[-1] > 3, "the send buffer drained within the timeout: test proves nothing"


def test_a_write_that_takes_longer_than_the_network_timeout_on_a_moving_link_is_not_cut_off(
        tmp_path: Path, storescp: StoreScp, monkeypatch: pytest.MonkeyPatch) -> None:
    # With a small send buffer (here 32 KB) the 1 MB blocks of an instance each block in their write
    # while the slow link takes them (4 s at 256 KB/s), past the 2 s network timeout: the timer,
    # restarted by each write that returned, must see that the peer keeps acknowledging bytes.
    monkeypatch.setattr(sender, "NETWORK_TIMEOUT", 2)
    monkeypatch.setattr(sender, "DIMSE_TIMEOUT", 2)
    on_connection_open = sender._on_connection_open

    def with_a_small_send_buffer(event: evt.Event) -> None:
        on_connection_open(event)
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)

    monkeypatch.setattr(sender, "_on_connection_open", with_a_small_send_buffer)
    writes: list[float] = []
    write_data_set = cstore._write_data_set

    def timing_the_writes(*args: Any) -> None:
        started = time.monotonic()
        write_data_set(*args)
        writes.append(time.monotonic() - started)

    monkeypatch.setattr(cstore, "_write_data_set", timing_the_writes)
    proxy = ThrottledProxy(storescp.port, rate=256 << 10)
    try:
        items = _items(make_series(tmp_path / "s", 1, size=1024))  # ~2 MB, two 1 MB writes: ~8 s
        result = send_items(Destination("127.0.0.1", proxy.port, storescp.aet, "CADUCEUS"), items,
                            lambda index, status: None, threading.Event())
    finally:
        proxy.close()
    assert (result.delivered, result.failed, result.errors) == ([0], {}, [])
    assert writes[0] > 2 * 2, "no single write outlasted the timeout: test proves nothing"


def test_a_link_that_stops_taking_the_end_of_an_instance_still_times_out(
        tmp_path: Path, storescp: StoreScp, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same slow link, which stops taking anything once the last block is in the send buffer:
    # the bytes left there are never acknowledged, so the network timeout ends the association
    # (it must not wait on for a queue that does not move).
    monkeypatch.setattr(sender, "NETWORK_TIMEOUT", 2)
    monkeypatch.setattr(sender, "DIMSE_TIMEOUT", 2)
    proxy = ThrottledProxy(storescp.port, rate=256 << 10)
    last_write: list[float] = []
    write_data_set = cstore._write_data_set

    def stalling_after_the_last_write(*args: Any) -> None:
        write_data_set(*args)
        proxy.stalled.set()
        last_write.append(time.monotonic())

    monkeypatch.setattr(cstore, "_write_data_set", stalling_after_the_last_write)
    try:
        items = _items(make_series(tmp_path / "s", 1, size=1024))
        result = send_items(Destination("127.0.0.1", proxy.port, storescp.aet, "CADUCEUS"), items,
                            lambda index, status: None, threading.Event())
        ended = time.monotonic()
    finally:
        proxy.close()
    assert result.delivered == [] and 0 in result.failed, result
    assert ended - last_write[-1] < 6, "the timeout waited for a send queue that did not move"


def test_a_peer_that_stops_reading_mid_instance_fails_the_attempt(
        tmp_path: Path, storescp: StoreScp, monkeypatch: pytest.MonkeyPatch) -> None:
    # A PACS process that freezes (here SIGSTOP) while a large data set is on its way: the socket's
    # buffers fill and the write blocks. The network timeout must end the association; the blocked
    # write used to hold the socket's lock forever, so the A-ABORT waited behind it and the task
    # stayed "sending" (the dispatcher keeping its message alive) until someone restarted it.
    monkeypatch.setattr(sender, "NETWORK_TIMEOUT", 1)
    monkeypatch.setattr(sender, "DIMSE_TIMEOUT", 3)  # (the response to the cut-off request is waited for)
    small = _items(make_series(tmp_path / "small", 1))
    large = _items(make_series(tmp_path / "large", 1, size=4096))  # 32 MB: more than any socket buffer
    items = [small[0], SendItem(1, *dataclasses.astuple(large[0])[1:])]
    assert storescp.process is not None

    def freeze_after_first(index: int, status: int) -> None:
        os.killpg(storescp.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]

    done: list[sender.SendResult] = []
    thread = threading.Thread(target=lambda: done.append(send_items(
        Destination("127.0.0.1", storescp.port, storescp.aet, "CADUCEUS"), items, freeze_after_first,
        threading.Event())), daemon=True)
    try:
        thread.start()
        thread.join(30)
    finally:
        os.killpg(storescp.process.pid, signal.SIGCONT)
    assert done, "the send never ended"
    assert done[0].delivered == [0] and 1 in done[0].failed
