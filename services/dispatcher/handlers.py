"""Handling `dispatch.requested` and `dispatch.retry_requested`: one attempt per delivery.

The message that carries a task (the original request, or a manual retry that took it over after
it failed) decides its own fate: ack when every instance is delivered, nak(delay) after a failed
attempt, term after the last one (with `dispatch.failed` + `alert.raised` published first).
Follow-up events have deterministic ids (task, generation, attempt), so an attempt repeated after
a crash re-publishes the same facts and JetStream/the bookkeeper drop the copies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from shared.blobstore import BlobError, BlobStore
from shared.bookkeeper_client import BookkeeperClient, BookkeeperError
from shared.bus import Bus, replay
from shared.config.model import CaduceusConfig, DicomTarget
from shared.events import (
    MAX_INSTANCE_OUTCOMES,
    AlertRaised,
    DispatchAttemptFailed,
    DispatchCompleted,
    DispatchFailed,
    DispatchRequested,
    DispatchRetryRequested,
    DispatchStarted,
    Event,
    InstanceOutcome,
    deterministic_event_id,
)
from shared.manifest import Manifest, read_manifest
from shared.runtime import Delivery
from shared.subjects import EVENTS_STREAM, event_subject

from .gate import AssociationGate
from .progress import ProgressRecord, ProgressStore, TaskState
from .schedule import attempt_delay, seconds_until_offpeak
from .sender import Destination, SendItem, SendResult, file_id, is_final_refusal, send_items

log = logging.getLogger(__name__)
ACTOR = "dispatcher"
FLUSH_SECONDS = 0.5  # how often confirmed instances are written to the progress record
# Manifest index -> (the peer's status, None for a presentation context refusal; what it said).
Refusals = dict[int, tuple[int | None, str]]
# Before the one association that takes over from parallel ones the peer refused: time for the peer
# to see them end (a limit that still counts them would refuse that one too).
ONE_ASSOCIATION_PAUSE_SECONDS = 1.0


class AttemptError(Exception):
    """The attempt cannot succeed as things stand (missing target/blob, peer trouble)."""


class HandedBack(Exception):
    """The dispatcher stops while the task waits for an association: nothing was sent, hand it back."""


@dataclass
class Outcome:
    sent: int
    warnings: int
    skipped: int
    failed_sop_uids: list[str]
    error: str  # empty on success
    reencoded: int = 0  # of `sent`: went out as Implicit VR Little Endian (see reencode)
    refused_by_peer: bool = False  # the destination does not take some files as they are
    changed_sop_uids: list[str] = field(default_factory=list)  # replaced in the blob store since routed
    instances: list[InstanceOutcome] = field(default_factory=list)  # warned or failed, one by one
    instances_omitted: int = 0  # beyond MAX_INSTANCE_OUTCOMES
    not_resent: int = 0  # of failed_sop_uids: refused for good by an earlier attempt, not sent in this one
    # Every instance refused for good in this generation (the first MAX_INSTANCE_OUTCOMES), and how many.
    refused: list[InstanceOutcome] = field(default_factory=list)
    refused_count: int = 0
    only_refusals_left: bool = False  # nothing left to send but those: the task fails now


class Dispatcher:
    def __init__(self, bus: Bus, progress: ProgressStore, store: BlobStore,
                 config: Callable[[], CaduceusConfig], keep_alive_seconds: float,
                 counters: dict[str, int], instance: str = ACTOR, gate: AssociationGate | None = None) -> None:
        self.bus = bus
        self.gate = gate or AssociationGate(asyncio.Event())
        self.instance = instance  # named in dispatch.started, so that a task shows who sends it
        self.progress = progress
        self.store = store
        self.config = config
        self.keep_alive_seconds = keep_alive_seconds
        self.counters = counters

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ------------------------------------------------------------ entry point

    async def handle(self, delivery: Delivery) -> None:
        if delivery.event.type == "dispatch.retry_requested":
            await self.handle_retry(delivery)
        elif delivery.event.type == "dispatch.requested":
            await self.handle_request(delivery)
        else:
            log.error("unexpected event type %s on a dispatcher durable", delivery.event.type)
            await delivery.term()

    async def handle_request(self, delivery: Delivery) -> None:
        event = delivery.event
        request = DispatchRequested.model_validate(event.payload)
        record = await self.progress.ensure(event)
        ctx = _log_context(record)
        if record.state == "completed":
            log.info("task %s already completed; redelivery acknowledged", request.task_id, extra=ctx)
            return
        if record.state == "failed":
            log.info("task %s already failed; waiting for a manual retry", request.task_id, extra=ctx)
            await delivery.term()
            return
        if record.carrier != event.event_id:
            # A manual retry took the task over (or this is a re-published copy of the request
            # under another id): that other message carries the task.
            log.info("task %s is carried by event %s; this delivery is acknowledged", request.task_id,
                     record.carrier, extra=ctx)
            return
        if request.priority == "offpeak":
            settings = self.config().settings
            wait = seconds_until_offpeak(datetime.now().astimezone(), settings.offpeak_start,
                                         settings.offpeak_end)
            if wait > 0:
                log.info("off-peak task %s waits %.0f s for the window", request.task_id, wait, extra=ctx)
                await delivery.nak(delay=wait)
                return
        await self.run_attempt(delivery, record)

    async def handle_retry(self, delivery: Delivery) -> None:
        retry = DispatchRetryRequested.model_validate(delivery.event.payload)
        carrier = delivery.event.event_id
        record = await self.progress.get(retry.task_id)
        if record is None:
            # No dispatcher has seen the task yet (or its record expired): this retry runs it; the
            # original request, should it still come, finds another carrier and is acknowledged.
            request = await self.find_request(retry.task_id)
            if request is None:
                log.error("retry requested for unknown task %s", retry.task_id,
                          extra={"task_id": retry.task_id, "series_uid": delivery.event.series_uid})
                await delivery.term()
                return
            record = await self.progress.ensure(request, carrier=carrier)

        def take_over(current: ProgressRecord | None) -> ProgressRecord | None:
            if current is None or current.state == "completed":
                return None
            if current.carrier == carrier:
                return None  # this retry already carries the task (a redelivery of it)
            current.attempts = 0
            current.generation += 1
            current.refused = []  # the operator may have fixed the peer or the data: resend those too
            if current.state == "failed":
                current.state = "pending"
                current.carrier = carrier
            return current

        before = record
        record = await self.progress.mutate(retry.task_id, take_over)
        assert record is not None
        ctx = _log_context(record)
        if record.state == "completed":
            log.info("retry of task %s: already completed, nothing to send", retry.task_id, extra=ctx)
            return
        if record.carrier != carrier:
            log.info("retry of task %s: still being retried, attempt counter reset", retry.task_id, extra=ctx)
            return
        if record.state == "failed":
            log.info("retry of task %s used its attempts; already reported", retry.task_id, extra=ctx)
            await delivery.term()
            return
        log.info("retry of task %s by %s (was %s)", retry.task_id, delivery.event.actor, before.state, extra=ctx)
        await self.run_attempt(delivery, record)

    async def find_request(self, task_id: str) -> Event | None:
        """The original dispatch.requested of a task without a progress record.

        From the bookkeeper's log (it keeps events beyond the stream's retention and finds one task
        at once), else from the EVENTS stream.
        """
        try:
            page = await BookkeeperClient(self.bus, timeout=10).events(
                task_id=task_id, type="dispatch.requested", stream=EVENTS_STREAM, limit=1)
            if page.events:
                return page.events[0].to_event()
        except BookkeeperError as exc:
            log.info("bookkeeper cannot look task %s up (%s); reading the EVENTS stream", task_id, exc)
        async for event in replay(self.bus, event_subject("dispatch.requested", "*")):
            if event.payload.get("task_id") == task_id:
                return event
        return None

    # ------------------------------------------------------------ one attempt

    async def run_attempt(self, delivery: Delivery, record: ProgressRecord) -> None:
        attempt = record.attempts + 1
        started = time.monotonic()
        ctx = _log_context(record)
        log.info("task %s attempt %d", record.task_id, attempt, extra=ctx)
        try:
            async with delivery.keep_alive(every=self.keep_alive_seconds):
                outcome = await self.attempt(record, delivery)
        except HandedBack:
            log.info("task %s handed back at shutdown while it waited for an association", record.task_id, extra=ctx)
            await delivery.nak()
            return
        except asyncio.CancelledError:
            # Shutdown cut the send short (confirmed instances are already recorded): hand the
            # task back now rather than after the ack wait.
            log.info("task %s interrupted by shutdown; handed back", record.task_id, extra=ctx)
            with contextlib.suppress(Exception):
                await asyncio.shield(delivery.nak())
            raise
        if not outcome.error:
            await self._completed(delivery, record, outcome, time.monotonic() - started)
        else:
            await self._failed_attempt(delivery, record, outcome)

    async def attempt(self, record: ProgressRecord, delivery: Delivery) -> Outcome:
        request = DispatchRequested.model_validate(record.request_event().payload)
        try:
            manifest = await self._manifest(request)
            destination = self._destination(request)
        except AttemptError as exc:
            return Outcome(0, 0, 0, [], str(exc))
        previous_peer = record.delivered_to
        if previous_peer != destination.peer():  # (the usual case, the same peer, needs no KV round trip)
            record = await self.progress.deliver_to(record.task_id, destination.peer()) or record
        if previous_peer and previous_peer != destination.peer():
            log.warning("task %s: target %s now points at %s, not %s; every instance is sent there",
                        record.task_id, request.target, destination.peer(), previous_peer,
                        extra=_log_context(record))
        delivered = record.delivered_set()
        # Refused for good by an earlier attempt of this generation: not resent (a manual retry resends).
        refused = {i: said for i, said in record.refusals().items() if i not in delivered}
        todo = [i for i in range(len(manifest.instances)) if i not in delivered and i not in refused]
        skipped = len(manifest.instances) - len(todo) - len(refused)
        if not todo:
            return _refusals_outcome(manifest, destination, refused, skipped, len(refused)) if refused \
                else Outcome(0, 0, skipped, [], "")
        key = f"{request.target}|{destination.peer()}"
        associations = await self._associations(record, request, key, min(self._parallel(request), len(todo)))
        try:
            await self._started(record, delivery, request, destination, len(todo), skipped)
            result, changed = await self._send(record.task_id, manifest, todo, destination, associations)
        except AttemptError as exc:
            return _listed_refusals(manifest, refused, Outcome(
                0, 0, skipped, [manifest.instances[i].sop_uid for i in sorted([*todo, *refused])], str(exc),
                not_resent=len(refused)))
        finally:
            self.gate.give_back(key, associations)
        changed_uids = [manifest.instances[i].sop_uid for i in sorted(changed)]
        if changed_uids:
            log.warning("task %s: %d instance(s) were replaced by other content after the task was routed; "
                        "not sent to %s (their new copies are routed on their own)", record.task_id,
                        len(changed_uids), request.target, extra=_log_context(record))
        missing = sorted(set(todo) - set(result.delivered) - changed)
        new_refusals: Refusals = {
            i: (result.statuses.get(i), result.failed[i]) for i in missing if _refused_for_good(result, i)}
        await self.progress.add_refused(record.task_id, record.generation, destination.peer(), new_refusals)
        outcome = _sent_outcome(manifest, destination, result, len(todo) - len(changed), missing, refused,
                                new_refusals, skipped)
        instances = _instance_outcomes(manifest, result)
        return dataclasses.replace(
            outcome, sent=len(result.delivered), warnings=result.warnings, reencoded=result.reencoded,
            refused_by_peer=result.refused_by_peer, changed_sop_uids=changed_uids,
            instances=instances[:MAX_INSTANCE_OUTCOMES], instances_omitted=max(0, len(instances) - MAX_INSTANCE_OUTCOMES))

    async def _manifest(self, request: DispatchRequested) -> Manifest:
        try:
            return await read_manifest(self.store, request.manifest_key)
        except (BlobError, ValidationError, ValueError) as exc:
            raise AttemptError(f"manifest {request.manifest_key} unreadable: {exc}") from exc

    def _target(self, request: DispatchRequested) -> DicomTarget:
        target = self.config().targets.get(request.target)
        if target is None:
            raise AttemptError(f"target '{request.target}' is not configured")
        return target

    def _destination(self, request: DispatchRequested) -> Destination:
        target = self._target(request)
        host = target.host
        if host == "sender":
            if not request.peer_host:
                raise AttemptError(f"target '{request.target}' sends back to the sender, "
                                   "but the task has no peer_host")
            host = request.peer_host
        return Destination(host, target.port, target.called_aet, target.calling_aet, target.tls)

    async def _associations(self, record: ProgressRecord, request: DispatchRequested, key: str, wanted: int) -> int:
        """How many associations the task opens: `wanted`, or fewer (at least one) for a target with
        max_associations, once this process has that many free for it (the task waits until then)."""
        def limit() -> int | None:
            target = self.config().targets.get(request.target)
            return target.max_associations if target is not None else None

        cap = limit()
        if cap is not None and self.gate.in_use(key) >= cap:
            log.info("task %s waits for one of the %d association(s) to '%s' (%d task(s) waiting in this dispatcher)",
                     record.task_id, cap, request.target, self.gate.waiting() + 1, extra=_log_context(record))
            self.count("tasks_waited_for_associations")
        granted = await self.gate.take(key, limit, wanted)
        if granted is None:
            raise HandedBack()
        return granted

    def _parallel(self, request: DispatchRequested) -> int:
        target = self.config().targets.get(request.target)
        if target is not None and target.parallel_associations:
            return target.parallel_associations
        return self.config().settings.dispatch_parallel_associations

    async def _send(self, task_id: str, manifest: Manifest, todo: list[int], destination: Destination,
                    parallel: int) -> tuple[SendResult, set[int]]:
        """Send the `todo` instances; also returns those whose stored bytes are no longer the ones routed."""
        confirmed: list[tuple[int, int]] = []  # appended by the sender threads (list.append is atomic)
        abort = threading.Event()

        def on_delivered(index: int, status: int) -> None:
            confirmed.append((index, status))

        async with contextlib.AsyncExitStack() as files:
            items = []
            for index in todo:
                instance = manifest.instances[index]
                try:
                    path = await files.enter_async_context(self.store.local_file(instance.blob_key))
                except BlobError as exc:
                    raise AttemptError(f"blob {instance.blob_key} unavailable: {exc}") from exc
                items.append(SendItem(index, instance.sop_uid, instance.sop_class_uid,
                                      instance.transfer_syntax_uid, path))
            items, changed = await asyncio.to_thread(_check_routed, manifest, items)
            sent = asyncio.Event()
            flusher = asyncio.create_task(self._flush_loop(task_id, confirmed, sent))
            try:
                total = await _send_parallel(destination, items, parallel, on_delivered, abort, task_id)
            except asyncio.CancelledError:
                abort.set()  # the threads stop after their current instance
                raise
            finally:
                # The event ends the loop even if the cancellation gets lost: Python 3.11's
                # asyncio.wait_for (inside nats-py requests) swallows a cancel that arrives just as
                # its reply does, and awaiting a loop that lost its cancel would hang the attempt.
                sent.set()
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
                await asyncio.shield(self._flush(task_id, confirmed))
        self.count("instances_sent", len(total.delivered))
        return total, changed | set(total.changed)

    async def _flush_loop(self, task_id: str, confirmed: list[tuple[int, int]], sent: asyncio.Event) -> None:
        while not sent.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sent.wait(), FLUSH_SECONDS)
            if sent.is_set():
                return  # the final flush (after the loop) records the rest
            with contextlib.suppress(Exception):  # the final flush retries what this one missed
                await self._flush(task_id, confirmed)

    async def _flush(self, task_id: str, confirmed: list[tuple[int, int]]) -> None:
        taken = len(confirmed)
        if not taken:
            return
        batch = confirmed[:taken]
        warnings = sum(1 for _, status in batch if status != 0)
        await self.progress.add_delivered(task_id, (index for index, _ in batch), warnings)
        del confirmed[:taken]

    # ------------------------------------------------------------ outcomes

    def _follow_up(self, record: ProgressRecord, delivery: Delivery, type_: str, payload: BaseModel,
                   *id_parts: str) -> Event:
        event = record.request_event().caused(type_, ACTOR, payload)
        event.causation_id = delivery.event.event_id
        event.event_id = deterministic_event_id(type_, record.task_id, str(record.generation), *id_parts)
        return event

    async def _started(self, record: ProgressRecord, delivery: Delivery, request: DispatchRequested,
                       destination: Destination, to_send: int, already_sent: int) -> None:
        # One per delivery of an attempt: a send resumed after a crash is a new fact, with its own id.
        attempt = record.attempts + 1
        await self.bus.publish(self._follow_up(record, delivery, "dispatch.started", DispatchStarted(
            task_id=record.task_id, target=request.target, attempt=attempt, delivery=delivery.attempt,
            instance=self.instance, destination=destination.describe(), to_send=to_send,
            already_sent=already_sent),
            str(attempt), str(delivery.attempt)))

    async def _completed(self, delivery: Delivery, record: ProgressRecord, outcome: Outcome,
                         duration: float) -> None:
        request = DispatchRequested.model_validate(record.request_event().payload)
        current = await self.progress.get(record.task_id) or record
        attempt = current.attempts + 1
        await self.bus.publish(self._follow_up(current, delivery, "dispatch.completed", DispatchCompleted(
            task_id=record.task_id, target=request.target, sent=outcome.sent, warnings=current.warnings,
            skipped_already_sent=outcome.skipped, attempt=attempt, duration_seconds=round(duration, 3),
            reencoded=outcome.reencoded, changed_since_routed=outcome.changed_sop_uids,
            outcomes=outcome.instances, outcomes_omitted=outcome.instances_omitted)))
        if outcome.changed_sop_uids:
            await self.bus.publish(self._follow_up(current, delivery, "alert.raised", AlertRaised(
                severity="warning", source=ACTOR,
                message=f"task {record.task_id} to '{request.target}': {len(outcome.changed_sop_uids)} instance(s) "
                        "were re-sent with other content after this task was routed, so their stored copy is no "
                        "longer the one routed here; they were not sent (the new copies are routed by their own "
                        f"decision; `caduceus bookkeeper events --task {record.task_id} --type dispatch.completed` lists them)"), "changed"))
        await self.progress.mutate(record.task_id, _record_outcome(attempt - 1, "", "completed"))
        self.count("tasks_completed")
        log.info("task %s delivered to %s: %d sent (%d re-encoded), %d already there, %d warnings",
                 record.task_id, request.target, outcome.sent, outcome.reencoded, outcome.skipped, current.warnings,
                 extra=_log_context(record))
        await delivery.ack()

    async def _failed_attempt(self, delivery: Delivery, record: ProgressRecord, outcome: Outcome) -> None:
        request = DispatchRequested.model_validate(record.request_event().payload)
        # Re-read: a manual retry may have reset the counter while this attempt ran.
        current = await self.progress.get(record.task_id) or record
        attempt = current.attempts + 1
        settings = self.config().settings
        max_attempts = max(1, settings.dispatch_retries)
        # Nothing left but refusals a resend cannot change: fail now rather than wait out every retry
        # (unless a manual retry came in meanwhile: it asked for everything to be resent).
        refused_for_good = outcome.only_refusals_left and current.generation == record.generation
        last = attempt >= max_attempts or refused_for_good
        delay = 0.0 if last else attempt_delay(attempt, settings.dispatch_retry_wait_seconds,
                                               settings.dispatch_retry_max_wait_seconds)
        ctx = _log_context(record)
        log.warning("task %s attempt %d/%d failed: %s", record.task_id, attempt, max_attempts, outcome.error,
                    extra=ctx)
        self.count("attempts_failed")
        await self.bus.publish(self._follow_up(current, delivery, "dispatch.attempt_failed", DispatchAttemptFailed(
            task_id=record.task_id, target=request.target, attempt=attempt, error=outcome.error,
            sent=outcome.sent, failed=len(outcome.failed_sop_uids), retry_in_seconds=delay,
            reencoded=outcome.reencoded, outcomes=outcome.instances, outcomes_omitted=outcome.instances_omitted,
            not_resent=outcome.not_resent),
            str(attempt)))
        if not last:
            await self.progress.mutate(record.task_id, _record_outcome(attempt, outcome.error))
            await delivery.nak(delay=delay)
            return
        await self.bus.publish(self._follow_up(current, delivery, "dispatch.failed", DispatchFailed(
            task_id=record.task_id, target=request.target, attempts=attempt, error=outcome.error,
            failed_sop_uids=outcome.failed_sop_uids, refused=outcome.refused,
            refused_omitted=outcome.refused_count - len(outcome.refused))))
        await self.bus.publish(self._follow_up(current, delivery, "alert.raised", AlertRaised(
            severity="error", source=ACTOR,
            message=f"dispatch of task {record.task_id} to '{request.target}' failed after {attempt} "
                    f"attempt(s): {outcome.error}. Files kept; "
                    f"{_what_to_do(outcome, refused_for_good, record.task_id)}")))
        await self.progress.mutate(record.task_id, _record_outcome(attempt, outcome.error, "failed"))
        self.count("tasks_failed")
        log.error("task %s failed after %d attempt(s)", record.task_id, attempt, extra=ctx)
        await delivery.term()


async def _send_parallel(destination: Destination, items: list[SendItem], parallel: int,
                         on_delivered: Callable[[int, int], None], abort: threading.Event,
                         task_id: str) -> SendResult:
    """Send over up to `parallel` associations, each with its share of the items.

    A peer that limits associations per caller rejects those above its limit (or leaves them
    unanswered until the ACSE timeout); their shares then go over one association once the others
    are done, rather than failing at every attempt until the task runs out of retries.
    """
    chunks = [items[i::parallel] for i in range(min(parallel, len(items)))]
    total = SendResult()
    # (With several, one the peer turns away as busy leaves its share to the fallback below.)
    for result in await asyncio.gather(*(
            asyncio.to_thread(send_items, destination, chunk, on_delivered, abort, len(chunks) == 1)
            for chunk in chunks)):
        total.merge(result)
    tried = set(total.delivered) | set(total.failed) | set(total.changed)
    unsent = [item for item in items if item.index not in tried]
    if len(chunks) > 1 and unsent and not abort.is_set():
        log.warning("task %s: %d instance(s) not sent over %d parallel associations to %s (%s); "
                    "sending them over one", task_id, len(unsent), len(chunks), destination.describe(),
                    "; ".join(dict.fromkeys(total.errors)) or "association ended", extra={"task_id": task_id})
        await asyncio.sleep(ONE_ASSOCIATION_PAUSE_SECONDS)
        total.merge(await asyncio.to_thread(send_items, destination, unsent, on_delivered, abort))
    return total


def _refused_for_good(result: SendResult, index: int) -> bool:
    """Failed with a status a resend cannot change, or with every presentation context refused as
    not supported when proposed alone (sender._context_refusal)."""
    if index not in result.failed:
        return False
    status = result.statuses.get(index)
    return index in result.context_refused or (status is not None and is_final_refusal(status))


def _instance_outcomes(manifest: Manifest, result: SendResult) -> list[InstanceOutcome]:
    """The instances of an attempt that got a warning or failed on their own, in manifest order.
    Those never sent because the association failed are not listed: the attempt's error says why."""
    outcomes = []
    for index in sorted(set(result.failed) | set(result.warned)):
        outcomes.append(InstanceOutcome(
            sop_uid=manifest.instances[index].sop_uid, status=result.statuses.get(index),
            reason=result.failed.get(index) or result.warned[index], final=_refused_for_good(result, index)))
    return outcomes


