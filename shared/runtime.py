"""The small base every service runs on.

A service subclasses `Service`, sets `name`, and implements `setup()` (declare durables, start
servers) and, if it pulls work, registers consumers with `self.consume(durable, handler)`, or runs
a pull loop of its own (the dispatcher polls two durables at once; the bookkeeper stores batches)
and hands each message to `self.run_handler(handler, msg, limiter)` for the same ack decisions.
`Service.main()` then: connects to NATS, declares streams, follows the configuration, publishes
`service.started`, runs the consumers and a heartbeat, and on SIGTERM/SIGINT stops pulling, lets
in-flight handlers finish (or naks them), publishes `service.stopped` and drains the connection.

Handler contract: `async def handle(delivery: Delivery) -> None`. Returning normally acks (after
the handler's own work is durable). Raising naks with a growing delay. A handler may decide
itself with `delivery.nak(delay)`, `delivery.term()`, and must call `delivery.in_progress()`
while long work runs (or use `delivery.keep_alive()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError
from opentelemetry import trace

from shared import subjects
from shared.bus import Bus, event_from_msg, trace_context
from shared.config.model import CaduceusConfig
from shared.config.state import ConfigFollower
from shared.events import Event, ServiceHeartbeat, ServiceStarted, ServiceStopped, make_event
from shared.health import default_instance, forget_instance
from shared.logging import setup_logging
from shared.settings import Settings, load_settings
from shared.telemetry import setup_tracing

log = logging.getLogger(__name__)
tracer = trace.get_tracer("caduceus")


def _version() -> str:
    """The installed caduceus version, named in service.started (a source tree run in place has none)."""
    try:
        return importlib.metadata.version("caduceus")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


class Delivery:
    """One message from a durable consumer, with its event and its ack decisions."""

    def __init__(self, msg: Msg) -> None:
        self.msg = msg
        self.event: Event = event_from_msg(msg)
        self.decided = False

    @property
    def attempt(self) -> int:
        return int(self.msg.metadata.num_delivered)

    async def ack(self) -> None:
        if not self.decided:
            self.decided = True
            await self.msg.ack_sync()

    async def nak(self, delay: float | None = None) -> None:
        if not self.decided:
            self.decided = True
            await self.msg.nak(delay=delay)

    async def term(self) -> None:
        if not self.decided:
            self.decided = True
            await self.msg.term()

    async def in_progress(self) -> None:
        if not self.decided:
            await self.msg.in_progress()

    @contextlib.asynccontextmanager
    async def keep_alive(self, every: float = 15.0) -> AsyncIterator[None]:
        """Tell JetStream the work is still running, so it is not redelivered to someone else."""
        # Ends with `done`, not only when cancelled: a report that completes just as it is cancelled
        # (Python 3.11's asyncio.wait_for inside nats-py returns then) would otherwise leave the beat
        # running for as long as the process lives (nobody awaits it).
        done = asyncio.Event()

        async def beat() -> None:
            while not done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=every)
                if not done.is_set():
                    with contextlib.suppress(Exception):
                        await self.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            done.set()
            task.cancel()


Handler = Callable[[Delivery], Awaitable[None]]


def retry_delay(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


# How often a service that follows EVENTS checks that the stream is still the one it started on.
STREAM_CHECK_SECONDS = 10.0
# A heartbeat asked for by beat_soon() (a configuration change applied) waits this long for more
# changes of the same burst, and at most the second: a burst gives one heartbeat.
BEAT_SOON_QUIET = 0.05
BEAT_SOON_MAX_DELAY = 1.0
EXIT_STREAM_REPLACED = 75  # EX_TEMPFAIL: stopped to be started again (see Service._watch_events_stream)


class Service:
    name: str = "service"
    # Reads EVENTS through durable consumers, KV state or a replay position (router, dispatcher,
    # bookkeeper, processor): all of it lives in the NATS store, so when the stream is created anew
    # under the running service it stops to be started again (_watch_events_stream).
    follows_events: bool = False

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self.instance = self.settings.instance or default_instance(self.name, os.getpid())
        self.bus: Bus
        self.config_follower: ConfigFollower
        self.stopping = asyncio.Event()
        self.stop_reason = "stopped"
        self.exit_code = 0  # main() exits with it: non-zero asks whoever supervises for a restart
        self.started_at = time.monotonic()
        self._tasks: list[asyncio.Task[Any]] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self.counters: dict[str, int] = {}
        # The CONFIG sequence whose configuration on_config has applied (heartbeat `config_seq`),
        # and the CONFIG stream it counts on (its creation time, heartbeat `config_stream`).
        self.config_seq = 0
        self.config_stream = ""
        self._beat_soon = asyncio.Event()   # publish a heartbeat before the interval is over

    # ------------------------------------------------------------ hooks for subclasses

    async def setup(self) -> None:
        """Declare durables, open servers, register consumers."""

    async def teardown(self) -> None:
        """Close what setup opened (called after consumers stopped)."""

    def health_details(self) -> dict[str, Any]:
        """Extra fields for the heartbeat (queue sizes, open associations...)."""
        return dict(self.counters)

    def on_config(self, config: CaduceusConfig) -> None:
        """Called when the configuration changed (on the event loop). What it hands elsewhere
        (threads, other processes) must be in use when it returns, or the service must override
        `applied_config_seq()`: the heartbeat tells `caduceus config apply` the change is in force."""

    def applied_config_seq(self) -> int:
        """The CONFIG sequence this service uses throughout, for the heartbeat."""
        return self.config_seq

    def beat_soon(self) -> None:
        """Publish a heartbeat shortly (what it reports changed); a burst of calls gives one."""
        self._beat_soon.set()

    @property
    def config(self) -> CaduceusConfig:
        return self.config_follower.config

    # ------------------------------------------------------------ running

    def main(self) -> None:
        setup_logging(self.name, self.settings.log_level)
        setup_tracing(self.name)
        try:
            asyncio.run(self.run())
        except KeyboardInterrupt:
            pass
        if self.exit_code:
            sys.exit(self.exit_code)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.bus = await Bus.connect(self.settings.nats_url, actor=self.name)
        self.config_follower = ConfigFollower(self.bus, on_change=self._apply_config)
        await self.config_follower.start()
        await self.config_follower.wait_ready()
        events_created = await self._events_created() if self.follows_events else None
        await self.setup()
        await self.publish(make_event("service.started", self.name, ServiceStarted(
            service=self.name, instance=self.instance, pid=os.getpid(), host=socket.gethostname(),
            version=VERSION)))
        self._tasks.append(asyncio.create_task(self._heartbeat()))
        if self.follows_events:
            self.spawn(self._watch_events_stream(events_created))
        log.info("%s started", self.name, extra={"data": {"instance": self.instance}})
        await self.stopping.wait()
        await self._shutdown()

    def _apply_config(self, config: CaduceusConfig) -> None:
        self.on_config(config)
        # (Not reached when on_config raised: the heartbeat keeps the sequence it did apply.)
        self.config_seq = self.config_follower.last_seq
        self.config_stream = self.config_follower.stream
        self.beat_soon()

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stopping.is_set():
            log.info("stopping: %s", reason)
            self.stop_reason = reason
            self.stopping.set()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._inflight:
            log.info("waiting for %d in-flight handler(s)", len(self._inflight))
            _, pending = await asyncio.wait(self._inflight, timeout=20)
            for task in pending:
                task.cancel()  # the handler's message is not acked and will be redelivered
        await self.teardown()
        with contextlib.suppress(Exception):
            await self.publish(make_event("service.stopped", self.name, ServiceStopped(
                service=self.name, instance=self.instance, reason=self.stop_reason)))
        await forget_instance(self.bus, self.name, self.instance)
        await self.config_follower.stop()
        await self.bus.close()

    async def publish(self, event: Event) -> int:
        return await self.bus.publish(event)

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run a background loop that is cancelled at shutdown."""
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    async def _events_created(self) -> datetime | None:
        """The EVENTS stream's creation time: which incarnation of it this process follows."""
        return await self.bus.stream_created(subjects.EVENTS_STREAM)

    async def _watch_events_stream(self, created: datetime | None) -> None:
        """Stop, to be started again, once the EVENTS stream is gone or was created anew.

        A NATS store lost or replaced under running services takes the durable consumers, the KV
        buckets (router checkpoint, dispatch progress) and the stream positions with it: pulls then
        failed for good and the router waited for sequences the new stream would reach only much
        later, so images accepted after the streams were declared again were neither routed nor
        sent, while every heartbeat looked healthy (found by a loss-hunting review). A fresh start
        declares everything again and follows the new stream from its start (the bookkeeper keeps
        the old one's rows, services/bookkeeper/incarnation.py).
        """
        missing = 0
        while not self.stopping.is_set():
            await asyncio.sleep(STREAM_CHECK_SECONDS)
            try:
                now: datetime | None = await self._events_created()
            except NotFoundError:
                # Gone (the next start declares it), unless a restarting server has not loaded its
                # streams yet: only when it is still missing at the next check.
                missing += 1
                if missing < 2:
                    continue
                now = None
            except Exception:  # noqa: BLE001 - NATS unreachable for now: nothing to conclude
                continue
            else:
                missing = 0
            if now is not None and now == created:
                continue
            log.error("the EVENTS stream was %s since this process started (NATS store lost or replaced): "
                      "stopping to start again on the new one", "created anew" if now else "removed")
            self.exit_code = EXIT_STREAM_REPLACED
            self.request_stop("the EVENTS stream was created anew (or removed): starting again to follow it")
            return

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_seconds
        # Ends with `stopping`, not only when cancelled: Python 3.11's asyncio.wait_for, inside every
        # nats-py request, returns the reply instead of raising CancelledError when the reply arrives
        # just as the task is cancelled. A heartbeat answered at that moment carried on for good and
        # the stop, waiting for it, hung until `caduceus up` killed the service (no service.stopped).
        # (Every wait below ends with `stopping` too.)
        while not self.stopping.is_set():
            self._beat_soon.clear()   # (before the payload: a change after it asks for the next beat)
            with contextlib.suppress(Exception):
                await self.bus.publish(make_event("service.heartbeat", self.name, ServiceHeartbeat(
                    service=self.name, instance=self.instance, pid=os.getpid(),
                    uptime_seconds=round(time.monotonic() - self.started_at, 1),
                    interval_seconds=interval, details=self._details(),
                    config_seq=self.applied_config_seq(), config_stream=self.config_stream)),
                    retries=0, timeout=2)
            if await self._woken(interval):
                await self._quiet_period()

    def _details(self) -> dict[str, Any]:
        details = self.health_details()
        if self.config_follower.replaced:
            # The CONFIG stream was created anew and is still empty: the configuration in force is
            # the one folded from the old stream (shared/config/state.py ConfigFollower).
            details["config_stream_replaced"] = True
        return details

    async def _woken(self, timeout: float) -> bool:
        """Wait up to `timeout` for `beat_soon()` or the stop; True for `beat_soon()` (not stopping)."""
        waiters = [asyncio.ensure_future(self.stopping.wait()), asyncio.ensure_future(self._beat_soon.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self._beat_soon.is_set() and not self.stopping.is_set()

    async def _quiet_period(self) -> None:
        """After `beat_soon()`: until no call for BEAT_SOON_QUIET seconds (at most BEAT_SOON_MAX_DELAY).

        `caduceus config apply` publishes one event per changed item, each after the previous one's
        ack: without this, a change of ten items gave ten heartbeats in a few milliseconds.
        """
        deadline = time.monotonic() + BEAT_SOON_MAX_DELAY
        while (left := deadline - time.monotonic()) > 0:
            self._beat_soon.clear()
            if not await self._woken(min(BEAT_SOON_QUIET, left)):
                return

    # ------------------------------------------------------------ consumers

    def consume(self, durable: subjects.Durable, handler: Handler, *, batch: int = 10,
                concurrency: int = 1, paused: Callable[[], bool] | None = None) -> None:
        """Pull from a durable and run `handler` on each message (call from `setup()`)."""
        self._tasks.append(asyncio.create_task(
            self._consume_loop(durable, handler, batch, concurrency, paused)))

    async def _consume_loop(self, durable: subjects.Durable, handler: Handler, batch: int,
                            concurrency: int, paused: Callable[[], bool] | None) -> None:
        await self.bus.declare_durable(durable)
        sub = await self.bus.js.pull_subscribe_bind(durable=durable.name, stream=durable.stream)
        try:
            await self._pull(durable, sub, handler, batch, concurrency, paused)
        finally:
            # Without this, draining the connection at shutdown waits for the pull queue (see Bus).
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _pull(self, durable: subjects.Durable, sub: Any, handler: Handler, batch: int,
                    concurrency: int, paused: Callable[[], bool] | None) -> None:
        limiter = asyncio.Semaphore(concurrency)
        while not self.stopping.is_set():
            if paused is not None and paused():
                await asyncio.sleep(1)
                continue
            try:
                msgs = await sub.fetch(batch, timeout=1)
            except (TimeoutError, NatsTimeoutError):
                continue
            except Exception as exc:  # noqa: BLE001 - connection trouble: back off and pull again
                log.warning("fetch from %s failed: %s", durable.name, exc)
                await asyncio.sleep(1)
                continue
            for msg in msgs:
                await limiter.acquire()
                task = asyncio.create_task(self.run_handler(handler, msg, limiter))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            if concurrency == 1 and self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def run_handler(self, handler: Handler, msg: Msg, limiter: asyncio.Semaphore) -> None:
        try:
            delivery = Delivery(msg)
        except Exception as exc:  # noqa: BLE001 - unreadable message: never block the consumer on it
            log.error("unreadable message on %s: %s", msg.subject, exc)
            with contextlib.suppress(Exception):
                await msg.term()
            limiter.release()
            return
        event = delivery.event
        ctx = {"event_type": event.type, "event_id": event.event_id, "series_uid": event.series_uid,
               "study_uid": event.study_uid, "task_id": event.task_id}
        try:
            event.typed_payload()
        except Exception as exc:  # noqa: BLE001 - it will never fit: set it aside instead of retrying forever
            log.error("event %s on %s does not fit its type, set aside (terminated; the audit log keeps it): %s",
                      event.event_id, msg.subject, exc, extra=ctx)
            with contextlib.suppress(Exception):
                await delivery.term()
            limiter.release()
            return
        try:
            with tracer.start_as_current_span(f"handle {event.type}", context=trace_context(msg),
                                              kind=trace.SpanKind.CONSUMER):
                await handler(delivery)
            await delivery.ack()
        except asyncio.CancelledError:
            raise
        except Exception:
            delay = retry_delay(delivery.attempt)
            log.exception("handler failed (attempt %d), retry in %.0fs", delivery.attempt, delay, extra=ctx)
            with contextlib.suppress(Exception):
                await delivery.nak(delay=delay)
        finally:
            limiter.release()


def run_service(service_cls: type[Service]) -> None:
    service_cls().main()
