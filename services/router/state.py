"""The router's state: open series/study batches and completed-but-undecided batches.

The state is a pure fold of the EVENTS stream (image.received, series.completed, study.completed,
study.complete_requested, route.decided), so the router can rebuild it after a restart by
replaying from its checkpoint and arrive at the same batches with the same batch ids:

- a batch opens with the first instance of a series (study) that has no open batch; its id is
  derived from the series (study) UID and the stream sequence of that instance;
- `series.completed` / `study.completed` close the batch: the instances up to the payload's
  `last_seq` belong to it; instances after it (late arrivals that came in while the router was
  completing) form the next batch, exactly as the live router opened it;
- a closed batch waits in `pending` until its `route.decided` is seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from shared.blobstore import CopyRank, copy_rank
from shared.events import (
    Event,
    ImageReceived,
    RouteDecided,
    RouteRequested,
    SeriesCompleted,
    StudyCompleted,
    deterministic_event_id,
    utcnow,
)

Level = Literal["series", "study"]


def batch_id_for(level: Level, uid: str, first_seq: int) -> str:
    return deterministic_event_id(f"{level}-batch", uid, str(first_seq))


@dataclass
class Instance:
    sop_uid: str
    series_uid: str
    study_uid: str
    stream_seq: int
    event_id: str
    arrived_at: datetime
    received: ImageReceived
    received_at: datetime  # the receiver's receipt time of this copy (the event's occurred_at)

    @property
    def rank(self) -> CopyRank:
        """Among copies of one SOP instance, the newest is the one the blob store keeps."""
        return copy_rank(self.received_at, self.received.sha256)


@dataclass
class Batch:
    level: Level
    uid: str                      # series UID or study UID
    study_uid: str
    first_seq: int
    # Per SOP Instance UID, the newest copy (what the blob store keeps, and what is routed).
    instances: dict[str, Instance] = field(default_factory=dict)
    # The other copies in the batch, of SOP instances that came more than once (usually none).
    # Kept for `split_after`: a copy that came after the batch completed belongs to the next one.
    others: dict[str, list[Instance]] = field(default_factory=dict)
    # The highest stream sequence of any copy in the batch, the newest or not.
    last_seq: int = 0
    force_requested: bool = False
    force_request_event_id: str = ""
    # A study batch some series of which were left to the study rules (a series decision with no
    # task and no discard): it is decided even if the study rules are gone by then (service._tick).
    awaited: bool = False
    # The completion check reads it for every open series, possibly several times a second.
    _last_arrival: datetime | None = field(default=None, repr=False, compare=False)

    @property
    def batch_id(self) -> str:
        return batch_id_for(self.level, self.uid, self.first_seq)

    def add(self, instance: Instance) -> None:
        # Same SOP Instance UID again: the newest copy by receipt (copy_rank) wins, whatever its
        # place on the stream: the receiver keeps that one in the blob store (two of its processes
        # may publish two copies in the other order); the later event wins a full tie.
        held = self.instances.get(instance.sop_uid)
        if held is None:
            self.instances[instance.sop_uid] = instance
        elif instance.rank >= held.rank:
            self.instances[instance.sop_uid] = instance
            self.others.setdefault(instance.sop_uid, []).append(held)
        else:
            self.others.setdefault(instance.sop_uid, []).append(instance)
        self.last_seq = max(self.last_seq, instance.stream_seq)
        if self._last_arrival is not None:
            self._last_arrival = max(self._last_arrival, instance.arrived_at)

    def ordered(self) -> list[Instance]:
        return sorted(self.instances.values(), key=lambda i: i.stream_seq)

    @property
    def first(self) -> Instance:
        return min(self.instances.values(), key=lambda i: i.stream_seq)

    @property
    def last(self) -> Instance:
        return max(self.instances.values(), key=lambda i: i.stream_seq)

    @property
    def first_arrival(self) -> datetime:
        return min(i.arrived_at for i in self.instances.values())

    @property
    def last_arrival(self) -> datetime:
        if self._last_arrival is None:
            self._last_arrival = max(i.arrived_at for i in self.instances.values())
        return self._last_arrival

    def series_uids(self) -> list[str]:
        seen: dict[str, None] = {}
        for instance in self.ordered():
            seen.setdefault(instance.series_uid, None)
        return list(seen)

    def series_descriptions(self) -> list[str]:
        """SeriesDescription of each series in the batch (from its first instance)."""
        descriptions: dict[str, str] = {}
        for instance in self.ordered():
            descriptions.setdefault(instance.series_uid, instance.received.tags.get("SeriesDescription", ""))
        return list(descriptions.values())

    def split_after(self, last_seq: int) -> Batch | None:
        """The batch that follows once this one closed at `last_seq` (None if nothing is left): the
        copies that came after it, each SOP instance's newest of them routed."""
        copies = [*self.instances.values(), *(i for held in self.others.values() for i in held)]
        rest = sorted((i for i in copies if i.stream_seq > last_seq), key=lambda i: i.stream_seq)
        if not rest:
            return None
        follower = Batch(self.level, self.uid, self.study_uid, rest[0].stream_seq)
        for instance in rest:
            follower.add(instance)
        return follower


@dataclass
class PendingDecision:
    """A completed batch whose route.decided has not been seen yet."""

    level: Level
    batch_id: str
    completed_event: Event
    first_seq: int
    rerouted: bool = False  # asked for by route.requested (decide.decide's `rerouted`)


