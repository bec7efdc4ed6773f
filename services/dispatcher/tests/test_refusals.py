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

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

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


def test_no_accepted_context_names_what_was_refused(tmp_path: Path,
                                                    storescp_factory: Callable[..., StoreScp]) -> None:
    peer = storescp_factory(extra_args=["+xi"])  # Implicit VR Little Endian only
    items = _items([Path(str(get_testdata_file("JPEG2000.dcm")))])
    result = send_items(Destination("127.0.0.1", peer.port, peer.aet, "CADUCEUS"), items,
                        lambda index, status: None, threading.Event())
    assert not result.delivered
    assert result.errors == [f"STORESCP@127.0.0.1:{peer.port} accepted none of the proposed presentation "
                             "contexts (Secondary Capture Image Storage in JPEG 2000 Image Compression: "
                             "transfer syntax(es) not supported)"]


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
