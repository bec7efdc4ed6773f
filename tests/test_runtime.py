"""The service runtime against a real nats-server: consume, ack, nak with retry, graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from shared import runtime, subjects
from shared.bus import Bus
from shared.config.model import CaduceusConfig, SettingsItem
from shared.config.state import plan_changes
from shared.events import DispatchRetryRequested, Event, make_event
from shared.runtime import Delivery, Service
from shared.settings import Settings

WORK = subjects.Durable(subjects.EVENTS_STREAM, "test-worker",
                        (subjects.event_subject("dispatch.retry_requested"),), ack_wait=5)


class Worker(Service):
    name = "testworker"

    def __init__(self, settings: Settings, fail_first: int = 0) -> None:
        super().__init__(settings)
        self.seen: list[tuple[str, int]] = []
        self.fail_first = fail_first

    set_up = False

    async def setup(self) -> None:
        self.consume(WORK, self.handle)
        self.set_up = True   # (the runtime has read the EVENTS stream's creation time before this)

    async def handle(self, delivery: Delivery) -> None:
        self.seen.append((delivery.event.task_id or "", delivery.attempt))
        if delivery.attempt <= self.fail_first:
            raise RuntimeError("transient failure")


def _settings(nats_url: str, tmp_path: Path) -> Settings:
    return Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=0.5)


async def _request(bus: Bus, task_id: str) -> None:
    await bus.publish(make_event("dispatch.retry_requested", "test", DispatchRetryRequested(task_id=task_id),
                                 task_id=task_id))


async def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_handler_success_acks_once(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    worker = Worker(_settings(nats_url, tmp_path))
    running = asyncio.create_task(worker.run())
    await _request(bus, "t1")
    await _wait_for(lambda: worker.seen == [("t1", 1)])
    await asyncio.sleep(0.5)
    worker.request_stop("test over")
    await running
    info = await bus.js.consumer_info(subjects.EVENTS_STREAM, WORK.name)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_failing_handler_is_retried_with_delay(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    worker = Worker(_settings(nats_url, tmp_path), fail_first=1)
    running = asyncio.create_task(worker.run())
    await _request(bus, "t2")
    await _wait_for(lambda: len(worker.seen) == 2)
    assert worker.seen == [("t2", 1), ("t2", 2)]
    worker.request_stop()
    await running


async def test_service_follows_configuration(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    worker = Worker(_settings(nats_url, tmp_path))
    running = asyncio.create_task(worker.run())
    await _wait_for(lambda: hasattr(worker, "config_follower") and worker.config_follower.ready.is_set())
    desired = CaduceusConfig(settings=SettingsItem(series_complete_seconds=7))
    await bus.publish_many(plan_changes({}, desired, actor="user:test"))
    await _wait_for(lambda: worker.config.settings.series_complete_seconds == 7)
    worker.request_stop()
    await running


async def test_heartbeats_and_lifecycle_events(nats_url: str, tmp_path: Path, bus: Bus) -> None:
    worker = Worker(_settings(nats_url, tmp_path))
    running = asyncio.create_task(worker.run())
    # (A fixed 1.2 s used to stand in for the start: connect, configuration, setup, first beat.)
    deadline = asyncio.get_running_loop().time() + 10
    while (beat := await bus.get_last_for_subject(subjects.STATUS_STREAM,
                                                  subjects.status_subject("testworker", worker.instance))) is None:
        assert asyncio.get_running_loop().time() < deadline, "no heartbeat"
        await asyncio.sleep(0.05)
    assert beat.type == "service.heartbeat" and beat.payload["pid"] == os.getpid()
    worker.request_stop("bye")
    await running
    started = await bus.get_last_for_subject(subjects.EVENTS_STREAM, "caduceus.events.service.started")
    stopped = await bus.get_last_for_subject(subjects.EVENTS_STREAM, "caduceus.events.service.stopped")
    assert started is not None and stopped is not None and stopped.payload["reason"] == "bye"
    # A stopped instance is history, not a stale row in `caduceus status` for the next hour.
    assert await bus.get_last_for_subject(subjects.STATUS_STREAM,
                                          subjects.status_subject("testworker", worker.instance)) is None


async def test_a_heartbeat_that_loses_its_cancel_does_not_hang_the_stop(
        nats_url: str, tmp_path: Path, bus: Bus) -> None:
    """Python 3.11's asyncio.wait_for (inside every nats-py request) returns the reply instead of
    raising CancelledError when the reply arrives just as its task is cancelled. A heartbeat whose
    publish was answered at the moment the stop cancelled it carried on, and the stop waited for it
    for good (test_sigterm_stops_a_service_process_cleanly hung 2 runs in 10 under CPU load)."""
    worker = Worker(_settings(nats_url, tmp_path))
    running = asyncio.create_task(worker.run())
    await _wait_for(lambda: worker.set_up)
    publish = worker.bus.publish
    beating = asyncio.Event()

    async def publish_answered_as_cancelled(event: Event, **options: Any) -> int:
        if event.type != "service.heartbeat" or beating.is_set():
            return await publish(event, **options)
        beating.set()
        try:
            await asyncio.sleep(3600)   # waiting for JetStream's reply...
        except asyncio.CancelledError:
            return 1   # ...which arrived with the cancel: wait_for returns it, the cancel is lost
        return 1

    worker.bus.publish = publish_answered_as_cancelled  # type: ignore[method-assign]
    await asyncio.wait_for(beating.wait(), 10)
    worker.request_stop("test: stop")
    await asyncio.wait_for(running, 10)
    stopped = await bus.get_last_for_subject(subjects.EVENTS_STREAM, "caduceus.events.service.stopped")
    assert stopped is not None and stopped.payload["reason"] == "test: stop"


def test_sigterm_stops_a_service_process_cleanly(nats_url: str, tmp_path: Path) -> None:
    script = tmp_path / "svc.py"
    script.write_text(textwrap.dedent("""
        from shared.runtime import Service
        class Idle(Service):
            name = "idle"
        Idle().main()
    """))
    env = dict(os.environ, CADUCEUS_NATS_URL=nats_url, CADUCEUS_DATA_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "idle started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


class EventsWorker(Worker):
    follows_events = True


async def test_a_service_following_events_starts_again_when_the_stream_is_created_anew(
        nats_url: str, tmp_path: Path, bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NATS store lost under running services (a wiped volume, a NATS replaced), and the streams
    declared again by the next process that connects: the durables, KV buckets and stream positions
    went with the old store, and the services pulled and replayed in vain for good, so images
    accepted afterwards were neither routed nor sent. A service that follows EVENTS stops with an
    exit code that gets it started again (by `caduceus up`, systemd, a container policy)."""
    monkeypatch.setattr(runtime, "STREAM_CHECK_SECONDS", 0.2, raising=False)
    worker = EventsWorker(_settings(nats_url, tmp_path))
    plain = Worker(_settings(nats_url, tmp_path / "plain"))
    running = [asyncio.create_task(worker.run()), asyncio.create_task(plain.run())]
    # Both started (and know the stream they follow) before it is replaced: a fixed 1 s used to
    # stand in for that, and a worker slower to start would have followed the new stream from the outset.
    await _wait_for(lambda: worker.set_up and plain.set_up)
    await asyncio.sleep(1.0)
    assert not any(task.done() for task in running)  # the same stream all along: nothing to do
    await bus.js.delete_stream(subjects.EVENTS_STREAM)
    await bus.declare_streams()
    await asyncio.wait_for(running[0], 10)
    assert getattr(worker, "exit_code", 0) != 0 and "created anew" in worker.stop_reason
    assert not running[1].done()  # (a service that reads no work from EVENTS carries on)
    plain.request_stop("test done")
    await running[1]


