"""The router's fold: a replay that sees late instances before series.completed rebuilds the same batches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.router.state import RouterState, batch_id_for
from shared.events import Event, ImageReceived, RouteDecided, RouteRequested, SeriesCompleted, make_event


def image(seq: int, sop: str, series: str = "1.1", received_at: datetime | None = None, sha256: str = "0") -> Event:
    event = make_event("image.received", "receiver", ImageReceived(
        sop_class_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", blob_key=f"instances/{sop}", size=1,
        sha256=sha256, calling_aet="A", called_aet="B", peer_host="127.0.0.1", peer_port=1, association_id="x",
        tags={"SeriesDescription": series}), study_uid="1", series_uid=series, sop_uid=sop,
        **({"occurred_at": received_at} if received_at else {}))
    event.stream_seq = seq
    return event


def completed(seq: int, first_seq: int, last_seq: int, series: str = "1.1") -> Event:
    batch_id = batch_id_for("series", series, first_seq)
    event = make_event("series.completed", "router", SeriesCompleted(
        batch_id=batch_id, manifest_key="m", instance_count=1, first_seq=first_seq, last_seq=last_seq,
        calling_aet="A", peer_host="h"), series_uid=series, study_uid="1")
    event.stream_seq = seq
    return event


def test_live_and_replay_agree_on_the_next_batch() -> None:
    # Live: instances 1,2 complete (last_seq 2); instance 3 arrives before series.completed is stored.
    live = RouterState()
    for event in (image(1, "a"), image(2, "b")):
        live.apply(event)
    live.remove(live.series["1.1"])
    live.apply(image(3, "c"))
    live.apply(completed(4, 1, 2))
    # Replay of the same stream: 1, 2, 3 all land in one batch until series.completed splits it.
    replayed = RouterState()
    for event in (image(1, "a"), image(2, "b"), image(3, "c"), completed(4, 1, 2)):
        replayed.apply(event)
    for state in (live, replayed):
        assert list(state.series["1.1"].instances) == ["c"]
        assert state.series["1.1"].batch_id == batch_id_for("series", "1.1", 3)
        assert list(state.pending) == [batch_id_for("series", "1.1", 1)]
        assert state.checkpoint() == 1   # the undecided batch still needs its instances


def test_resent_instance_latest_wins_and_checkpoint_moves_on() -> None:
    state = RouterState()
    state.apply(image(5, "a"))
    state.apply(image(6, "a"))
    batch = state.series["1.1"]
    assert batch.first_seq == 5 and len(batch.instances) == 1 and batch.instances["a"].stream_seq == 6
    state.apply(completed(7, 5, 6))
    assert state.checkpoint() == 5
    batch_id = batch_id_for("series", "1.1", 5)
    decided = make_event("route.decided", "router", RouteDecided(
        trigger="series", batch_id=batch_id, evaluations=[], matched_rules=[], tasks=[], discarded=True,
        reason="no rule matched"))
    decided.stream_seq = 8
    state.apply(decided)
    assert not state.pending and not state.series
    assert state.checkpoint() == 5            # the study batch still holds it
    state.studies.clear()                     # what the tick does when no study rule is enabled
    assert state.checkpoint() == 9


def test_a_superseded_copy_neither_replaces_the_stored_one_nor_opens_a_batch() -> None:
    # A replay after a receiver crash publishes an older copy after a later one that is stored:
    # the batch keeps the stored copy, and on its own the old copy opens nothing to route (an
    # event that does not name the stored copy: of an older version, or its file was unreadable).
    state = RouterState()
    stored = image(1, "a")
    state.apply(stored)
    stale = image(2, "a")
    stale.payload["duplicate"] = "superseded"
    state.apply(stale)
    assert state.series["1.1"].instances["a"].event_id == stored.event_id
    alone = RouterState()
    alone.apply(stale)
    assert alone.series == {} and alone.last_seq == 2


RECEIVED = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def test_the_copy_received_last_is_routed_whatever_order_its_events_come_in() -> None:
    # Two receiver processes stored two copies of one instance at once; the blob store keeps the
    # one received last (services/receiver/placing.py), but the events can reach the stream in
    # the other order. The router took the last event on the stream: the dispatcher then found
    # the file changed since routing and sent nothing for that instance (session 17 review).
    newer = image(1, "a", received_at=RECEIVED + timedelta(milliseconds=3), sha256="1" * 64)
    older = image(2, "a", received_at=RECEIVED, sha256="f" * 64)
    state = RouterState()
    for event in (newer, image(3, "b"), older):
        state.apply(event)
    batch = state.series["1.1"]
    assert batch.instances["a"].event_id == newer.event_id
    assert batch.last_seq == 3 and len(batch.instances) == 2


def test_copies_received_in_the_same_microsecond_route_the_greater_sha256() -> None:
    for order in ((1, 2), (2, 1)):
        copies = {n: image(seq, "a", received_at=RECEIVED, sha256=str(n) * 64) for n, seq in zip((1, 2), order, strict=True)}
        state = RouterState()
        for event in sorted(copies.values(), key=lambda e: e.stream_seq or 0):
            state.apply(event)
        assert state.series["1.1"].instances["a"].event_id == copies[2].event_id


def test_live_and_replay_agree_when_an_older_copy_comes_after_completion() -> None:
    # Live: the batch of copy `newer` completes (last_seq 2), then the event of an older copy
    # comes: a batch of its own. A replay sees it before series.completed, in the same batch as
    # the newer copy, which it does not replace; the split must still give it its own batch.
    newer = image(1, "a", received_at=RECEIVED + timedelta(seconds=1), sha256="1" * 64)
    older = image(3, "a", received_at=RECEIVED, sha256="2" * 64)
    live = RouterState()
    for event in (newer, image(2, "b")):
        live.apply(event)
    live.remove(live.series["1.1"])
    live.apply(older)
    live.apply(completed(4, 1, 2))
    replayed = RouterState()
    for event in (newer, image(2, "b"), older, completed(4, 1, 2)):
        replayed.apply(event)
    for state in (live, replayed):
        batch = state.series["1.1"]
        assert batch.batch_id == batch_id_for("series", "1.1", 3)
        assert [i.event_id for i in batch.instances.values()] == [older.event_id]


def test_a_reroute_request_becomes_a_pending_decision_under_a_new_batch_id() -> None:
    # `caduceus reroute --study`: the study's force timeout had discarded it; asked again, the
    # rules are evaluated (action proceed), for the new batch id the request names.
    completed = {"batch_id": "b1", "manifest_key": "m", "series_uids": ["1.1"], "instance_count": 2,
                 "trigger": "force_timeout", "action": "discard", "calling_aet": "A", "peer_host": "h"}
    request = make_event("route.requested", "user:admin", RouteRequested(
        batch_id="b1~r1", original_batch_id="b1", completed_type="study.completed", completed=completed),
        study_uid="1")
    request.stream_seq = 9
    state = RouterState()
    state.apply(request)
    pending = state.pending["b1~r1"]
    assert pending.level == "study" and pending.first_seq == 9
    assert pending.completed_event.payload["action"] == "proceed"
    assert pending.completed_event.payload["batch_id"] == "b1~r1"
    assert pending.completed_event.event_id == request.event_id  # the decision's causation


def superseded(seq: int, sop: str, stored_at: datetime, stored_sha256: str) -> Event:
    """An older copy's event that found the copy received at `stored_at` stored (payload `stored`)."""
    event = image(seq, sop, received_at=stored_at - timedelta(hours=1), sha256="0" * 64)
    stamp = int(stored_at.timestamp()) * 10**9 + stored_at.microsecond * 1000
    event.payload.update(duplicate="superseded", stored={
        "received_stamp": stamp, "sha256": stored_sha256, "size": 7, "sop_class_uid": "1.9",
        "transfer_syntax_uid": "1.2.840.10008.1.2.4.50"})
    return event


