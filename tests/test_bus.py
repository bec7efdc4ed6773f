"""The bus against a real nats-server: streams, publish with de-duplication, headers."""

from __future__ import annotations

import time

from nats.js.api import DeliverPolicy

from shared import subjects
from shared.bus import Bus, event_from_msg, replay
from shared.events import Event, ServiceStarted, make_event
from shared.natsserver import EmbeddedNats


def _started() -> Event:
    return make_event("service.started", "test",
                      ServiceStarted(service="x", instance="x-1", pid=1, host="h", version="0"))


async def test_streams_are_declared_idempotently(bus: Bus) -> None:
    await bus.declare_streams()
    await bus.declare_streams()
    names = {s.config.name for s in await bus.js.streams_info()}
    assert {subjects.EVENTS_STREAM, subjects.CONFIG_STREAM, subjects.STATUS_STREAM} <= names


async def test_a_declaration_keeps_the_events_retention_the_bookkeeper_set(bus: Bus) -> None:
    await bus.js.update_stream(subjects.events_stream_config(400))
    await bus.declare_streams()
    assert (await bus.js.stream_info(subjects.EVENTS_STREAM)).config.max_age == 400 * 86400


async def test_replay_from_a_start_sequence(bus: Bus) -> None:
    started = [_started() for _ in range(4)]
    await bus.publish_many(started)
    other_subject = make_event("alert.raised", "test", {"severity": "info", "source": "t", "message": "m"})
    await bus.publish(other_subject)   # sequence 5, on another subject
    subject = subjects.event_subject("service.started")
    assert [e.stream_seq async for e in replay(bus, subject, start_seq=3)] == [3, 4]
    assert [e.event_id async for e in replay(bus, subject)] == [e.event_id for e in started]
    began = time.monotonic()
    assert [e async for e in replay(bus, subject, start_seq=5)] == []   # only other subjects from 5 on
    assert [e async for e in replay(bus, subject, start_seq=6)] == []   # past the end
    assert time.monotonic() - began < 2   # without waiting for the idle timeout


async def test_publish_returns_sequence_and_dedups_by_event_id(bus: Bus) -> None:
    event = _started()
    first = await bus.publish(event)
    again = await bus.publish(event)
    assert first == again == 1
    other = await bus.publish(_started())
    assert other == 2
    assert await bus.last_seq(subjects.EVENTS_STREAM) == 2


async def test_published_event_round_trips_with_metadata_and_headers(bus: Bus) -> None:
    event = make_event("service.started", "test",
                       ServiceStarted(service="x", instance="x-1", pid=1, host="h", version="0"),
                       series_uid="1.2.3", correlation_id="c1")
    await bus.publish(event)
    sub = await bus.js.subscribe("caduceus.events.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    msg = await sub.next_msg(timeout=5)
    got = event_from_msg(msg)
    assert got.event_id == event.event_id and got.series_uid == "1.2.3" and got.correlation_id == "c1"
    assert got.stream == subjects.EVENTS_STREAM and got.stream_seq == 1 and got.recorded_at is not None
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event.event_id
    assert msg.headers["Caduceus-Type"] == "service.started"
    await sub.unsubscribe()


async def test_publish_many_pipelines(bus: Bus) -> None:
    seqs = await bus.publish_many([_started() for _ in range(200)])
    assert sorted(seqs) == list(range(1, 201))


async def test_caused_event_inherits_correlation_and_keys() -> None:
    parent = make_event("service.started", "a", ServiceStarted(service="x", instance="i", pid=1, host="h",
                                                                 version="0"), series_uid="9", correlation_id="c")
    child = parent.caused("service.stopped", "b", {"service": "x", "instance": "i", "reason": "r"})
    assert child.correlation_id == "c" and child.causation_id == parent.event_id and child.series_uid == "9"


def test_priority_goes_into_work_subjects() -> None:
    assert subjects.event_subject("dispatch.requested", "urgent") == "caduceus.events.dispatch.requested.urgent"
    assert subjects.event_subject("dispatch.requested") == "caduceus.events.dispatch.requested.normal"
    assert subjects.event_subject("image.received", "urgent") == "caduceus.events.image.received"


async def test_trace_context_travels_in_headers(bus: Bus) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("producer") as span:
        await bus.publish(_started())
        trace_id = format(span.get_span_context().trace_id, "032x")
    sub = await bus.js.subscribe("caduceus.events.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    msg = await sub.next_msg(timeout=5)
    assert msg.headers is not None and trace_id in msg.headers["traceparent"]
    await sub.unsubscribe()
    assert trace.get_tracer_provider() is not None


async def test_thread_publisher_from_threads_dedups_and_reports_sequences(bus: Bus) -> None:
    import asyncio

    from shared.bus import ThreadPublisher

    publisher = ThreadPublisher(bus, asyncio.get_running_loop())
    await publisher.start()
    try:
        events = [_started() for _ in range(50)]

        def publish_all() -> list[int]:
            futures = [publisher.publish(event, timeout=5) for event in events + events[:5]]
            return [future.result(10) for future in futures]

        sequences = await asyncio.to_thread(publish_all)
        assert sorted(set(sequences)) == list(range(1, 51))
        assert sequences[50:] == sequences[:5]  # same event id: JetStream's de-duplication answers the first seq
        assert await bus.last_seq(subjects.EVENTS_STREAM) == 50
    finally:
        await publisher.stop()


async def test_thread_publisher_fails_instead_of_hanging(bus: Bus, nats_server: EmbeddedNats) -> None:
    import asyncio

    import pytest

    from shared.bus import PublishError, ThreadPublisher

    publisher = ThreadPublisher(bus, asyncio.get_running_loop())
    await publisher.start()
    try:
        nats_server.stop()
        future = publisher.publish(_started(), timeout=0.5)
        with pytest.raises(PublishError):
            await asyncio.wrap_future(future)
    finally:
        await publisher.stop()
