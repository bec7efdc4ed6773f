"""fastpath.store_response_command writes the same C-STORE-RSP command set as pynetdicom."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from services.receiver import direct
from services.receiver.fastpath import store_response_command


def _pynetdicom_bytes(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB000])
@pytest.mark.parametrize("message_id", [1, 2, 255, 65535])
def test_same_bytes_as_pynetdicom(status: int, message_id: int) -> None:
    for length in (20, 21, 63, 64):
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        primitive.AffectedSOPInstanceUID = (generate_uid() + "1234567890" * 7)[:length].rstrip(".")
        primitive.Status = status
        assert store_response_command(primitive) == _pynetdicom_bytes(primitive)


def test_error_comment_and_requests_are_left_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3"
    primitive.Status = 0xC000
    primitive.ErrorComment = "cannot understand"  # type: ignore[assignment]
    assert store_response_command(primitive) is None
    request = C_STORE()
    request.MessageID = 1
    assert store_response_command(request) is None


@pytest.mark.parametrize("comment", ["odd", "even", "truncated: incomplete element header at the end of the data, 70 chars",
                                     "free space 12 MB is below min_free_space_mb (500 MB) \\ é"])
def test_direct_error_comment_same_bytes_as_pynetdicom(comment: str) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 3
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Status = 0xC000
    text = direct.error_comment_text(comment)
    assert len(text) <= 64
    primitive.ErrorComment = text  # type: ignore[assignment]
    assert direct.store_response("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 3, 0xC000, comment) \
        == _pynetdicom_bytes(primitive)