def test_a_superseded_copy_routes_the_stored_copy_it_names_when_that_has_no_event() -> None:
    # The stored copy's process was killed before announcing it; the older copy's sender was told
    # success. Routed: the stored copy, with its stamp and digest (the dispatcher's check passes).
    state = RouterState()
    state.apply(superseded(1, "a", RECEIVED, "e" * 64))
    [routed] = state.series["1.1"].instances.values()
    assert (routed.received.sha256, routed.received.size, routed.received_at) == ("e" * 64, 7, RECEIVED)
    assert (routed.received.sop_class_uid, routed.received.transfer_syntax_uid) == ("1.9", "1.2.840.10008.1.2.4.50")
    assert routed.received.tags["SeriesDescription"] == "1.1"


def test_a_superseded_copy_and_the_stored_copys_own_event_give_one_entry_in_either_order() -> None:
    own = image(2, "a", received_at=RECEIVED, sha256="e" * 64)
    for events in ([superseded(1, "a", RECEIVED, "e" * 64), own], [own, superseded(3, "a", RECEIVED, "e" * 64)]):
        state = RouterState()
        for event in events:
            state.apply(event)
        batch = state.series["1.1"]
        assert list(batch.instances) == ["a"]
        assert (batch.instances["a"].received.sha256, batch.instances["a"].received_at) == ("e" * 64, RECEIVED)


def test_a_copy_newer_than_the_one_a_superseded_copy_names_is_routed() -> None:
    newest = image(1, "a", received_at=RECEIVED + timedelta(seconds=1), sha256="1" * 64)
    state = RouterState()
    state.apply(newest)
    state.apply(superseded(2, "a", RECEIVED, "e" * 64))
    assert state.series["1.1"].instances["a"].event_id == newest.event_id