def _listed_refusals(manifest: Manifest, refusals: Refusals, outcome: Outcome) -> Outcome:
    """`outcome` with the instances refused for good (`refusals`: manifest index -> (status, reason))."""
    listed = [InstanceOutcome(sop_uid=manifest.instances[i].sop_uid, status=status, reason=reason, final=True)
              for i, (status, reason) in sorted(refusals.items())]
    return dataclasses.replace(outcome, refused=listed[:MAX_INSTANCE_OUTCOMES], refused_count=len(listed))


def _sent_outcome(manifest: Manifest, destination: Destination, result: SendResult, tried: int,
                  missing: list[int], refused: Refusals, new_refusals: Refusals,
                  skipped: int) -> Outcome:
    """What an attempt that sent `tried` instances leaves (without its counts and per-instance
    outcomes): `missing` not delivered, of which `new_refusals` for good, besides `refused` (for good,
    by an earlier attempt, not sent in this one)."""
    every_refusal = {**refused, **new_refusals}
    if every_refusal and set(missing) <= set(new_refusals):
        return _refusals_outcome(manifest, destination, every_refusal, skipped, len(refused))
    error = _describe_failure(result, tried, destination) if missing else ""
    if error and refused:
        error += f"; {len(refused)} more refused for good by an earlier attempt, not resent"
    return _listed_refusals(manifest, every_refusal, Outcome(
        0, 0, skipped, [manifest.instances[i].sop_uid for i in sorted([*missing, *refused])], error,
        not_resent=len(refused)))


