"""services.receiver.part10 writes the same File Meta bytes as pynetdicom."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, generate_uid
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from services.receiver.part10 import file_meta


@pytest.mark.parametrize("length", range(10, 65))
def test_same_bytes_as_pynetdicom(length: int) -> None:
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50",
                   "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.201"):
        sop_class = "1.2.840.10008.5.1.4.1.1.2"
        instance = (generate_uid() + "1234567890" * 7)[:length].rstrip(".")
        expected = encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance),
                                                     transfer_syntax=UID(syntax)))
        assert file_meta(sop_class, instance, syntax) == expected


@pytest.mark.parametrize("bad", ["", "1.2.x", "1.2.3 ", "ü", "1" * 65])
def test_unusual_values_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        file_meta("1.2.3", bad, "1.2.840.10008.1.2")
