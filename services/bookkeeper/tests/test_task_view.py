"""The tasks view as the dispatcher's events move a task along (pure functions, no database)."""

from datetime import UTC, datetime, timedelta
from typing import Any

from services.bookkeeper.projections import StoredEvent, new_task, task_on_event

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _event(seq: int, type_: str, **payload: Any) -> StoredEvent:
    return StoredEvent(stream="EVENTS", stream_seq=seq, type=type_, occurred_at=T0 + timedelta(seconds=seq),
                       actor="dispatcher", study_uid="1.2.3", series_uid="1.2.3.4", task_id="t1",
                       config_kind=None, config_name=None, payload={"task_id": "t1", **payload})


def _fold(*events: StoredEvent) -> list[tuple[str, int]]:
    row = new_task(events[0], "t1", kind="dispatch", rule="r", target="pacs")
    row = task_on_event(row, events[0])
    states = [(row["state"], row["attempts"])]
    for ev in events[1:]:
        row = task_on_event(row, ev)
        states.append((row["state"], row["attempts"]))
    return states


def test_a_task_shows_sending_while_an_attempt_runs() -> None:
    assert _fold(
        _event(1, "dispatch.requested", target="pacs"),
        _event(2, "dispatch.started", attempt=1, delivery=1),
        _event(3, "dispatch.attempt_failed", attempt=1, error="refused"),
        _event(4, "dispatch.started", attempt=2, delivery=2),
        _event(5, "dispatch.completed", attempt=2),
    ) == [("queued", 0), ("sending", 0), ("retrying", 1), ("sending", 1), ("done", 2)]


def test_a_late_started_does_not_undo_an_outcome() -> None:
    done = _fold(_event(1, "dispatch.requested"), _event(2, "dispatch.completed", attempt=1),
                 _event(3, "dispatch.started", attempt=1, delivery=2))
    failed = _fold(_event(1, "dispatch.requested"), _event(2, "dispatch.failed", attempts=3, error="x"),
                   _event(3, "dispatch.started", attempt=3, delivery=4))
    assert done[-1] == ("done", 1) and failed[-1] == ("error", 3)


def test_a_manual_retry_queues_the_task_until_a_dispatcher_starts_it() -> None:
    assert [state for state, _ in _fold(
        _event(1, "dispatch.requested"), _event(2, "dispatch.failed", attempts=3, error="x"),
        _event(3, "dispatch.retry_requested"), _event(4, "dispatch.started", attempt=1, delivery=1),
    )] == ["queued", "error", "queued", "sending"]
