"""An instance's `image.received`, from what was known when its bytes arrived plus its header.

The journaled C-STORE path (services/receiver/ingest.py) writes the bytes to the journal with a
`Receipt` before it reads the header, so that the disk flush and the header read overlap. Both the
live path and a replay after a crash build the event here, with the receipt's event_id and time:
the event of a record that is applied twice is the same event, and JetStream drops the copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from shared.blobstore import blob_key
from shared.dicomtags import Data, ExtractedTags, TagExtractionError, extract_tags
from shared.events import Event, ImageReceived, make_event, new_event_id
from shared.rules import association_tags

ACTOR = "receiver"
Duplicate = Literal["new", "identical", "replaced", "superseded"]


class Association(Protocol):
    association_id: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int


@dataclass(frozen=True)
class Receipt:
    event_id: str
    occurred_at: datetime
    association_id: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int
    context_ts: str  # the presentation context's transfer syntax (for files without file meta)

    @classmethod
    def now(cls, assoc: Association, context_ts: str) -> Receipt:
        return cls(new_event_id(), datetime.now(UTC), assoc.association_id, assoc.calling_aet,
                   assoc.called_aet, assoc.peer_host, assoc.peer_port, context_ts)

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {**self.__dict__, "occurred_at": self.occurred_at.isoformat()}
        return json.dumps(fields, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Receipt:
        fields = json.loads(data)
        fields["occurred_at"] = datetime.fromisoformat(fields["occurred_at"])
        return cls(**fields)


def identified_tags(data: Data, keywords: list[str]) -> ExtractedTags:
    """The instance's tags; TagExtractionError (quarantine) if it is unreadable or lacks one of the
    three UIDs it is filed under."""
    if _file_meta_in_data_set(data):
        # Read on, they would be taken for part of the File Meta this receiver wrote: the stored
        # file and its event would claim their transfer syntax (or SOP Instance UID), not the
        # one negotiated.
        raise TagExtractionError("the data set contains File Meta elements (group 0002), "
                                 "which only a file's header may hold")
    tags = extract_tags(data, keywords)
    missing = [name for name, value in (("StudyInstanceUID", tags.study_uid),
                                        ("SeriesInstanceUID", tags.series_uid),
                                        ("SOPInstanceUID", tags.sop_uid)) if not value]
    if missing:
        raise TagExtractionError(f"required element(s) missing: {', '.join(missing)}")
    return tags


def _file_meta_in_data_set(data: Data) -> bool:
    """Whether the data set behind the File Meta group (as this receiver writes it: the group
    length first) starts with another group 0002 element."""
    if len(data) < 144 or data[128:136] != b"DICM\x02\x00\x00\x00":
        return False
    start = 144 + struct.unpack_from("<I", data, 140)[0]
    return data[start:start + 2] == b"\x02\x00"


def instance_key(tags: ExtractedTags) -> str:
    return blob_key("instances", tags.study_uid, tags.series_uid, tags.sop_uid + ".dcm")


def duplicate_of(existing: bytes | None, data: bytes) -> Duplicate:
    if existing is None:
        return "new"
    return "identical" if existing == data else "replaced"


def received_event(receipt: Receipt, tags: ExtractedTags, key: str, size: int, sha256: str,
                   duplicate: Duplicate) -> Event:
    return make_event("image.received", ACTOR, ImageReceived(
        sop_class_uid=tags.sop_class_uid, transfer_syntax_uid=tags.transfer_syntax_uid or receipt.context_ts,
        blob_key=key, size=size, sha256=sha256, calling_aet=receipt.calling_aet,
        called_aet=receipt.called_aet, peer_host=receipt.peer_host, peer_port=receipt.peer_port,
        association_id=receipt.association_id, duplicate=duplicate,
        tags={**tags.tags, **association_tags(receipt.calling_aet, receipt.called_aet, receipt.peer_host)}),
        event_id=receipt.event_id, occurred_at=receipt.occurred_at,
        study_uid=tags.study_uid, series_uid=tags.series_uid, sop_uid=tags.sop_uid)


def decide_again(receipt: Receipt, data: bytes, sha256: str, verdict: Duplicate | None, keywords: list[str],
                 compare: Callable[[str, bytes], Duplicate]) -> tuple[Event, bool] | None:
    """For a journaled instance a previous receiver process accepted but did not apply: its event
    and whether its file must be written, or None if it is unreadable (then its sender was answered
    0xC000 and the data quarantined, or was not answered at all).

    The header is read again (with today's tag list). `verdict` is the duplicate verdict recorded
    when it was accepted; None if that record was lost (a power cut right after the sender heard
    success): then it is taken from the blob store as it is now, and an instance whose file was
    written just before the cut reads as "identical" rather than "new" (docs/reliability.md).
    """
    try:
        tags = identified_tags(data, keywords)
    except TagExtractionError:
        return None
    key = instance_key(tags)
    duplicate = verdict or compare(key, data)  # how `data` compares with the stored copy of `key`
    return received_event(receipt, tags, key, len(data), sha256, duplicate), duplicate != "identical"
