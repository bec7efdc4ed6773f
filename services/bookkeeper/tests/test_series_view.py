"""The series view as routing decisions arrive (pure functions, no database)."""

from datetime import UTC, datetime, timedelta
from typing import Any

from services.bookkeeper.projections import ProjectionState, StoredEvent, apply_event

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
STUDY = "1.2.3"


def _event(seq: int, type_: str, series_uid: str | None, **payload: Any) -> StoredEvent:
    return StoredEvent(stream="EVENTS", stream_seq=seq, type=type_, occurred_at=T0 + timedelta(seconds=seq),
                       actor="router", study_uid=STUDY, series_uid=series_uid, task_id=payload.get("task_id"),
                       config_kind=None, config_name=None, payload=payload)


def _task(task_id: str, rule: str) -> dict[str, str]:
    return {"task_id": task_id, "kind": "dispatch", "rule": rule, "target": "pacs"}


def test_a_study_decision_leaves_series_that_series_rules_took_alone() -> None:
    state = ProjectionState()
    events = [
        _event(1, "image.received", "ct", tags={"Modality": "CT"}),
        _event(2, "image.received", "mr", tags={"Modality": "MR"}),
        _event(3, "series.completed", "ct", batch_id="b-ct"),
        _event(4, "dispatch.requested", "ct", task_id="t-ct", rule="ct-series", target="pacs"),
        _event(5, "route.decided", "ct", trigger="series", batch_id="b-ct", tasks=[_task("t-ct", "ct-series")],
               discarded=False),
        _event(6, "series.completed", "mr", batch_id="b-mr"),
        _event(7, "route.decided", "mr", trigger="series", batch_id="b-mr", tasks=[], discarded=False,
               reason="no series rule matched; left to the study rules"),
        _event(8, "dispatch.completed", "ct", task_id="t-ct", attempt=1),
        _event(9, "route.decided", None, trigger="study", batch_id="b-study", tasks=[], discarded=True,
               reason="no rule matched"),
    ]
    for ev in events:
        apply_event(state, ev)
    assert state.series["ct"]["status"] == "dispatched" and state.series["ct"]["batch_id"] == "b-ct"
    assert state.series["mr"]["status"] == "discarded" and state.series["mr"]["batch_id"] == "b-study"
