"""The direct C-STORE path (services/receiver/direct.py): command decoding, message assembly,
hand-over to pynetdicom, and a real association with fragmented messages and interleaved C-ECHOs."""

from __future__ import annotations

import asyncio
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode

from bench.common import Peer
from services.receiver import direct
from services.receiver.tests.helpers import apply_settings, blob_files, wait_events
from shared.bus import Bus

CT = "1.2.840.10008.5.1.4.1.1.2"


def _store_command(message_id: int, sop_uid: str, *, move_originator: str = "") -> bytes:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Priority = 2
    if move_originator:
        primitive.MoveOriginatorApplicationEntityTitle = move_originator
        primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x02\x00\x00\x00" + b"12")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


def _echo_command(message_id: int) -> bytes:
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


@pytest.mark.parametrize("message_id", [1, 300, 65535])
@pytest.mark.parametrize("move_originator", ["", "MOVER"])
def test_store_request_from_pynetdicom_command(message_id: int, move_originator: str) -> None:
    for length in (9, 20, 63, 64):
        sop_uid = (generate_uid() + "1234567890" * 7)[:length].rstrip(".")
        elements = direct.decode_command(_store_command(message_id, sop_uid, move_originator=move_originator))
        request = direct.store_request(elements, 5, "1.2.840.10008.1.2.1")
        assert request == direct.StoreRequest(message_id, CT, sop_uid, 5, "1.2.840.10008.1.2.1")


def test_other_commands_and_odd_values_are_not_store_requests() -> None:
    assert direct.store_request(direct.decode_command(_echo_command(1)), 1, "1.2.840.10008.1.2") is None
    command = _store_command(1, "1.2.3")
    odd = command.replace(b"1.2.3\x00", b"1.2/3\x00")
    assert direct.store_request(direct.decode_command(odd), 1, "1.2.840.10008.1.2") is None
    with pytest.raises(direct.CommandError):
        direct.decode_command(command[:-3])
    with pytest.raises(direct.CommandError):
        direct.decode_command(struct.pack("<HHI", 0x0008, 0x0016, 0))


# ---------------------------------------------------------------- message assembly, no network


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


class FakeDimse:
    """Records what reaches pynetdicom's DIMSE; a message ends with a last fragment of its data set
    (or of its command when the command says it has no data set, as C-ECHO-RQ does)."""

    def __init__(self) -> None:
        self.pdvs: list[tuple[int, bytes]] = []
        self.message: object | None = None

    def receive_primitive(self, primitive: Any) -> None:
        for context_id, value in primitive.presentation_data_value_list:
            self.pdvs.append((context_id, value))
            self.message = object()
            control = value[0]
            no_data_set = control & 1 and b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01" in value
            if control & 2 and (not control & 1 or no_data_set):
                self.message = None


class FakeContext:
    transfer_syntax = ["1.2.840.10008.1.2.1"]


class FakeAssoc:
    def __init__(self) -> None:
        self.dul = type("Dul", (), {"socket": FakeSocket(), "_read_pdu_data": None})()
        self.dimse = FakeDimse()
        self._accepted_cx = {1: FakeContext(), 3: FakeContext()}
        self.is_established = True
        self._sent_release = False


def _direct() -> tuple[direct.DirectStore, FakeAssoc, list[tuple[direct.StoreRequest, bytes]]]:
    assoc = FakeAssoc()
    stored: list[tuple[direct.StoreRequest, bytes]] = []

    def store(_assoc: Any, request: direct.StoreRequest, fragments: list[memoryview] | direct.Sink) -> tuple[int, str]:
        assert isinstance(fragments, list)
        stored.append((request, b"".join(fragments)))
        return 0x0000, ""

    return direct.DirectStore(assoc, lambda _a, _r: True, store), assoc, stored


def _pdv(control: int, data: bytes) -> memoryview:
    return memoryview(bytes([control]) + data)