def _refusals_outcome(manifest: Manifest, destination: Destination, refusals: Refusals,
                      skipped: int, not_resent: int) -> Outcome:
    """Nothing is left to send but instances the peer refused in a way a resend cannot change (a
    final status, or presentation contexts it does not support): the task fails now, naming them,
    instead of waiting out every retry."""
    said = sorted({reason for _, reason in refusals.values()})
    error = (f"{len(refusals)} instance(s) refused ({'; '.join(said[:3])}{'; ...' if len(said) > 3 else ''}) "
             f"in a way that a resend to {destination.describe()} cannot change; nothing else is left to send")
    return _listed_refusals(manifest, refusals, Outcome(
        0, 0, skipped, [manifest.instances[i].sop_uid for i in sorted(refusals)], error,
        not_resent=not_resent, only_refusals_left=True))


def _check_routed(manifest: Manifest, items: list[SendItem]) -> tuple[list[SendItem], set[int]]:
    """The items whose file still holds the bytes the router saw, each tied to that very file
    (`SendItem.file_id`: the sender skips it should the file be replaced before it goes out), and
    the manifest indexes of those whose file no longer does.

    A blob is keyed by SOP Instance UID and a re-send with other content replaces it; a task that
    waited (retries, off-peak), or is still sending a large series, would otherwise send content its
    rule never matched.
    """
    routed, changed = [], set()
    for item in items:
        instance = manifest.instances[item.index]
        with open(item.path, "rb") as source:
            stat = os.fstat(source.fileno())
            if not (instance.received_stamp and stat.st_mtime_ns == instance.received_stamp):
                # Not the receiver's stamp of the routed copy: the bytes decide.
                if hashlib.file_digest(source, "sha256").hexdigest() != instance.sha256:
                    changed.add(item.index)
                    continue
        routed.append(dataclasses.replace(item, file_id=file_id(stat), sha256=instance.sha256))
    return routed, changed


