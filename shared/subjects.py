"""Subjects, streams, durable consumers and buckets: the one place that names them.

Subject scheme
  caduceus.events.<event type>[.<priority>]  domain events (EVENTS stream, the audit source)
  caduceus.config.<kind>                     configuration events (CONFIG stream)
  caduceus.status.<service>.<instance>       heartbeats (STATUS stream, last one per subject)
  caduceus.rpc.<service>.<method>            request/reply (core NATS, not stored)

Work is not a separate copy of the events: workers read the EVENTS stream through durable pull
consumers filtered on the event types they act on (several processes may pull from one durable;
JetStream hands each message to one of them and redelivers it if it is not acked in time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

PREFIX = "caduceus"
EVENTS_PREFIX = f"{PREFIX}.events"
CONFIG_PREFIX = f"{PREFIX}.config"
STATUS_PREFIX = f"{PREFIX}.status"
RPC_PREFIX = f"{PREFIX}.rpc"

EVENTS_STREAM = "EVENTS"
CONFIG_STREAM = "CONFIG"
STATUS_STREAM = "STATUS"

DAY = 24 * 3600
# How long EVENTS keeps events until the bookkeeper applies `settings.events_retention_days`
# (services/bookkeeper/retention.py); the same default as that setting.
DEFAULT_EVENTS_RETENTION_DAYS = 90

# Event types whose subject carries the task priority as a last token, so that workers can
# pull urgent work from its own durable before normal work.
PRIORITISED_TYPES = ("dispatch.requested", "process.requested")


def event_subject(event_type: str, priority: str | None = None) -> str:
    subject = f"{EVENTS_PREFIX}.{event_type}"
    if event_type in PRIORITISED_TYPES:
        subject += f".{priority or 'normal'}"
    return subject


def config_subject(kind: str) -> str:
    return f"{CONFIG_PREFIX}.{kind}"


def status_subject(service: str, instance: str) -> str:
    return f"{STATUS_PREFIX}.{service}.{_token(instance)}"


def rpc_subject(service: str, method: str) -> str:
    return f"{RPC_PREFIX}.{service}.{method}"


def _token(value: str) -> str:
    """NATS subject tokens may not contain '.', '*', '>' or whitespace."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in value) or "_"


def events_stream_config(max_age_days: float = DEFAULT_EVENTS_RETENTION_DAYS) -> StreamConfig:
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=[f"{EVENTS_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_days * DAY,
        discard=DiscardPolicy.OLD,
        duplicate_window=120,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
    )


def stream_configs() -> list[StreamConfig]:
    return [
        events_stream_config(),
        StreamConfig(
            name=CONFIG_STREAM,
            subjects=[f"{CONFIG_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            duplicate_window=120,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
        ),
        StreamConfig(
            name=STATUS_STREAM,
            subjects=[f"{STATUS_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs_per_subject=1,
            max_age=3600,
            allow_direct=True,
        ),
    ]


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer on a stream, declared by the service that owns it."""

    stream: str
    name: str
    filter_subjects: tuple[str, ...]
    ack_wait: float = 60.0
    max_ack_pending: int = 1000
    max_deliver: int = -1
    description: str = ""
    deliver_policy: DeliverPolicy = field(default=DeliverPolicy.ALL)

    def config(self) -> ConsumerConfig:
        subjects = list(self.filter_subjects)
        return ConsumerConfig(
            durable_name=self.name,
            description=self.description or None,
            deliver_policy=self.deliver_policy,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )


# ---- durables, by owning service

BOOKKEEPER_EVENTS = Durable(EVENTS_STREAM, "bookkeeper-events", (f"{EVENTS_PREFIX}.>",),
                            max_ack_pending=5000, description="audit log: every domain event")
BOOKKEEPER_CONFIG = Durable(CONFIG_STREAM, "bookkeeper-config", (f"{CONFIG_PREFIX}.>",),
                            description="audit log: every configuration event")

# A task waiting for its next attempt or the off-peak window is a message NAKed with a delay, which
# JetStream counts as pending: the limit must hold every task that may be waiting at once (with 100,
# a night of off-peak copies or a PACS down for an hour stopped every other send and manual retry).
# How much runs at once is the dispatcher's own limit (CADUCEUS_DISPATCH_CONCURRENCY).
DISPATCH_MAX_ACK_PENDING = 100_000
DISPATCHER_URGENT = Durable(EVENTS_STREAM, "dispatcher-urgent",
                            (event_subject("dispatch.requested", "urgent"),),
                            ack_wait=60, max_ack_pending=DISPATCH_MAX_ACK_PENDING, description="urgent DICOM sends")
DISPATCHER_NORMAL = Durable(EVENTS_STREAM, "dispatcher-normal",
                            (event_subject("dispatch.requested", "normal"),
                             event_subject("dispatch.requested", "offpeak"),
                             event_subject("dispatch.retry_requested")),
                            ack_wait=60, max_ack_pending=DISPATCH_MAX_ACK_PENDING,
                            description="normal and off-peak sends, manual retries")

PROCESSOR_WORK = Durable(EVENTS_STREAM, "processor",
                         (f"{EVENTS_PREFIX}.process.requested.>",),
                         ack_wait=300, description="processing module runs")


# ---- key/value and object store buckets

ROUTER_STATE_BUCKET = "caduceus-router"      # router checkpoint (lowest open stream sequence)
ROUTER_CHECKPOINT_KEY = "checkpoint"           # read by the bookkeeper too: it keeps those events on EVENTS
BLOB_BUCKET = "caduceus-blobs"               # image files when CADUCEUS_BLOB_STORE=nats
DISPATCH_PROGRESS_BUCKET = "caduceus-dispatch"  # per-task dispatch progress (attempts, delivered instances)
