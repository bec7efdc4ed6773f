"""Health of a running caduceus, read from JetStream: what `caduceus status` and the UI show.

- Services: the last heartbeat of every instance (STATUS stream, one message per subject
  `caduceus.status.<service>.<instance>`). An instance is healthy when its last heartbeat is
  younger than 3x its own interval; a service is healthy when at least one instance is.
- Streams: messages, bytes, first/last sequence, how long messages are kept.
- Consumers: every durable's lag (num_pending = not yet delivered, num_ack_pending = delivered but
  not acked, redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from datetime import UTC, datetime
from typing import Any, Literal

from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import BaseModel, Field

from shared import subjects
from shared.bus import Bus, readable_event
from shared.events import Event, ServiceHeartbeat

EXPECTED_SERVICES = ("receiver", "router", "processor", "dispatcher", "cleaner", "bookkeeper", "ui")
STALE_FACTOR = 3.0

State = Literal["healthy", "stale", "missing"]


class InstanceHealth(BaseModel):
    service: str
    instance: str
    pid: int
    state: State
    age_seconds: float
    interval_seconds: float
    uptime_seconds: float
    last_heartbeat: datetime
    details: dict[str, Any] = Field(default_factory=dict)
    config_seq: int | None = None   # CONFIG sequence it uses (None: its version does not say)


class ServiceHealth(BaseModel):
    service: str
    state: State
    expected: bool
    instances: list[InstanceHealth] = Field(default_factory=list)


class StreamStats(BaseModel):
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumer_count: int
    max_age_seconds: float = 0   # how long the stream keeps a message; 0 = no limit


class ConsumerStats(BaseModel):
    stream: str
    name: str
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    delivered_seq: int
    ack_floor_seq: int


class HealthReport(BaseModel):
    checked_at: datetime
    healthy: bool
    services: list[ServiceHealth]
    streams: list[StreamStats]
    consumers: list[ConsumerStats]


def instance_health(heartbeat: Event, now: datetime) -> InstanceHealth:
    beat = ServiceHeartbeat.model_validate(heartbeat.payload)
    age = max(0.0, (now - heartbeat.occurred_at).total_seconds())
    state: State = "healthy" if age < STALE_FACTOR * beat.interval_seconds else "stale"
    return InstanceHealth(service=beat.service, instance=beat.instance, pid=beat.pid, state=state,
                          age_seconds=round(age, 1), interval_seconds=beat.interval_seconds,
                          uptime_seconds=beat.uptime_seconds, last_heartbeat=heartbeat.occurred_at,
                          details=beat.details,
                          config_seq=beat.config_seq if "config_seq" in beat.model_fields_set else None)


def service_health(heartbeats: list[Event], now: datetime,
                   expected: tuple[str, ...] = EXPECTED_SERVICES) -> list[ServiceHealth]:
    by_service: dict[str, list[InstanceHealth]] = {name: [] for name in expected}
    for heartbeat in heartbeats:
        if heartbeat.type != "service.heartbeat":
            continue
        instance = instance_health(heartbeat, now)
        by_service.setdefault(instance.service, []).append(instance)
    result = []
    for name, instances in by_service.items():
        instances.sort(key=lambda i: (i.state != "healthy", i.age_seconds))
        state: State = "missing"
        if instances:
            state = "healthy" if instances[0].state == "healthy" else "stale"
        result.append(ServiceHealth(service=name, state=state, expected=name in expected, instances=instances))
    return result


def default_instance(service: str, pid: int) -> str:
    """A process's instance name unless CADUCEUS_INSTANCE names it."""
    return f"{service}-{socket.gethostname()}-{pid}"


async def forget_instance(bus: Bus, service: str, instance: str) -> None:
    """Drop an instance's last heartbeat: one that stopped, or died and was replaced, is history
    (its `service.stopped` / `service.crashed` event says so), not a stale row for an hour. Bounded:
    with NATS away it must not hold up a shutdown or the restart of a crashed service."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(bus.js.purge_stream(subjects.STATUS_STREAM,
                                                   subject=subjects.status_subject(service, instance)), 2)


async def read_heartbeats(bus: Bus) -> list[Event]:
    """The last heartbeat of every instance (the STATUS stream keeps one per subject)."""
    info = await bus.js.stream_info(subjects.STATUS_STREAM)
    if info.state.messages == 0:
        return []
    last = info.state.last_seq
    sub = await bus.js.subscribe(f"{subjects.STATUS_PREFIX}.>", ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    heartbeats: list[Event] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except TimeoutError:
                break
            heartbeat = readable_event(msg)
            if heartbeat is not None:
                heartbeats.append(heartbeat)
            pending = msg.metadata.num_pending
            if pending == 0 or (msg.metadata.sequence.stream >= last):
                break
    finally:
        await sub.unsubscribe()
    return heartbeats


async def stream_stats(bus: Bus) -> tuple[list[StreamStats], list[ConsumerStats]]:
    streams: list[StreamStats] = []
    consumers: list[ConsumerStats] = []
    for name in (subjects.EVENTS_STREAM, subjects.CONFIG_STREAM, subjects.STATUS_STREAM):
        try:
            info = await bus.js.stream_info(name)
        except NotFoundError:
            continue
        state = info.state
        streams.append(StreamStats(name=name, messages=state.messages, bytes=state.bytes,
                                   first_seq=state.first_seq, last_seq=state.last_seq,
                                   consumer_count=state.consumer_count,
                                   max_age_seconds=float(info.config.max_age or 0)))
        for consumer in await bus.js.consumers_info(name):
            if not consumer.config.durable_name:
                continue  # ordered/ephemeral readers (config followers, this report) are not work queues
            consumers.append(ConsumerStats(
                stream=name, name=consumer.name, num_pending=consumer.num_pending or 0,
                num_ack_pending=consumer.num_ack_pending or 0,
                num_redelivered=consumer.num_redelivered or 0,
                delivered_seq=(consumer.delivered.stream_seq or 0) if consumer.delivered else 0,
                ack_floor_seq=(consumer.ack_floor.stream_seq or 0) if consumer.ack_floor else 0))
    return streams, consumers


async def collect_health(bus: Bus, expected: tuple[str, ...] = EXPECTED_SERVICES) -> HealthReport:
    now = datetime.now(UTC)
    services = service_health(await read_heartbeats(bus), now, expected)
    streams, consumers = await stream_stats(bus)
    healthy = all(s.state == "healthy" for s in services if s.expected)
    return HealthReport(checked_at=now, healthy=healthy, services=services, streams=streams,
                        consumers=consumers)
