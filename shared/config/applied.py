"""Which configuration the running services use: what `caduceus config apply` waits for.

Every service's heartbeat carries `config_seq`, the CONFIG stream sequence whose configuration it
has applied (its `on_config` ran; the receiver's in all of its processes; shared/runtime.py), and
a service publishes one right after it applied a change, so a change is confirmed in a fraction of
a second instead of at the next heartbeat interval.

`wait_applied()` waits until every running instance (a heartbeat younger than 3 intervals, as
`caduceus status` counts it, or one that starts meanwhile) reports at least a given sequence, and
says who did and who did not. An instance that stops or crashes meanwhile (its `service.stopped` /
`service.crashed`) is not waited for: when it starts again it reads the whole configuration before
its first heartbeat.

A sequence counts only on the CONFIG stream it was published on: one created anew (the NATS store
lost or replaced) counts from 1 again, so a heartbeat also says which stream its `config_seq` counts
on (`config_stream`, the stream's creation time), and an instance still on an older stream has not
applied a change of the new one whatever its sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from shared import subjects
from shared.bus import Bus, readable_event
from shared.config.state import config_stream_id
from shared.events import Event, ServiceCrashed, ServiceHeartbeat, ServiceStopped
from shared.health import EXPECTED_SERVICES, instance_health, read_heartbeats

Key = tuple[str, str]  # (service, instance)
AppliedState = Literal["applied", "pending", "stopped", "not reporting"]


class InstanceApplied(BaseModel):
    service: str
    instance: str
    pid: int
    config_seq: int | None     # None: its version does not report it
    # Its config_seq counts on another CONFIG stream than the change (one replaced since).
    other_stream: bool = False
    state: AppliedState        # "pending": running, still at an older sequence
    age_seconds: float         # of its last heartbeat


class AppliedReport(BaseModel):
    seq: int
    waited_seconds: float
    instances: list[InstanceApplied] = Field(default_factory=list)
    # Services without a running instance: the age of the newest heartbeat seen (None: none at all).
    not_running: dict[str, float | None] = Field(default_factory=dict)

    @property
    def confirmed(self) -> bool:
        """Every running instance reported the sequence (one that stopped meanwhile does not count)."""
        return all(i.state in ("applied", "stopped") for i in self.instances)

    def of_state(self, state: AppliedState) -> list[InstanceApplied]:
        return [i for i in self.instances if i.state == state]


class _Watch:
    """The latest heartbeat of every instance, kept current by core NATS subscriptions."""

    def __init__(self) -> None:
        self.latest: dict[Key, tuple[Event, ServiceHeartbeat]] = {}
        self.live: set[Key] = set()      # heard since the subscription, i.e. running now
        self.gone: set[Key] = set()      # stopped or crashed since
        self.changed = asyncio.Event()

    def heartbeat(self, event: Event, live: bool) -> None:
        if event.type != "service.heartbeat":
            return
        try:
            beat = ServiceHeartbeat.model_validate(event.payload)
        except ValidationError:
            return
        key = (beat.service, beat.instance)
        old = self.latest.get(key)
        if old is None or event.occurred_at >= old[0].occurred_at:
            self.latest[key] = (event, beat)
        if live:
            self.live.add(key)
            self.gone.discard(key)
        self.changed.set()

    def ended(self, event: Event) -> None:
        try:
            if event.type == "service.stopped":
                stopped = ServiceStopped.model_validate(event.payload)
                self.gone.add((stopped.service, stopped.instance))
            elif event.type == "service.crashed":
                crashed = ServiceCrashed.model_validate(event.payload)
                self.gone |= {key for key, (_, beat) in self.latest.items()
                              if key[0] == crashed.service and beat.pid == crashed.pid}
        except ValidationError:
            return
        self.changed.set()


def _reports(beat: ServiceHeartbeat) -> bool:
    return "config_seq" in beat.model_fields_set


def _other_stream(beat: ServiceHeartbeat, stream: str) -> bool:
    """Its sequence counts on another CONFIG stream ("" on either side: not known, not compared)."""
    return bool(stream and beat.config_stream and beat.config_stream != stream)


def _applied(beat: ServiceHeartbeat, seq: int, stream: str) -> bool:
    return beat.config_seq >= seq and not _other_stream(beat, stream)


async def wait_applied(bus: Bus, seq: int, *, timeout: float, services: Collection[str] | None = None,
                       expected: Collection[str] = EXPECTED_SERVICES, stream: str | None = None) -> AppliedReport:
    """Wait up to `timeout` s until every running instance reports CONFIG sequence `seq` or later.

    `stream`: the CONFIG stream `seq` was published on (its creation time); None: the one there is now.

    `services`: only instances of these, and wait (up to `timeout`) for each of them to have a running
    instance at all (tests that started them); None: every running instance, and the `expected`
    services that have none are reported as not running.
    """
    started = time.monotonic()
    if stream is None:
        try:
            stream = await config_stream_id(bus)
        except Exception:  # noqa: BLE001 - no CONFIG stream (any more): sequences alone are compared
            stream = ""
    watch = _Watch()

    async def on_heartbeat(msg: Any) -> None:
        event = readable_event(msg)
        if event is not None:
            watch.heartbeat(event, live=True)

    async def on_end(msg: Any) -> None:
        event = readable_event(msg)
        if event is not None:
            watch.ended(event)

    # Subscribed before reading the stored heartbeats: nothing published in between is missed.
    subs = [await bus.nc.subscribe(f"{subjects.STATUS_PREFIX}.>", cb=on_heartbeat),
            await bus.nc.subscribe(subjects.event_subject("service.stopped"), cb=on_end),
            await bus.nc.subscribe(subjects.event_subject("service.crashed"), cb=on_end)]
    try:
        for event in await read_heartbeats(bus):
            watch.heartbeat(event, live=False)
        now = datetime.now(UTC)
        running_at_start = {key for key, (event, _) in watch.latest.items()
                            if instance_health(event, now).state == "healthy"}

        def watched() -> set[Key]:
            keys = running_at_start | watch.live
            return {key for key in keys if services is None or key[0] in services}

        def done() -> bool:
            keys = watched() - watch.gone
            if services is not None and not set(services) <= {service for service, _ in keys}:
                return False
            return all(not _reports(beat) or _applied(beat, seq, stream)
                       for beat in (watch.latest[key][1] for key in keys))

        deadline = started + timeout
        while True:
            watch.changed.clear()
            if done() or (left := deadline - time.monotonic()) <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.changed.wait(), left)
        return _report(watch, watched(), seq, stream, started, expected if services is None else services)
    finally:
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _report(watch: _Watch, keys: set[Key], seq: int, stream: str, started: float,
            expected: Collection[str]) -> AppliedReport:
    now = datetime.now(UTC)
    instances = []
    for key in sorted(keys):
        event, beat = watch.latest[key]
        state: AppliedState
        if key in watch.gone:
            state = "stopped"
        elif not _reports(beat):
            state = "not reporting"
        else:
            state = "applied" if _applied(beat, seq, stream) else "pending"
        instances.append(InstanceApplied(
            service=beat.service, instance=beat.instance, pid=beat.pid,
            config_seq=beat.config_seq if _reports(beat) else None, state=state,
            other_stream=_other_stream(beat, stream),
            age_seconds=instance_health(event, now).age_seconds))
    running = {i.service for i in instances if i.state != "stopped"}
    not_running: dict[str, float | None] = {}
    for service in sorted(set(expected) - running):
        ages = [instance_health(event, now).age_seconds for (name, _), (event, _) in watch.latest.items()
                if name == service]
        not_running[service] = min(ages, default=None)
    return AppliedReport(seq=seq, waited_seconds=round(time.monotonic() - started, 2), instances=instances,
                         not_running=not_running)
