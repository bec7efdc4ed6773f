"""The router: groups received instances into series/study batches, completes them, decides routes.

One loop (spawned at setup) reads the EVENTS stream with an ordered consumer, filtered on the
subjects the router folds (see state.py), starting at the checkpoint kept in the KV bucket
`caduceus-router`. Until it has caught up with the stream it only rebuilds state; after that it
also completes quiet batches (manifest blob + series.completed / study.completed) and decides
completed batches (decide.py). Completion and decision events come back through the same consumer,
so the live path and the replay path fold the same events.

Completion is checked at least once per second (TICK_SECONDS), and also at the moment the earliest
open series becomes due (its last arrival plus its quiet period), so a series is not left waiting
for the next whole-second tick; a series opened between ticks brings that moment forward itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import ConsumerConfig, DeliverPolicy, KeyValueConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from services.router.completion import StudyDue, series_due_at, study_due
from services.router.decide import decide
from services.router.state import Batch, RouterState
from shared import subjects
from shared.blobstore import BlobStore, open_blob_store, receipt_stamp
from shared.bus import event_from_msg
from shared.events import (
    AlertRaised,
    Event,
    SeriesCompleted,
    StudyCompleted,
    deterministic_event_id,
    make_event,
    utcnow,
)
from shared.manifest import Manifest, ManifestInstance, write_manifest
from shared.rule_order import enabled_rules
from shared.runtime import Service

log = logging.getLogger(__name__)

FOLDED_TYPES = ("image.received", "series.completed", "study.completed", "study.complete_requested",
                "route.requested", "route.decided")
TICK_SECONDS = 1.0
MIN_TICK_SECONDS = 0.05   # many series falling due one after another are checked together
POLL_SECONDS = 0.25
MIN_WAIT_SECONDS = 0.005
IDLE_CHECKPOINT_SECONDS = 30.0   # how often a router with nothing open moves its checkpoint to the head


class RouterService(Service):
    name = "router"
    follows_events = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = RouterState()
        self.caught_up = False
        # Where the fold is in the stream. While messages are still pending, quiet-time completion
        # may only use the stream time reached so far: with wall-clock time, a router that fell
        # behind (a restart, a slow round) would see every series it has only partly folded as
        # quiet, and complete it one instance at a time.
        self.behind = False
        self.folded_until: datetime | None = None
        self.decided: set[str] = set()   # decided here, route.decided not folded yet
        self.blobs: BlobStore
        self.kv: KeyValue
        self._saved_checkpoint = 0
        self._sub: Any = None
        self._next_tick = 0.0   # time.time() of the next completion check
        self._folded_seq = 0    # stream sequence of the last message the loop has folded
        self._next_idle_advance = 0.0

    async def setup(self) -> None:
        self.blobs = open_blob_store(self.settings.blob_store, self.settings.data_dir, self.bus.js)
        self.kv = await self._bucket()
        start = await self._load_checkpoint()
        await self._check_checkpoint_kept(start)
        self.state.last_seq = start - 1   # nothing to replay means the checkpoint stays where it is
        log.info("router replays EVENTS from sequence %d", start)
        self._sub = await self.bus.js.subscribe(
            subjects.event_subject("image.received"), stream=subjects.EVENTS_STREAM, ordered_consumer=True,
            config=ConsumerConfig(filter_subjects=[subjects.event_subject(t) for t in FOLDED_TYPES],
                                  deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start))
        self.spawn(self._loop())

    async def teardown(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def health_details(self) -> dict[str, Any]:
        return {**self.counters, "open_series": len(self.state.series), "open_studies": len(self.state.studies),
                "undecided": len(self.state.pending), "checkpoint": self.state.checkpoint(),
                "caught_up": self.caught_up}

    # ------------------------------------------------------------ checkpoint

    async def _bucket(self) -> KeyValue:
        try:
            return await self.bus.js.key_value(subjects.ROUTER_STATE_BUCKET)
        except BucketNotFoundError:
            return await self.bus.js.create_key_value(KeyValueConfig(
                bucket=subjects.ROUTER_STATE_BUCKET, history=5,
                description="router checkpoint: lowest EVENTS sequence of any open batch"))

    async def _load_checkpoint(self) -> int:
        try:
            entry = await self.kv.get(subjects.ROUTER_CHECKPOINT_KEY)
        except (NotFoundError, KeyError):
            return 1
        value = int((entry.value or b"1").decode())
        self._saved_checkpoint = value
        return max(1, value)

    async def _check_checkpoint_kept(self, start: int) -> None:
        """Say so when the stream no longer holds the first events of our open batches.

        The configuration keeps events longer than any batch stays open (settings.
        events_retention_days), so this means the router was stopped for longer than that. The
        replay then starts at the oldest event the stream still has: batches whose first events
        expired are routed without them, or not at all. Their images are in the blob store and their
        events in the bookkeeper's log.
        """
        first = (await self.bus.js.stream_info(subjects.EVENTS_STREAM)).state.first_seq
        if start >= first or start <= 1:
            return
        message = (f"the router's checkpoint (EVENTS sequence {start}) has expired from the stream (it now "
                   f"starts at {first}): series and studies that were open before the router stopped may be "
                   "routed without their first images or not at all; their images are kept in the blob "
                   "store and their events in the bookkeeper's log")
        log.error("%s", message)
        await self.publish(make_event("alert.raised", self.name, AlertRaised(
            severity="error", source="router", message=message)))

    async def _advance_idle_checkpoint(self) -> None:
        """With no batch open, move the checkpoint over the events the router does not fold.

        Otherwise it stays at the event after the last image while the stream moves on: the
        bookkeeper keeps the stream's events from the checkpoint on (its retention) and would report
        the router as behind, and a router restarted after a long quiet time would replay from
        there. Safe only when every event up to the stream's head that the router folds has been
        folded: the consumer has none pending and has delivered nothing the loop has not folded.
        """
        now = time.time()
        if now < self._next_idle_advance or self.state.series or self.state.studies or self.state.pending:
            return
        self._next_idle_advance = now + IDLE_CHECKPOINT_SECONDS
        head = (await self.bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        if head <= self.state.last_seq:
            return
        info = await self._sub.consumer_info()
        delivered = (info.delivered.stream_seq or 0) if info.delivered else 0
        if info.num_pending or self._sub.pending_msgs or delivered > self._folded_seq:
            return
        self.state.last_seq = head

    async def _save_checkpoint(self) -> None:
        checkpoint = self.state.checkpoint()
        if checkpoint != self._saved_checkpoint:
            await self.kv.put(subjects.ROUTER_CHECKPOINT_KEY, str(checkpoint).encode())
            self._saved_checkpoint = checkpoint

    # ------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while not self.stopping.is_set():
            wait = min(POLL_SECONDS, max(MIN_WAIT_SECONDS, self._next_tick - time.time()))
            try:
                msg = await self._sub.next_msg(timeout=wait)
            except (NatsTimeoutError, TimeoutError):
                msg = None
                self.behind = False  # nothing arrived for a while: the fold is at the stream's head
            try:
                if msg is not None:
                    self._fold(msg)
                elif not self.caught_up:
                    info = await self._sub.consumer_info()
                    self._mark_caught_up(info.num_pending == 0)
                if not self.caught_up:
                    continue
                if self.state.pending:
                    await self._decide_pending()
                if time.time() >= self._next_tick:
                    await self._tick()
                    await self._advance_idle_checkpoint()
                    await self._save_checkpoint()
            except Exception:  # noqa: BLE001 - broker trouble: keep the state, retry on the next round
                log.exception("router round failed; retrying")
                self.counters["errors"] = self.counters.get("errors", 0) + 1
                await self._pause()

    async def _pause(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=1.0)

    def _fold(self, msg: Any) -> None:
        meta = msg.metadata
        # Not yet sent by the server, or sent and waiting in the client's queue.
        self.behind = meta.num_pending > 0 or self._sub.pending_msgs > 0
        self.folded_until = meta.timestamp
        self._apply(msg)
        self._folded_seq = max(self._folded_seq, meta.sequence.stream)
        self._mark_caught_up(not self.behind)

    def _apply(self, msg: Any) -> None:
        try:
            event = event_from_msg(msg)
        except Exception as exc:  # noqa: BLE001 - one unreadable message must not stop routing
            log.error("unreadable event on %s: %s", msg.subject, exc)
            return
        opens = (self.caught_up and event.type == "image.received" and event.series_uid is not None
                 and event.series_uid not in self.state.series)
        try:
            self.state.apply(event)
        except Exception as exc:  # noqa: BLE001 - a payload that does not fit its type: set aside
            # (apply validates before it changes anything, so the state is as before)
            log.error("event %s (%s, stream seq %s) does not fit its type, skipped: %s", event.event_id,
                      event.type, event.stream_seq, exc, extra={"series_uid": event.series_uid})
            self.counters["skipped_events"] = self.counters.get("skipped_events", 0) + 1
            return
        if opens and event.series_uid in self.state.series:
            # A new series may become due before the next scheduled check (quiet period < 1 s).
            due = series_due_at(self.state.series[event.series_uid], self.config).timestamp()
            self._next_tick = min(self._next_tick, due)
        if event.type == "route.decided":
            self.decided.discard(str(event.payload.get("batch_id", "")))

    def _completion_now(self) -> datetime:
        """The time quiet periods are measured against (see `behind`)."""
        now = utcnow()
        if self.behind and self.folded_until is not None:
            return min(now, self.folded_until)
        return now

    def _mark_caught_up(self, nothing_pending: bool) -> None:
        if nothing_pending and not self.caught_up:
            self.caught_up = True
            log.info("router caught up at sequence %d: %d open series, %d open studies, %d undecided",
                     self.state.last_seq, len(self.state.series), len(self.state.studies),
                     len(self.state.pending))

    # ------------------------------------------------------------ deciding

    def _study_tags(self, completed: Event) -> dict[str, str] | None:
        """The tags the decision of a series' study will see: its study batch's first instance."""
        study = self.state.studies.get(completed.study_uid or "") if completed.type == "series.completed" else None
        return study.first.received.tags if study is not None and study.instances else None

    async def _decide_pending(self) -> None:
        for batch_id, pending in list(self.state.pending.items()):
            if batch_id in self.decided:
                continue
            completed = pending.completed_event
            events = decide(completed, self.config, rerouted=pending.rerouted,
                            study_tags=self._study_tags(completed))
            # route.decided goes last: once it is stored the batch counts as decided.
            await self.bus.publish_many(events[:-1])
            await self.publish(events[-1])
            self.decided.add(batch_id)
            self.counters["decided"] = self.counters.get("decided", 0) + 1
            if any(event.type == "series.discarded" for event in events):
                # Visible in `caduceus status`: a series no rule wanted is otherwise only in the audit log.
                self.counters["discarded"] = self.counters.get("discarded", 0) + 1
            log.info("%s batch %s decided: %s", pending.level, batch_id, events[-1].payload.get("reason"),
                     extra={"series_uid": completed.series_uid, "study_uid": completed.study_uid})

    # ------------------------------------------------------------ completing

    async def _tick(self) -> None:
        config, now = self.config, self._completion_now()
        next_tick = time.time() + TICK_SECONDS
        earliest = time.time() + MIN_TICK_SECONDS
        for batch in list(self.state.series.values()):
            due_at = series_due_at(batch, config)
            if due_at <= now:
                await self._complete_series(batch)
            else:
                next_tick = min(next_tick, due_at.timestamp())
        self._next_tick = max(earliest, next_tick)
        study_rules = enabled_rules(config, "study")
        for uid, batch in list(self.state.studies.items()):
            if not study_rules and batch.awaited:
                # Its series were left to study rules that are gone now: decided all the same (no
                # rule matches: discarded, with its reason), not dropped with them undecided.
                await self._complete_study(batch, StudyDue("quiet"))
                continue
            if not study_rules:
                del self.state.studies[uid]  # nobody routes studies: do not hold them (or the checkpoint)
                continue
            due = study_due(batch, config, now)
            if due is not None:
                await self._complete_study(batch, due)

    async def _write_manifest(self, batch: Batch) -> str:
        return await write_manifest(self.blobs, batch_manifest(batch))

    async def _complete_series(self, batch: Batch) -> None:
        key = await self._write_manifest(batch)
        first = batch.first.received
        payload = SeriesCompleted(batch_id=batch.batch_id, manifest_key=key, instance_count=len(batch.instances),
                                  first_seq=batch.first_seq, last_seq=batch.last_seq,
                                  calling_aet=first.calling_aet, peer_host=first.peer_host, trigger="quiet",
                                  tags=first.tags)
        event = make_event("series.completed", self.name, payload, correlation_id=batch.batch_id,
                           causation_id=batch.last.event_id, study_uid=batch.study_uid, series_uid=batch.uid)
        event.event_id = deterministic_event_id("series.completed", batch.batch_id)
        await self.publish(event)
        self.state.remove(batch)
        self.counters["series_completed"] = self.counters.get("series_completed", 0) + 1
        log.info("series complete: %d instances, batch %s", payload.instance_count, batch.batch_id,
                 extra={"series_uid": batch.uid, "study_uid": batch.study_uid})

    async def _complete_study(self, batch: Batch, due: StudyDue) -> None:
        key = await self._write_manifest(batch)
        first = batch.first.received
        payload = StudyCompleted(batch_id=batch.batch_id, manifest_key=key, series_uids=batch.series_uids(),
                                 instance_count=len(batch.instances), trigger=due.trigger, action=due.action,
                                 first_seq=batch.first_seq, last_seq=batch.last_seq,
                                 calling_aet=first.calling_aet, peer_host=first.peer_host, tags=first.tags)
        cause = batch.force_request_event_id if due.trigger == "forced" else batch.last.event_id
        event = make_event("study.completed", self.name, payload, correlation_id=batch.batch_id,
                           causation_id=cause, study_uid=batch.study_uid)
        event.event_id = deterministic_event_id("study.completed", batch.batch_id)
        await self.publish(event)
        self.state.remove(batch)
        self.counters["studies_completed"] = self.counters.get("studies_completed", 0) + 1
        log.info("study complete (%s, %s): %d series, %d instances", due.trigger, due.action,
                 len(payload.series_uids), payload.instance_count, extra={"study_uid": batch.study_uid})


def batch_manifest(batch: Batch) -> Manifest:
    """What a completed batch routes: the newest copy of each of its instances (state.Batch.add)."""
    first = batch.first.received
    return Manifest(
        batch_id=batch.batch_id, level=batch.level, study_uid=batch.study_uid,
        series_uids=batch.series_uids(), calling_aet=first.calling_aet, peer_host=first.peer_host,
        instances=[ManifestInstance(
            sop_uid=i.sop_uid, series_uid=i.series_uid, study_uid=i.study_uid, blob_key=i.received.blob_key,
            sop_class_uid=i.received.sop_class_uid, transfer_syntax_uid=i.received.transfer_syntax_uid,
            sha256=i.received.sha256, size=i.received.size, stream_seq=i.stream_seq,
            received_stamp=receipt_stamp(i.received_at))
            for i in batch.ordered()])