def _record_outcome(attempts: int, error: str, state: TaskState | None = None,
                    ) -> Callable[[ProgressRecord | None], ProgressRecord | None]:
    def change(record: ProgressRecord | None) -> ProgressRecord | None:
        if record is None:
            return None
        record.attempts = attempts
        record.last_error = error
        if state:
            record.state = state
        return record
    return change


def _describe_failure(result: SendResult, todo: int, destination: Destination) -> str:
    parts = list(dict.fromkeys(result.errors))
    if result.failed:
        reasons = sorted(set(result.failed.values()))
        parts.append(f"{len(result.failed)} instance(s) refused ({'; '.join(reasons[:3])})")
    not_tried = todo - len(result.delivered) - len(result.failed)
    if not_tried and not result.errors:
        parts.append(f"{not_tried} instance(s) not sent")
    return f"{', '.join(parts) or 'incomplete'} [{len(result.delivered)}/{todo} sent to {destination.describe()}]"


def _what_to_do(outcome: Outcome, refused_for_good: bool, task_id: str) -> str:
    if refused_for_good:
        named = ", ".join(o.sop_uid for o in outcome.refused[:3]) + (", ..." if outcome.refused_count > 3 else "")
        # (status None: refused at negotiation, for its SOP class or transfer syntax, not for its content)
        contexts = any(o.status is None for o in outcome.refused)
        fix = "what the destination accepts from us (it does not accept these SOP classes / transfer syntaxes)" \
            if contexts else "them, or what the destination accepts from us"
        return (f"the refused instance(s) ({named}; every one in this task's dispatch.failed event) fail again "
                f"if sent as they are: correct {fix}, then `caduceus retry {task_id}` resends them.")
    if outcome.refused_by_peer:
        return (f"the destination does not accept these SOP classes / transfer syntaxes, so a retry alone "
                f"fails again: change what the destination accepts (or the rule), then "
                f"`caduceus retry {task_id}`.")
    return f"`caduceus retry {task_id}` resends."


def _log_context(record: ProgressRecord) -> dict[str, Any]:
    request = record.request
    return {"task_id": record.task_id, "series_uid": request.get("series_uid"),
            "study_uid": request.get("study_uid"), "target": request.get("payload", {}).get("target")}