async def test_a_keep_alive_that_loses_its_cancel_stops_reporting_with_the_work() -> None:
    """The in-progress beat of a handler is cancelled when its work ends, and not awaited. A report
    that completed just as it was cancelled (Python 3.11's wait_for, inside nats-py, then returns
    instead of raising) kept the beat running for as long as the process lived."""
    reporting = asyncio.Event()
    reports: list[float] = []

    class Msg:
        async def in_progress(self) -> None:
            reports.append(asyncio.get_running_loop().time())
            if reporting.is_set():
                return
            reporting.set()
            try:
                await asyncio.sleep(3600)  # flushing...
            except asyncio.CancelledError:
                return  # ...done just as the work ended: the cancel is lost

    delivery = Delivery.__new__(Delivery)  # (no event needed for this)
    delivery.msg, delivery.decided = Msg(), False  # type: ignore[assignment]
    async with delivery.keep_alive(every=0.05):
        await asyncio.wait_for(reporting.wait(), 5)
    await asyncio.sleep(0.3)
    assert len(reports) == 1, "the beat carried on after the work ended"


async def _heartbeats(bus: Bus, worker: Service) -> tuple[list[Event], Any]:
    """Every heartbeat `worker` publishes from now on (core subscription), and the subscription."""
    beats: list[Event] = []

    async def collect(msg: Any) -> None:
        beats.append(Event.from_json(msg.data))

    sub = await bus.nc.subscribe(subjects.status_subject(worker.name, worker.instance), cb=collect)
    return beats, sub


