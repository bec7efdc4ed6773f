"""The NATS JetStream connection every service and the CLI use.

- `Bus.connect()` connects (reconnecting forever) and declares the streams idempotently.
- `Bus.publish(event)` sends an event with `Nats-Msg-Id` = event_id (server-side de-duplication)
  and the W3C trace context in the headers, and returns the stream sequence once JetStream has
  stored it.
- `Bus.publish_many(events)` pipelines many publishes and awaits all acks together.
- `ThreadPublisher` publishes from threads outside the event loop (the receiver's association
  threads) through JetStream's asynchronous publish, acks matched on one inbox.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from opentelemetry import propagate, trace

from shared import subjects, telemetry
from shared.events import Event

log = logging.getLogger(__name__)
tracer = trace.get_tracer("caduceus")


class PublishError(RuntimeError):
    """JetStream did not confirm storage of an event."""


class Bus:
    def __init__(self, nc: NATS, js: JetStreamContext, actor: str) -> None:
        self.nc = nc
        self.js = js
        self.actor = actor

    @classmethod
    async def connect(cls, url: str, actor: str, *, declare: bool = True,
                      connect_timeout: float = 5.0, max_reconnect_attempts: int = -1) -> Bus:
        async def on_disconnect() -> None:
            log.warning("disconnected from NATS")

        async def on_reconnect() -> None:
            log.warning("reconnected to NATS")

        async def on_error(exc: Exception) -> None:
            log.warning("NATS error: %s", exc)

        nc = await nats.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()],
            name=actor,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=max_reconnect_attempts,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
            # A pull subscription whose fetch was cancelled never empties its queue, and drain
            # would wait its full timeout (30 s by default) for it; handlers have finished by then.
            drain_timeout=5,
        )
        bus = cls(nc, nc.jetstream(timeout=10), actor)
        if declare:
            await bus.declare_streams()
        return bus

    async def close(self) -> None:
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception:  # noqa: BLE001 - closing anyway
                await self.nc.close()

    async def declare_streams(self) -> None:
        for config in subjects.stream_configs():
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                # Exists with a different config: bring the mutable fields up to date, except the
                # EVENTS stream's max age, which the bookkeeper sets from the configuration
                # (services/bookkeeper/retention.py); any other process would undo it.
                if config.name == subjects.EVENTS_STREAM:
                    existing = await self.js.stream_info(config.name)
                    config.max_age = existing.config.max_age
                await self.js.update_stream(config)

    async def declare_durable(self, durable: subjects.Durable) -> None:
        config = durable.config()
        # The server's consumer create is create-or-update for the mutable fields; a change it
        # refuses (e.g. a different deliver policy) needs an operator decision, so say which durable.
        try:
            await self.js.add_consumer(durable.stream, config)
        except BadRequestError as exc:
            raise RuntimeError(f"durable {durable.stream}/{durable.name} exists with an incompatible "
                               f"configuration: {exc.description}") from exc

    # ------------------------------------------------------------ publishing

    def _headers(self, event: Event) -> dict[str, str]:
        headers: dict[str, str] = {"Nats-Msg-Id": event.event_id, "Caduceus-Type": event.type}
        propagate.inject(headers)
        return headers

    def subject_for(self, event: Event) -> str:
        if event.type.startswith("config."):
            return subjects.config_subject(event.config_kind or "unknown")
        if event.type == "service.heartbeat":
            return subjects.status_subject(event.payload.get("service", "unknown"),
                                           event.payload.get("instance", "unknown"))
        return subjects.event_subject(event.type, event.payload.get("priority"))

    async def publish(self, event: Event, *, timeout: float = 10.0, retries: int = 5,
                      expected_last_seq: int | None = None) -> int:
        """Publish and return the stream sequence. Retries through short outages, then raises.

        `expected_last_seq`: optimistic concurrency; JetStream refuses the message (APIError,
        err_code 10071) unless the stream's last sequence is exactly this.
        """
        subject = self.subject_for(event)
        data = event.to_json()
        with tracer.start_as_current_span(f"publish {event.type}", kind=trace.SpanKind.PRODUCER) as span:
            span.set_attribute("messaging.system", "nats")
            span.set_attribute("messaging.destination.name", subject)
            span.set_attribute("messaging.message.id", event.event_id)
            headers = self._headers(event)
            if expected_last_seq is not None:
                headers["Nats-Expected-Last-Sequence"] = str(expected_last_seq)
            delay = 0.2
            for attempt in range(retries + 1):
                try:
                    ack = await self.js.publish(subject, data, timeout=timeout, headers=headers)
                    return int(ack.seq)
                except (TimeoutError, NatsTimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
                    if attempt == retries:
                        raise PublishError(f"could not publish {event.type} {event.event_id}: {exc!r}") from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 3.0)
        raise AssertionError("unreachable")

    async def publish_many(self, events: Iterable[Event], *, timeout: float = 10.0) -> list[int]:
        return list(await asyncio.gather(*(self.publish(e, timeout=timeout) for e in events)))

    # ------------------------------------------------------------ reading

    async def last_seq(self, stream: str) -> int:
        info = await self.js.stream_info(stream)
        return int(info.state.last_seq)

    async def stream_created(self, stream: str) -> datetime | None:
        """The stream's creation time: which incarnation of it exists now (NotFoundError if none)."""
        return (await self.js.stream_info(stream)).created

    async def get_last_for_subject(self, stream: str, subject: str) -> Event | None:
        try:
            raw = await self.js.get_last_msg(stream, subject)
        except NotFoundError:
            return None
        if raw.data is None:
            return None
        event = Event.from_json(raw.data)
        event.stream, event.stream_seq = stream, raw.seq
        return event


