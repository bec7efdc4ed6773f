"""The event contract: one envelope for every event, and the typed payload of each event type.

Every event type used anywhere in caduceus is listed in PAYLOADS below and in docs/events.md
(tests/test_event_catalog.py keeps the two in step). Payload models are plain pydantic models;
`Event.payload` stays a dict on the wire so that an old reader can still store a newer event,
and `Event.typed_payload()` validates it into the model when a handler needs the fields.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def new_event_id() -> str:
    return uuid.uuid4().hex


def deterministic_event_id(*parts: str) -> str:
    """An id derived from what the event is about, so a re-published event de-duplicates.

    Used where a service may publish the same fact again after a crash (router decisions,
    receiver re-announcements): JetStream drops the copy inside the duplicate window and the
    bookkeeper's unique constraint drops it after.
    """
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope. Field names are the project vocabulary (see docs/events.md)."""

    model_config = ConfigDict(extra="ignore")

    event_id: str = Field(default_factory=new_event_id)
    type: str
    schema_version: int = SCHEMA_VERSION
    occurred_at: datetime = Field(default_factory=utcnow)
    actor: str
    correlation_id: str | None = None
    causation_id: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    task_id: str | None = None
    config_kind: str | None = None
    config_name: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)
    # Filled in by the consumer from the JetStream metadata; never sent.
    stream: str | None = Field(default=None, exclude=True)
    stream_seq: int | None = Field(default=None, exclude=True)
    recorded_at: datetime | None = Field(default=None, exclude=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> Event:
        return cls.model_validate_json(data)

    def typed_payload(self) -> BaseModel:
        model = PAYLOADS.get(self.type)
        if model is None:
            raise KeyError(f"unknown event type {self.type!r}")
        return model.model_validate(self.payload)

    def caused(self, type: str, actor: str, payload: BaseModel | dict[str, Any], **keys: Any) -> Event:
        """A follow-up event: same correlation, caused by this one, inheriting the UID keys."""
        inherited = {k: getattr(self, k) for k in ("study_uid", "series_uid", "task_id")}
        inherited.update(keys)
        return make_event(type, actor, payload, correlation_id=self.correlation_id or self.event_id,
                          causation_id=self.event_id, **inherited)


def make_event(type: str, actor: str, payload: BaseModel | dict[str, Any], **fields: Any) -> Event:
    if type not in PAYLOADS:
        raise KeyError(f"event type {type!r} is not in the catalog (shared/events.py)")
    model = PAYLOADS[type]
    data = payload if isinstance(payload, BaseModel) else model.model_validate(payload)
    return Event(type=type, actor=actor, payload=data.model_dump(mode="json"), **fields)


# ---------------------------------------------------------------- service lifecycle

class ServiceStarted(BaseModel):
    service: str
    instance: str
    pid: int
    host: str
    version: str


class ServiceStopped(BaseModel):
    service: str
    instance: str
    reason: str


class ServiceHeartbeat(BaseModel):
    service: str
    instance: str
    pid: int
    uptime_seconds: float
    interval_seconds: float
    details: dict[str, Any] = Field(default_factory=dict)
    # The CONFIG stream sequence whose configuration this instance uses: its on_config has run
    # (the receiver's: in every one of its processes). 0 in heartbeats of versions before it existed.
    config_seq: int = 0
    # Which CONFIG stream `config_seq` counts on: its creation time (shared/config/state.py
    # config_stream_id). A stream created anew (NATS store lost) starts counting from 1 again.
    # "" in heartbeats of versions before it existed.
    config_stream: str = ""


class ServiceCrashed(BaseModel):
    service: str
    pid: int
    exit_code: int | None
    restarts: int
    restart_in_seconds: float
    reason: str = ""   # set when the launcher ended the process itself (e.g. no heartbeat)


class ServiceRestarted(BaseModel):
    service: str
    pid: int
    restarts: int


# ---------------------------------------------------------------- configuration

class ConfigItemChanged(BaseModel):
    kind: Literal["settings", "targets", "rules", "modules"]
    name: str
    item: dict[str, Any] | None  # None for deletions
    comment: str = ""
    changed_fields: list[str] = Field(default_factory=list)  # config.item.updated: which fields differ


# ---------------------------------------------------------------- DICOM ingest

class StoredCopy(BaseModel):
    """The copy of an instance its blob file held when a `superseded` copy was not placed over it,
    read from that file under the placement lock (services/receiver/placing.py).

    Why an event names it: that copy may never get an event of its own (its process was killed
    between placing it and journaling its event, or its publish failed and its sender heard
    0xA700), while the superseded copy's sender heard success. The router routes this copy when
    its batch holds no event of its own for it (services/router/state.py).
    """

    received_stamp: int  # the file's modification time (ns): its copy's shared.blobstore.receipt_stamp
    sha256: str
    size: int
    sop_class_uid: str
    transfer_syntax_uid: str


class ImageReceived(BaseModel):
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    size: int
    sha256: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int
    association_id: str
    # superseded: a copy received later (shared.blobstore.copy_rank) was already stored when this
    # one's file was to be placed (another receiver process's, or found by a replay after a crash);
    # this one's file was not written; `stored` names the copy it lost to, which routers route.
    duplicate: Literal["new", "identical", "replaced", "superseded"] = "new"
    tags: dict[str, str] = Field(default_factory=dict)
    # Only with `superseded`: the stored copy it lost to (None: not known, e.g. an event of an
    # older version, or a file that could not be read; routers then ignore the event).
    stored: StoredCopy | None = None


class ImageQuarantined(BaseModel):
    reason: str
    blob_key: str | None
    size: int
    calling_aet: str
    peer_host: str
    association_id: str
    status: int


class ImageRejected(BaseModel):
    """The instance was refused with a failure status; the sender keeps its copy."""

    reason: str
    status: int
    calling_aet: str
    peer_host: str
    association_id: str


class AssociationAccepted(BaseModel):
    association_id: str
    calling_aet: str
    called_aet: str
    peer_host: str
    peer_port: int


class AssociationRejected(BaseModel):
    calling_aet: str
    called_aet: str
    peer_host: str
    reason: str


class AssociationEnded(BaseModel):
    association_id: str
    calling_aet: str
    peer_host: str
    instances_stored: int
    instances_failed: int
    how: Literal["released", "aborted", "closed"]


# ---------------------------------------------------------------- routing

class SeriesCompleted(BaseModel):
    batch_id: str
    manifest_key: str
    instance_count: int
    first_seq: int
    last_seq: int
    calling_aet: str
    peer_host: str
    trigger: Literal["quiet", "forced"] = "quiet"
    tags: dict[str, str] = Field(default_factory=dict)


class StudyCompleted(BaseModel):
    batch_id: str
    manifest_key: str
    series_uids: list[str]
    instance_count: int
    trigger: Literal["quiet", "required_series", "forced", "force_timeout"]
    # What follows: rules are evaluated ("proceed"), or a force timeout discards/ignores the batch.
    action: Literal["proceed", "discard", "ignore"] = "proceed"
    first_seq: int = 0
    last_seq: int = 0
    calling_aet: str = ""
    peer_host: str = ""
    tags: dict[str, str] = Field(default_factory=dict)


class StudyCompleteRequested(BaseModel):
    reason: str = ""


class RuleEvaluation(BaseModel):
    rule: str
    matched: bool
    error: str | None = None
    missing_tags: list[str] = Field(default_factory=list)


class TaskRef(BaseModel):
    task_id: str
    kind: Literal["dispatch", "process", "notification"]
    rule: str
    target: str | None = None
    modules: list[str] = Field(default_factory=list)


class RouteDecided(BaseModel):
    trigger: Literal["series", "study"]
    batch_id: str
    evaluations: list[RuleEvaluation]
    matched_rules: list[str]
    tasks: list[TaskRef]
    discarded: bool
    reason: str


class RuleFailed(BaseModel):
    rule: str
    filter: str
    error: str


# ---------------------------------------------------------------- work

Priority = Literal["normal", "urgent", "offpeak"]


class DispatchRequested(BaseModel):
    task_id: str
    rule: str
    target: str
    manifest_key: str
    instance_count: int
    priority: Priority = "normal"
    calling_aet: str = ""
    peer_host: str = ""


class DispatchRetryRequested(BaseModel):
    task_id: str
    reason: str = ""


class DispatchStarted(BaseModel):
    task_id: str
    target: str
    attempt: int  # the attempt this send is, counted as in dispatch.attempt_failed
    delivery: int  # JetStream's delivery count of the carrying message: > 1 after a crash or a stop
    instance: str  # the dispatcher instance that sends
    destination: str = ""  # where to, as configured now: CALLED_AET@host:port (TLS); `host: sender` resolved
    to_send: int  # instances the target has not confirmed yet
    already_sent: int  # instances confirmed by earlier attempts


# At most this many per-instance outcomes in one dispatch event (the rest are counted): a series
# of thousands that a peer refuses whole must not make an event larger than NATS takes.
MAX_INSTANCE_OUTCOMES = 500


class InstanceOutcome(BaseModel):
    """What happened to one instance that did not simply get 0x0000 (success) in an attempt."""

    sop_uid: str
    status: int | None = None  # the peer's C-STORE status; None: no response (never sent, aborted...)
    reason: str  # the status's meaning and the peer's Error Comment, or why it was not sent
    # A failure status that a resend cannot change (0xA9xx, 0x0117, 0x0122, 0x0124), or (status None)
    # every presentation context refused as not supported when proposed alone: later attempts of the
    # task do not send this instance again; a manual retry does.
    final: bool = False


class DispatchAttemptFailed(BaseModel):
    task_id: str
    target: str
    attempt: int
    error: str
    sent: int
    failed: int
    retry_in_seconds: float
    reencoded: int = 0  # of `sent`: re-encoded as Implicit VR Little Endian for this peer
    # Each instance of this attempt that got a warning or failed; the others got 0x0000.
    outcomes: list[InstanceOutcome] = Field(default_factory=list)
    outcomes_omitted: int = 0  # beyond MAX_INSTANCE_OUTCOMES
    not_resent: int = 0  # of `failed`: refused for good by an earlier attempt, not sent in this one


class DispatchCompleted(BaseModel):
    task_id: str
    target: str
    sent: int
    warnings: int
    skipped_already_sent: int
    attempt: int
    duration_seconds: float
    reencoded: int = 0  # of `sent`: re-encoded as Implicit VR Little Endian for this peer
    # Instances whose stored copy was replaced by another (a re-send with other content) after
    # this task was routed: not sent here, since their new copy is routed by its own decision.
    changed_since_routed: list[str] = Field(default_factory=list)
    # Each instance of this attempt stored with a warning status; the others got 0x0000.
    outcomes: list[InstanceOutcome] = Field(default_factory=list)
    outcomes_omitted: int = 0  # beyond MAX_INSTANCE_OUTCOMES


class DispatchFailed(BaseModel):
    task_id: str
    target: str
    attempts: int
    error: str
    failed_sop_uids: list[str] = Field(default_factory=list)
    # The instances the peer refused with a status a resend cannot change (InstanceOutcome.final),
    # in any attempt since the request or the last manual retry; the task fails as soon as nothing
    # else is left to send.
    refused: list[InstanceOutcome] = Field(default_factory=list)
    refused_omitted: int = 0  # beyond MAX_INSTANCE_OUTCOMES


class ProcessRequested(BaseModel):
    task_id: str
    rule: str
    modules: list[str]
    manifest_key: str
    instance_count: int
    targets: list[str] = Field(default_factory=list)
    priority: Priority = "normal"


class NotificationRequested(BaseModel):
    task_id: str
    rule: str
    message: str


class RouteRequested(BaseModel):
    """Decide a completed batch again under the rules in force now (`caduceus reroute`)."""

    batch_id: str  # the batch the new decision is made for: `<original>~<request>`, so its tasks are new
    original_batch_id: str
    completed_type: Literal["series.completed", "study.completed"]
    completed: dict[str, Any]  # the payload of the original completion event (manifest, tags, sender)
    reason: str = ""


class SeriesDiscarded(BaseModel):
    batch_id: str
    manifest_key: str
    reason: str


class AlertRaised(BaseModel):
    severity: Literal["info", "warning", "error", "critical"]
    source: str
    message: str


# The catalog. Adding an event type means adding it here and in docs/events.md.
PAYLOADS: dict[str, type[BaseModel]] = {
    "service.started": ServiceStarted,
    "service.stopped": ServiceStopped,
    "service.heartbeat": ServiceHeartbeat,
    "service.crashed": ServiceCrashed,
    "service.restarted": ServiceRestarted,
    "config.item.created": ConfigItemChanged,
    "config.item.updated": ConfigItemChanged,
    "config.item.deleted": ConfigItemChanged,
    "image.received": ImageReceived,
    "image.quarantined": ImageQuarantined,
    "image.rejected": ImageRejected,
    "association.accepted": AssociationAccepted,
    "association.rejected": AssociationRejected,
    "association.ended": AssociationEnded,
    "series.completed": SeriesCompleted,
    "series.discarded": SeriesDiscarded,
    "study.completed": StudyCompleted,
    "study.complete_requested": StudyCompleteRequested,
    "route.requested": RouteRequested,
    "route.decided": RouteDecided,
    "rule.failed": RuleFailed,
    "dispatch.requested": DispatchRequested,
    "dispatch.retry_requested": DispatchRetryRequested,
    "dispatch.started": DispatchStarted,
    "dispatch.attempt_failed": DispatchAttemptFailed,
    "dispatch.completed": DispatchCompleted,
    "dispatch.failed": DispatchFailed,
    "process.requested": ProcessRequested,
    "notification.requested": NotificationRequested,
    "alert.raised": AlertRaised,
}
