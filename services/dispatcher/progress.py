"""Per-task progress in the NATS KV bucket `caduceus-dispatch` (shared.subjects.DISPATCH_PROGRESS_BUCKET).

One record per task id holds what a retry or a redelivery needs to carry on where the last
attempt stopped: the original `dispatch.requested` event, the number of failed attempts, which
manifest instances the target already confirmed, and the task state. Several dispatchers may
touch one record (a redelivery to another process, a manual retry while the task is waiting), so
every change is a compare-and-set on the KV revision that merges rather than overwrites.

Delivered instances are a bitmap over the manifest's instance list (the manifest of a task never
changes), so a record stays small (1.25 KB for 10 000 instances) whatever the series size.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from shared.events import Event
from shared.subjects import DISPATCH_PROGRESS_BUCKET

from .sender import describe_status

TaskState = Literal["pending", "completed", "failed"]
_KV_KEY = re.compile(r"^[-_=A-Za-z0-9]{1,120}$")
# Records outlive any retention period a site would configure for the blobs they point to.
RECORD_MAX_AGE_SECONDS = 365 * 24 * 3600.0


class Bitmap:
    """A set of small non-negative integers, serialised as base64."""

    def __init__(self, data: bytes = b"") -> None:
        self.data = bytearray(data)

    @classmethod
    def decode(cls, text: str) -> Bitmap:
        return cls(base64.b64decode(text)) if text else cls()

    def encode(self) -> str:
        return base64.b64encode(bytes(self.data.rstrip(b"\0"))).decode()

    def add(self, index: int) -> None:
        byte, bit = divmod(index, 8)
        if byte >= len(self.data):
            self.data.extend(b"\0" * (byte + 1 - len(self.data)))
        self.data[byte] |= 1 << bit

    def update(self, indexes: Iterable[int]) -> None:
        for index in indexes:
            self.add(index)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        byte, bit = divmod(index, 8)
        return byte < len(self.data) and bool(self.data[byte] & (1 << bit))

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.data)

    def indexes(self) -> list[int]:
        return [byte * 8 + bit for byte, value in enumerate(self.data) if value
                for bit in range(8) if value & (1 << bit)]


# Distinct (status, reason) groups kept per record: a peer that writes each instance's UID into its
# Error Comment would otherwise make one group per instance; beyond this the status's meaning alone.
MAX_REFUSAL_REASONS = 20
CONTEXT_REFUSED = "presentation context not accepted by the destination (not supported)"


class Refusal(BaseModel):
    # The peer's C-STORE status; None: it refused the instance's presentation contexts as not
    # supported, so the instance was never sent (sender._context_refusal).
    status: int | None
    reason: str  # the status's meaning and the peer's Error Comment (sender.describe_status), or the context refusal
    instances: str  # Bitmap of manifest indexes


class ProgressRecord(BaseModel):
    task_id: str
    request: dict[str, Any]  # the dispatch.requested envelope (JSON form), to re-run the task later
    state: TaskState = "pending"
    attempts: int = 0  # failed attempts since the task was requested or last manually retried
    generation: int = 0  # +1 per manual retry; part of the ids of the events an attempt publishes
    carrier: str = ""  # event id of the message that runs the task (the request, or a manual retry)
    delivered: str = ""  # Bitmap of manifest indexes the target confirmed (success or warning status)
    # Which peer (called AE@host:port) `delivered` counts for: a target repointed at another peer
    # gets the whole task again. Empty in records written before this was kept.
    delivered_to: str = ""
    warnings: int = 0
    last_error: str = ""
    # Instances `delivered_to` refused with a status a resend cannot change (sender.is_final_refusal),
    # or whose presentation contexts it refused as not supported (status None), grouped by what the peer said. Later attempts of this generation do not resend them; a manual
    # retry (a new generation) or another peer forgets them.
    refused: list[Refusal] = []

    def request_event(self) -> Event:
        return Event.model_validate(self.request)

    def delivered_set(self) -> Bitmap:
        return Bitmap.decode(self.delivered)

    def refusals(self) -> dict[int, tuple[int | None, str]]:
        """Manifest index -> (status, reason) of the instances in `refused`."""
        return {index: (group.status, group.reason) for group in self.refused
                for index in Bitmap.decode(group.instances).indexes()}


def kv_key(task_id: str) -> str:
    """KV keys allow a narrow alphabet; an unusual task id becomes a hash."""
    if _KV_KEY.match(task_id):
        return task_id
    return "h" + hashlib.sha256(task_id.encode()).hexdigest()[:40]


class ProgressStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> ProgressStore:
        try:
            kv = await js.key_value(DISPATCH_PROGRESS_BUCKET)
        except BucketNotFoundError:
            try:
                kv = await js.create_key_value(KeyValueConfig(
                    bucket=DISPATCH_PROGRESS_BUCKET, history=1, storage=StorageType.FILE,
                    ttl=RECORD_MAX_AGE_SECONDS,
                    description="dispatcher: attempts and delivered instances per task"))
            except BadRequestError:  # another dispatcher created it a moment ago
                kv = await js.key_value(DISPATCH_PROGRESS_BUCKET)
        return cls(kv)

    async def get(self, task_id: str) -> ProgressRecord | None:
        record, _ = await self._read(task_id)
        return record

    async def _read(self, task_id: str) -> tuple[ProgressRecord | None, int | None]:
        try:
            entry = await self.kv.get(kv_key(task_id))
        except KeyNotFoundError:
            return None, None
        if entry.value is None:
            return None, None
        return ProgressRecord.model_validate_json(entry.value), entry.revision

    async def mutate(self, task_id: str, change: Callable[[ProgressRecord | None], ProgressRecord | None],
                     ) -> ProgressRecord | None:
        """Read-modify-write with compare-and-set; `change` may run more than once on conflict."""
        while True:
            record, revision = await self._read(task_id)
            new = change(record.model_copy(deep=True) if record else None)
            if new is None:
                return record
            data = new.model_dump_json().encode()
            try:
                if revision is None:
                    await self.kv.create(kv_key(task_id), data)
                else:
                    await self.kv.update(kv_key(task_id), data, last=revision)
                return new
            except KeyWrongLastSequenceError:
                continue  # someone else wrote in between: re-read and apply our change again
            except BadRequestError as exc:
                # create() on an existing key reports "wrong last sequence" as a plain bad request
                if "wrong last sequence" not in str(exc).lower():
                    raise
                continue

    async def ensure(self, request: Event, carrier: str | None = None) -> ProgressRecord:
        """The record of a requested task, created from the request if this is its first delivery.

        `carrier`: the event id of the message that will run the task (default: the request's).
        """
        task_id = request.payload["task_id"]

        def create(record: ProgressRecord | None) -> ProgressRecord | None:
            if record is not None:
                return None
            return ProgressRecord(task_id=task_id, request=request.model_dump(mode="json"),
                                  carrier=carrier or request.event_id)

        record = await self.mutate(task_id, create)
        assert record is not None
        return record

    async def deliver_to(self, task_id: str, peer: str) -> ProgressRecord | None:
        """Make `peer` the one the delivered instances count for; a different one forgets them."""

        def point(record: ProgressRecord | None) -> ProgressRecord | None:
            if record is None or record.delivered_to == peer:
                return None
            if record.delivered_to:
                record.delivered = ""
                record.warnings = 0
            record.refused = []  # another peer may accept them
            record.delivered_to = peer
            return record

        return await self.mutate(task_id, point)

    async def add_delivered(self, task_id: str, indexes: Iterable[int], warnings: int) -> None:
        indexes = list(indexes)
        if not indexes:
            return

        def merge(record: ProgressRecord | None) -> ProgressRecord | None:
            if record is None:
                return None
            bitmap = record.delivered_set()
            bitmap.update(indexes)
            record.delivered = bitmap.encode()
            record.warnings += warnings
            return record

        await self.mutate(task_id, merge)

    async def add_refused(self, task_id: str, generation: int, peer: str,
                          refusals: dict[int, tuple[int | None, str]]) -> ProgressRecord | None:
        """Record instances `peer` refused for good (index -> (status, reason)), unless a manual retry
        started another generation meanwhile (its operator wants everything resent) or the target was
        repointed."""
        if not refusals:
            return None

        def merge(record: ProgressRecord | None) -> ProgressRecord | None:
            if record is None or record.generation != generation or record.delivered_to != peer:
                return None
            groups = {(group.status, group.reason): group for group in record.refused}
            for index, (status, reason) in sorted(refusals.items()):
                if (status, reason) not in groups and len(groups) >= MAX_REFUSAL_REASONS:
                    reason = describe_status(status, "") if status is not None else CONTEXT_REFUSED
                group = groups.setdefault((status, reason), Refusal(status=status, reason=reason, instances=""))
                bitmap = Bitmap.decode(group.instances)
                bitmap.add(index)
                group.instances = bitmap.encode()
            record.refused = list(groups.values())
            return record

        return await self.mutate(task_id, merge)