class ThreadPublisher:
    """Publishes events from threads outside the event loop; each gets a future of its sequence.

    Why not `run_coroutine_threadsafe(bus.publish(...))`: that costs the loop a Task, a wait_for
    and a request future per event, and an OpenTelemetry span (~0.3 ms of CPU per image in the
    receiver, docs/performance.md). Here the calling thread builds subject, payload and headers;
    one writer task on the loop hands each message to nats-py's JetStream `publish_async`, whose
    acks arrive on one wildcard inbox, and the caller's future is resolved from the ack. A span
    is recorded only when traces are exported (shared/telemetry.py), so trace context still flows
    whenever someone looks at it.

    Same contract as `Bus.publish(retries=0)`: the future gives the stream sequence once
    JetStream stored the event, or raises PublishError (error reply, no stream, connection closed,
    no ack within the timeout: the caller answers "try again later", it does not retry itself).
    """

    SWEEP_SECONDS = 0.1

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.loop = loop
        self._queue: asyncio.Queue[tuple[Event, str, bytes, dict[str, str], concurrent.futures.Future[int]]] = \
            asyncio.Queue()
        # caller future -> (deadline, the ack future once sent); touched on the loop thread only
        self._waiting: dict[concurrent.futures.Future[int], tuple[float, asyncio.Future[Any] | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._expire())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in list(self._waiting):
            self._fail(future, "publisher stopped")

    def publish(self, event: Event, timeout: float) -> concurrent.futures.Future[int]:
        """Thread-safe; returns at once. The future raises PublishError on failure."""
        return self.publish_batch([(event, None)], timeout)[0]

    def publish_batch(self, events: list[tuple[Event, bytes | None]],
                      timeout: float) -> list[concurrent.futures.Future[int]]:
        """Several events with one wake-up of the loop; each `(event, its to_json() if at hand)`."""
        items = []
        for event, data in events:
            future: concurrent.futures.Future[int] = concurrent.futures.Future()
            if telemetry.exporting():
                with tracer.start_as_current_span(f"publish {event.type}", kind=trace.SpanKind.PRODUCER):
                    headers = self.bus._headers(event)
            else:
                headers = self.bus._headers(event)
            items.append((event, self.bus.subject_for(event), data or event.to_json(), headers, future))
        deadline = time.monotonic() + timeout
        self.loop.call_soon_threadsafe(self._enqueue_all, items, deadline)
        return [item[4] for item in items]

    def _enqueue_all(self, items: list[tuple[Event, str, bytes, dict[str, str], concurrent.futures.Future[int]]],
                     deadline: float) -> None:
        for item in items:
            self._enqueue(item, deadline)

    def _enqueue(self, item: tuple[Event, str, bytes, dict[str, str], concurrent.futures.Future[int]],
                 deadline: float) -> None:
        self._waiting[item[4]] = (deadline, None)
        self._queue.put_nowait(item)

    async def _write(self) -> None:
        while True:
            event, subject, data, headers, future = await self._queue.get()
            if future not in self._waiting:
                continue  # expired while queued
            try:
                ack = await self.bus.js.publish_async(subject, data, headers=headers)
            except Exception as exc:  # noqa: BLE001 - closed, draining, buffer full: not stored
                self._fail(future, f"could not publish {event.type} {event.event_id}: {exc!r}")
                continue
            deadline, _ = self._waiting.get(future, (0.0, None))
            self._waiting[future] = (deadline, ack)
            ack.add_done_callback(functools.partial(self._acked, future, event))

    def _acked(self, future: concurrent.futures.Future[int], event: Event, ack: asyncio.Future[Any]) -> None:
        if self._waiting.pop(future, None) is None or future.done():
            return
        if ack.cancelled():
            future.set_exception(PublishError(f"no acknowledgement for {event.type} {event.event_id}"))
        elif (exc := ack.exception()) is not None:
            future.set_exception(PublishError(f"could not publish {event.type} {event.event_id}: {exc!r}"))
        else:
            future.set_result(int(ack.result().seq))

    def _fail(self, future: concurrent.futures.Future[int], reason: str) -> None:
        _, ack = self._waiting.pop(future, (0.0, None))
        if ack is not None:
            ack.cancel()  # releases nats-py's pending-publish slot
        if not future.done():
            future.set_exception(PublishError(reason))

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(self.SWEEP_SECONDS)
            now = time.monotonic()
            for future, (deadline, _) in list(self._waiting.items()):
                if deadline <= now:
                    self._fail(future, "no acknowledgement from JetStream in time")


async def replay(bus: Bus, filter_subject: str, *, idle_timeout: float = 5.0,
                 start_seq: int = 1) -> AsyncIterator[Event]:
    """Every stored event on `filter_subject` (may contain wildcards) from `start_seq` on, oldest first, then stop.

    An ordered consumer: cheap, nothing left behind on the server. Ends when the consumer reports
    nothing pending (or nothing arrives for `idle_timeout`).
    """
    from nats.js.api import ConsumerConfig, DeliverPolicy

    stream = subjects.CONFIG_STREAM if filter_subject.startswith(subjects.CONFIG_PREFIX) else subjects.EVENTS_STREAM
    info = await bus.js.stream_info(stream, subjects_filter=filter_subject)
    if not sum((info.state.subjects or {}).values()) or start_seq > info.state.last_seq:
        return  # nothing stored on that filter: do not wait for the idle timeout
    if start_seq > 1:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    sub = await bus.js.subscribe(filter_subject, ordered_consumer=True, config=config)
    try:
        if start_seq > 1:
            consumer = await sub.consumer_info()
            if not consumer.num_pending and not (consumer.delivered and consumer.delivered.consumer_seq):
                return  # events on that filter, but none from start_seq on (and none on their way)
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except NatsTimeoutError:
                return  # nothing matches the filter (or the stream went quiet)
            event = readable_event(msg)
            if event is not None:
                yield event
            if msg.metadata.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


def event_from_msg(msg: Msg) -> Event:
    event = Event.from_json(msg.data)
    try:
        meta = msg.metadata
        event.stream = meta.stream
        event.stream_seq = meta.sequence.stream
        event.recorded_at = meta.timestamp
    except Exception:  # noqa: BLE001 - core NATS message without JetStream metadata
        pass
    return event


def readable_event(msg: Msg) -> Event | None:
    """`event_from_msg`, or None (logged) for a message that is not an event: what one-shot readers
    (replay, reading the configuration or the heartbeats) pass over instead of failing on it."""
    try:
        return event_from_msg(msg)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        log.warning("skipping an unreadable message on %s: %s", msg.subject, exc)
        return None


def trace_context(msg: Msg) -> Any:
    return propagate.extract(msg.headers or {})