def _stored_copy(superseded: ImageReceived) -> tuple[ImageReceived, datetime]:
    """The copy a superseded event names, as a received copy: its file's stamp, digest, size, SOP
    class and transfer syntax (what the manifest and the dispatcher's check use). Its tags and
    sender are the superseded copy's: the same SOP instance, and the stored file's other tags are
    not in the event."""
    stored = superseded.stored
    assert stored is not None
    copy = superseded.model_copy(update={
        "sha256": stored.sha256, "size": stored.size, "sop_class_uid": stored.sop_class_uid,
        "transfer_syntax_uid": stored.transfer_syntax_uid})
    return copy, EPOCH + timedelta(microseconds=stored.received_stamp // 1000)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class RouterState:
    def __init__(self) -> None:
        self.series: dict[str, Batch] = {}
        self.studies: dict[str, Batch] = {}
        self.pending: dict[str, PendingDecision] = {}
        self.last_seq = 0

    def apply(self, event: Event) -> None:
        seq = event.stream_seq or 0
        if event.type == "image.received":
            self._image(event, seq)
        elif event.type == "series.completed":
            self._closed("series", event, SeriesCompleted.model_validate(event.payload).last_seq)
        elif event.type == "study.completed":
            self._closed("study", event, StudyCompleted.model_validate(event.payload).last_seq)
        elif event.type == "study.complete_requested" and event.study_uid:
            study = self.studies.get(event.study_uid)
            if study is not None:
                study.force_requested = True
                study.force_request_event_id = event.event_id
        elif event.type == "route.requested":
            self._reroute(event, seq)
        elif event.type == "route.decided":
            decided = RouteDecided.model_validate(event.payload)
            self.pending.pop(decided.batch_id, None)
            if decided.trigger == "series" and not decided.tasks and not decided.discarded and event.study_uid:
                study = self.studies.get(event.study_uid)
                if study is not None:
                    study.awaited = True
        self.last_seq = max(self.last_seq, seq)

    def _image(self, event: Event, seq: int) -> None:
        if not (event.series_uid and event.study_uid and event.sop_uid):
            return
        received = ImageReceived.model_validate(event.payload)
        received_at = event.occurred_at or utcnow()
        if received.duplicate == "superseded":
            # This copy's bytes are not in the store: a copy received later is. Routed is that
            # stored copy, named by the event, as if it were its own event: its own event, if in
            # the batch, has the same rank, so the batch keeps one entry for the instance either
            # way (a newer copy still wins); the stored copy may have no event at all (its process
            # was killed before announcing it), while this copy's sender was told success.
            if received.stored is None:
                return  # (an event of an older version, or the stored file was unreadable)
            received, received_at = _stored_copy(received)
        instance = Instance(event.sop_uid, event.series_uid, event.study_uid, seq, event.event_id,
                            event.recorded_at or event.occurred_at or utcnow(), received, received_at)
        for level, batches, uid in (("series", self.series, event.series_uid),
                                    ("study", self.studies, event.study_uid)):
            batch = batches.get(uid)
            if batch is None:
                batch = batches[uid] = Batch(level, uid, event.study_uid, seq)  # type: ignore[arg-type]
            batch.add(instance)

    def _reroute(self, event: Event, seq: int) -> None:
        """A batch to decide again: as if it completed now, under its new batch id."""
        request = RouteRequested.model_validate(event.payload)
        payload = {**request.completed, "batch_id": request.batch_id}
        level: Level = "series" if request.completed_type == "series.completed" else "study"
        if level == "study":
            payload["action"] = "proceed"  # asked for: a force timeout's discard/ignore does not stand
        completed = Event(event_id=event.event_id, type=request.completed_type, actor=event.actor,
                          occurred_at=event.occurred_at, correlation_id=request.batch_id,
                          study_uid=event.study_uid, series_uid=event.series_uid, payload=payload)
        completed.stream_seq = seq
        completed.typed_payload()  # a request whose payload does not fit is refused here, before anything changes
        self.pending[request.batch_id] = PendingDecision(level, request.batch_id, completed, seq, rerouted=True)

    def _closed(self, level: Level, event: Event, last_seq: int) -> None:
        batches = self.series if level == "series" else self.studies
        uid = event.series_uid if level == "series" else event.study_uid
        batch_id = str(event.payload.get("batch_id", ""))
        first_seq = int(event.payload.get("first_seq") or last_seq)
        if uid is not None and uid in batches:
            follower = batches.pop(uid).split_after(last_seq)
            if follower is not None:
                batches[uid] = follower
        self.pending[batch_id] = PendingDecision(level, batch_id, event, first_seq)

    def remove(self, batch: Batch) -> None:
        """The live router completed `batch`: later instances of that series start a new batch."""
        batches = self.series if batch.level == "series" else self.studies
        current = batches.get(batch.uid)
        if current is None:
            return
        follower = current.split_after(batch.last_seq)
        if follower is None:
            del batches[batch.uid]
        else:
            batches[batch.uid] = follower

    def checkpoint(self) -> int:
        """Where a replay must start to rebuild this state: the lowest sequence still needed."""
        needed = [b.first_seq for b in self.series.values()]
        needed += [b.first_seq for b in self.studies.values()]
        needed += [p.first_seq for p in self.pending.values()]
        return min(needed) if needed else self.last_seq + 1