def test_fragmented_command_and_data_set_are_assembled_and_answered() -> None:
    store, assoc, stored = _direct()
    command = _store_command(7, "1.2.3.4")
    store.on_pdv(1, _pdv(0x01, command[:30]))
    store.on_pdv(1, _pdv(0x03, command[30:]))
    for index, chunk in enumerate((b"ab", b"cd", b"ef")):
        store.on_pdv(1, _pdv(0x02 if index == 2 else 0x00, chunk))
    assert stored == [(direct.StoreRequest(7, CT, "1.2.3.4", 1, "1.2.840.10008.1.2.1"), b"abcdef")]
    expected = direct.p_data_pdu(1, direct.store_response(CT, "1.2.3.4", 7, 0x0000))
    assert assoc.dul.socket.sent == [expected]
    assert assoc.dimse.pdvs == []


def test_other_messages_go_to_pynetdicom_whole_and_in_order() -> None:
    store, assoc, stored = _direct()
    echo = _echo_command(2)
    store.on_pdv(1, _pdv(0x01, echo[:10]))
    store.on_pdv(1, _pdv(0x03, echo[10:]))
    assert assoc.dimse.pdvs == [(1, b"\x01" + echo[:10]), (1, b"\x03" + echo[10:])]
    assert assoc.dimse.message is None and not store.passthrough
    # the next message, a C-STORE, takes the direct path again
    command = _store_command(3, "1.2.5")
    store.on_pdv(1, _pdv(0x03, command))
    store.on_pdv(1, _pdv(0x02, b"xy"))
    assert [(r.message_id, data) for r, data in stored] == [(3, b"xy")]


@pytest.mark.parametrize("case", ["data first", "context changes", "command after command", "unknown context"])
def test_protocol_oddities_are_left_to_pynetdicom(case: str) -> None:
    store, assoc, stored = _direct()
    command = _store_command(4, "1.2.6")
    sequence = {
        "data first": [(1, 0x00, b"zz"), (1, 0x03, command)],
        "context changes": [(1, 0x03, command), (3, 0x02, b"zz")],
        "command after command": [(1, 0x03, command), (1, 0x03, command)],
        "unknown context": [(9, 0x03, command), (9, 0x02, b"zz")],
    }[case]
    for context_id, control, data in sequence:
        store.on_pdv(context_id, _pdv(control, data))
    assert stored == []
    assert assoc.dul.socket.sent == []
    assert assoc.dimse.pdvs == [(context_id, bytes([control]) + data) for context_id, control, data in sequence]


def test_malformed_p_data_items_are_rejected() -> None:
    assert direct._split_pdvs(memoryview(b"\x00\x00\x00\x01\x01")) is None  # shorter than a PDV header
    assert direct._split_pdvs(memoryview(b"\x00\x00\x00\x09\x01\x03abc")) is None  # length beyond the PDU
    item = struct.pack(">IBB", 4, 1, 0x02) + b"ab"
    assert [(c, bytes(v)) for c, v in direct._split_pdvs(memoryview(item * 2)) or []] == [(1, b"\x02ab")] * 2


# ---------------------------------------------------------------- a real association


def _dataset(path: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    return ds


async def test_small_pdus_and_interleaved_echoes_store_identical_data(
        receiver: Peer, bus: Bus, series5: Path, data_dir: Path) -> None:
    # A tiny maximum PDU makes the sender split commands and data sets into many fragments (below
    # what `config apply` accepts, since DCMTK senders refuse it; pynetdicom's take it).
    await apply_settings(bus, unchecked=True, max_pdu=256)
    sources = [_dataset(path) for path in sorted(series5.iterdir())[:3]]

    def send() -> list[int]:
        ae = AE(ae_title="FRAGMENTS")
        ae.add_requested_context(CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CADUCEUS")
        assert assoc.is_established
        statuses = []
        try:
            for dataset in sources:
                statuses.append(int(assoc.send_c_echo().Status))
                statuses.append(int(assoc.send_c_store(dataset).Status))
        finally:
            assoc.release()
        return statuses

    assert await asyncio.to_thread(send) == [0] * 6
    events = await wait_events(bus, "image.received", 3)
    assert len(events) == 3
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in blob_files(data_dir)}
    for sent in sources:
        kept = pydicom.dcmread(stored[sent.SOPInstanceUID])
        assert kept.PixelData == sent.PixelData
        assert kept.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