async def test_a_configuration_change_is_reported_by_one_heartbeat_at_once(
        nats_url: str, tmp_path: Path, bus: Bus) -> None:
    """The heartbeat says which CONFIG sequence the service applied, and one comes right after a
    change (not at the next interval, 30 s here), one for a burst of changes (`config apply`
    publishes one event per item, each after the previous one's ack)."""
    worker = Worker(Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=30))
    running = asyncio.create_task(worker.run())
    await _wait_for(lambda: worker.set_up)
    subject = subjects.status_subject(worker.name, worker.instance)
    deadline = asyncio.get_running_loop().time() + 10
    while (first := await bus.get_last_for_subject(subjects.STATUS_STREAM, subject)) is None:
        assert asyncio.get_running_loop().time() < deadline, "no heartbeat"
        await asyncio.sleep(0.05)
    assert first.payload["config_seq"] == 0
    beats, sub = await _heartbeats(bus, worker)
    await bus.nc.flush()
    desired = CaduceusConfig.parse({
        "settings": {"series_complete_seconds": 7},
        "targets": {f"t{n}": {"type": "dicom", "host": "127.0.0.1", "port": 11200 + n, "called_aet": f"T{n}"}
                    for n in range(8)}})
    changes = plan_changes({}, desired, actor="user:test")
    published = asyncio.get_running_loop().time()
    seqs = [await bus.publish(event) for event in changes]   # one after the other, as `config apply`
    await _wait_for(lambda: any(b.payload["config_seq"] == seqs[-1] for b in beats), timeout=5)
    assert asyncio.get_running_loop().time() - published < 2, "the change waited for the heartbeat interval"
    await asyncio.sleep(0.3)   # (room for a second heartbeat, were there one)
    assert worker.config.settings.series_complete_seconds == 7
    assert len(beats) <= 2 < len(changes), [b.payload["config_seq"] for b in beats]
    assert beats[-1].payload["config_seq"] == seqs[-1] == worker.config_follower.last_seq
    await sub.unsubscribe()
    worker.request_stop()
    await asyncio.wait_for(running, 10)


async def test_a_stop_while_a_heartbeat_waits_for_more_changes_is_not_held_up(
        nats_url: str, tmp_path: Path, bus: Bus) -> None:
    worker = Worker(Settings(nats_url=nats_url, data_dir=tmp_path, heartbeat_seconds=30))
    running = asyncio.create_task(worker.run())
    await _wait_for(lambda: worker.set_up)
    worker.beat_soon()
    await asyncio.sleep(0.01)
    for _ in range(5):   # a change every 10 ms: the heartbeat keeps waiting for the burst to end
        worker.beat_soon()
        await asyncio.sleep(0.01)
    worker.request_stop("test: stop")
    await asyncio.wait_for(running, 5)
    stopped = await bus.get_last_for_subject(subjects.EVENTS_STREAM, "caduceus.events.service.stopped")
    assert stopped is not None and stopped.payload["reason"] == "test: stop"


async def _heartbeat_of(bus: Bus, worker: Service) -> dict[str, Any]:
    beat = await bus.get_last_for_subject(subjects.STATUS_STREAM, subjects.status_subject(worker.name, worker.instance))
    return beat.payload if beat is not None else {}


async def test_a_service_follows_a_config_stream_created_anew(
        nats_url: str, tmp_path: Path, bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """The NATS store lost under a service that does not follow EVENTS (receiver, cleaner, ui: they
    are not restarted), and the streams declared again. nats-py's ordered consumer resumed after the
    old stream's last sequence, so the service kept the old fold and never saw the new stream's
    changes, while its heartbeat reported the old stream's sequence as applied. While the new stream
    is empty the old configuration stays in force (a lost store must not open a receiver to the
    defaults) and the heartbeat says so; once it has items, their fold is the configuration."""
    from shared.config import state
    from shared.config.applied import wait_applied

    monkeypatch.setattr(state, "STREAM_CHECK_SECONDS", 0.2, raising=False)
    worker = Worker(_settings(nats_url, tmp_path))
    running = asyncio.create_task(worker.run())
    await _wait_for(lambda: worker.set_up)
    for retries in range(2, 6):   # the old stream gets further than the new one will
        old = CaduceusConfig(settings=SettingsItem(allowed_calling_aets=["GOOD"], dispatch_retries=retries))
        await bus.publish_many(plan_changes(worker.config_follower.items, old, actor="user:test"))
    await _wait_for(lambda: worker.config_seq == 4 and worker.config.settings.dispatch_retries == 5)
    old_stream = worker.config_stream
    assert old_stream and (await _heartbeat_of(bus, worker)).get("config_stream") == old_stream

    await bus.js.delete_stream(subjects.CONFIG_STREAM)
    await bus.declare_streams()
    await _wait_for(lambda: worker.config_stream not in ("", old_stream))
    assert worker.config_seq == 0 and worker.config_follower.replaced
    assert worker.config.settings.allowed_calling_aets == ["GOOD"]   # kept: the new stream is empty
    await asyncio.sleep(0.6)   # (a heartbeat: every 0.5 s)
    beat = await _heartbeat_of(bus, worker)
    assert beat["details"].get("config_stream_replaced") is True and beat["config_seq"] == 0, beat

    new = CaduceusConfig(settings=SettingsItem(series_complete_seconds=9))
    [event] = plan_changes({}, new, actor="user:test")
    seq = await bus.publish(event)
    assert seq == 1
    await _wait_for(lambda: worker.config.settings.series_complete_seconds == 9)
    assert worker.config.settings.allowed_calling_aets == [] and not worker.config_follower.replaced
    assert (worker.config_seq, worker.config_stream) == (1, worker.config_follower.stream)
    report = await wait_applied(bus, 1, timeout=5, services=["testworker"])
    assert report.confirmed, report
    beat = await _heartbeat_of(bus, worker)
    assert "config_stream_replaced" not in beat["details"] and beat["config_stream"] == worker.config_stream
    worker.request_stop()
    await running
