"""Projections: pure functions from (current row, stored event) to the new row.

Nothing here touches the database. `ProjectionState` holds the rows a batch of events may change
(loaded by `projector.py`), `apply_event()` routes one event to the functions below, and the
projector writes the changed rows back in the same transaction as the cursor. The live service and
`caduceus bookkeeper rebuild` both feed events from the `events` table, ordered by stream sequence,
through this one path, so a rebuild reproduces the live tables.

Payloads are read with `.get()` rather than validated into the pydantic models: a newer or odd
event must never stop the audit log; what a projection cannot use it ignores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

Row = dict[str, Any]

TASK_CREATING_TYPES = ("dispatch.requested", "process.requested", "notification.requested")
TASK_KINDS = {"dispatch.requested": "dispatch", "process.requested": "process",
              "notification.requested": "notification"}


@dataclass(frozen=True)
class StoredEvent:
    """The columns of an `events` row that projections read."""

    stream: str
    stream_seq: int
    type: str
    occurred_at: datetime
    actor: str
    study_uid: str | None
    series_uid: str | None
    task_id: str | None
    config_kind: str | None
    config_name: str | None
    payload: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> StoredEvent:
        m = row._mapping if hasattr(row, "_mapping") else row
        return cls(stream=m["stream"], stream_seq=m["stream_seq"], type=m["type"],
                   occurred_at=m["occurred_at"], actor=m["actor"], study_uid=m["study_uid"],
                   series_uid=m["series_uid"], task_id=m["task_id"], config_kind=m["config_kind"],
                   config_name=m["config_name"], payload=m["payload"] or {})


@dataclass
class ProjectionState:
    series: dict[str, Row] = field(default_factory=dict)
    tasks: dict[str, Row] = field(default_factory=dict)
    config_items: dict[tuple[str, str], Row] = field(default_factory=dict)
    services: dict[str, Row] = field(default_factory=dict)
    dirty_series: set[str] = field(default_factory=set)
    dirty_tasks: set[str] = field(default_factory=set)
    dirty_config: set[tuple[str, str]] = field(default_factory=set)
    dirty_services: set[str] = field(default_factory=set)

    def put_series(self, row: Row) -> None:
        self.series[row["series_uid"]] = row
        self.dirty_series.add(row["series_uid"])

    def put_task(self, row: Row) -> None:
        self.tasks[row["task_id"]] = row
        self.dirty_tasks.add(row["task_id"])


# ------------------------------------------------------------------ keys a batch needs

@dataclass
class Keys:
    series: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)  # every series of these studies
    tasks: set[str] = field(default_factory=set)
    config: set[tuple[str, str]] = field(default_factory=set)
    services: set[str] = field(default_factory=set)


def keys_for(events: list[StoredEvent]) -> Keys:
    keys = Keys()
    for ev in events:
        p = ev.payload
        if ev.series_uid:
            keys.series.add(ev.series_uid)
        if ev.type == "study.completed":
            keys.series.update(str(uid) for uid in p.get("series_uids") or [])
        if ev.type == "route.decided" and not ev.series_uid and ev.study_uid:
            keys.studies.add(ev.study_uid)
        if ev.task_id:
            keys.tasks.add(ev.task_id)
        if isinstance(p.get("task_id"), str):
            keys.tasks.add(p["task_id"])
        if ev.type == "route.decided":
            keys.tasks.update(t["task_id"] for t in p.get("tasks") or [] if isinstance(t, dict) and t.get("task_id"))
        if ev.type.startswith("config.item."):
            key = _config_key(ev)
            if key:
                keys.config.add(key)
        if ev.type.startswith("service.") and isinstance(p.get("service"), str):
            keys.services.add(p["service"])
    return keys


# ------------------------------------------------------------------ routing

def apply_event(state: ProjectionState, ev: StoredEvent) -> None:
    try:
        _apply(state, ev)
    except Exception:  # noqa: BLE001 - a malformed payload is skipped by live and rebuild alike
        log.exception("projection skipped event %s:%s (%s)", ev.stream, ev.stream_seq, ev.type,
                      extra={"series_uid": ev.series_uid, "study_uid": ev.study_uid, "task_id": ev.task_id,
                             "event_type": ev.type})


def _apply(state: ProjectionState, ev: StoredEvent) -> None:
    t = ev.type
    if t == "image.received" and ev.series_uid:
        state.put_series(series_on_image(state.series.get(ev.series_uid), ev))
    elif t in ("series.completed", "series.discarded") and ev.series_uid:
        state.put_series(series_on_status_event(state.series.get(ev.series_uid), ev))
    elif t == "study.completed":
        for uid in ev.payload.get("series_uids") or []:
            if uid in state.series:
                state.put_series(series_on_study_completed(state.series[uid], ev))
    elif t == "route.decided":
        _apply_route_decided(state, ev)
    elif t in TASK_CREATING_TYPES or t.startswith("dispatch."):
        _apply_task_event(state, ev)
    elif t.startswith("config.item."):
        key = _config_key(ev)
        if key:
            state.config_items[key] = config_on_event(state.config_items.get(key), ev)
            state.dirty_config.add(key)
    elif t.startswith("service."):
        name = ev.payload.get("service")
        if isinstance(name, str):
            new = service_on_event(state.services.get(name), ev)
            if new is not None:
                state.services[name] = new
                state.dirty_services.add(name)


def _apply_route_decided(state: ProjectionState, ev: StoredEvent) -> None:
    if ev.series_uid:
        targets = [ev.series_uid] if ev.series_uid in state.series else []
    else:
        # A study decision speaks for the series no series rule took: a series with tasks of its
        # own keeps the status they give it (a study no study rule matched is not "discarded"
        # for a CT series a series rule already delivered).
        targets = sorted(uid for uid, row in state.series.items()
                         if row.get("study_uid") == ev.study_uid and not row.get("tasks_total"))
    for uid in targets:
        state.put_series(series_on_route_decided(state.series[uid], ev))
    for ref in ev.payload.get("tasks") or []:
        task_id = ref.get("task_id")
        if not task_id or task_id in state.tasks:
            continue
        task = new_task(ev, task_id, kind=ref.get("kind") or "dispatch", rule=ref.get("rule"),
                        target=ref.get("target"))
        state.put_task(task)
        _count_new_task(state, task, ev)


def _apply_task_event(state: ProjectionState, ev: StoredEvent) -> None:
    task_id = ev.payload.get("task_id") or ev.task_id
    if not task_id:
        return
    old = state.tasks.get(task_id)
    if old is None and ev.type not in TASK_CREATING_TYPES:
        # A task we never saw created (its creation predates the log): track it from here on.
        old = new_task(ev, task_id, kind="dispatch", rule=ev.payload.get("rule"),
                       target=ev.payload.get("target"))
        state.put_task(old)
        _count_new_task(state, old, ev)
    if old is None:
        created = new_task(ev, task_id, kind=TASK_KINDS[ev.type], rule=ev.payload.get("rule"),
                           target=ev.payload.get("target"))
        state.put_task(task_on_event(created, ev))
        _count_new_task(state, created, ev)
        return
    new = task_on_event(old, ev)
    state.put_task(new)
    series_uid = new.get("series_uid")
    if series_uid and series_uid in state.series:
        state.put_series(series_on_task_change(state.series[series_uid], old, new, ev))


def _count_new_task(state: ProjectionState, task: Row, ev: StoredEvent) -> None:
    series_uid = task.get("series_uid")
    if series_uid and series_uid in state.series:
        row = dict(state.series[series_uid])
        row["tasks_total"] += 1
        state.put_series(_touch(row, ev))


def _config_key(ev: StoredEvent) -> tuple[str, str] | None:
    kind = ev.config_kind or ev.payload.get("kind")
    name = ev.config_name or ev.payload.get("name")
    return (str(kind), str(name)) if kind and name else None


# ------------------------------------------------------------------ series

def _touch(row: Row, ev: StoredEvent) -> Row:
    row["last_event_type"] = ev.type
    row["last_event_at"] = ev.occurred_at
    row["last_stream"] = ev.stream
    row["last_seq"] = ev.stream_seq
    return row


def new_series(ev: StoredEvent) -> Row:
    return {"series_uid": ev.series_uid, "study_uid": ev.study_uid, "patient_id": None, "patient_name": None,
            "modality": None, "description": None, "sender": None, "sender_host": None, "instance_count": 0,
            "first_received": None, "last_received": None, "status": "receiving", "batch_id": None,
            "tasks_total": 0, "tasks_done": 0, "tasks_failed": 0, "last_event_type": ev.type,
            "last_event_at": ev.occurred_at, "last_stream": ev.stream, "last_seq": ev.stream_seq}


def series_on_image(row: Row | None, ev: StoredEvent) -> Row:
    p = ev.payload
    if row and p.get("duplicate") == "superseded" and not p.get("stored"):
        # An older copy not stored, whose event does not name the stored copy: the router ignores
        # it (no batch opens), so the series is not receiving again. (One that names it makes the
        # router route the stored copy, docs/events.md: the series is receiving again.)
        return _touch(dict(row), ev)
    new = dict(row) if row else new_series(ev)
    tags: dict[str, Any] = p.get("tags") or {}
    new["study_uid"] = ev.study_uid or new["study_uid"]
    new["patient_id"] = tags.get("PatientID") or new["patient_id"]
    new["patient_name"] = tags.get("PatientName") or new["patient_name"]
    new["modality"] = tags.get("Modality") or new["modality"]
    new["description"] = tags.get("SeriesDescription") or new["description"]
    new["sender"] = p.get("calling_aet") or new["sender"]
    new["sender_host"] = p.get("peer_host") or new["sender_host"]
    if p.get("duplicate", "new") == "new":
        new["instance_count"] += 1
    at = ev.occurred_at
    new["first_received"] = at if new["first_received"] is None else min(new["first_received"], at)
    new["last_received"] = at if new["last_received"] is None else max(new["last_received"], at)
    # Images after completion open a new batch at the router: the series is receiving again.
    new["status"] = "receiving"
    return _touch(new, ev)


def series_on_status_event(row: Row | None, ev: StoredEvent) -> Row:
    new = dict(row) if row else new_series(ev)
    new["batch_id"] = ev.payload.get("batch_id") or new["batch_id"]
    new["status"] = "complete" if ev.type == "series.completed" else "discarded"
    if ev.type == "series.completed" and not new["instance_count"]:
        new["instance_count"] = int(ev.payload.get("instance_count") or 0)
    return _touch(new, ev)


def series_on_study_completed(row: Row, ev: StoredEvent) -> Row:
    new = dict(row)
    if new["status"] == "receiving":
        new["status"] = "complete"
    return _touch(new, ev)


def series_on_route_decided(row: Row, ev: StoredEvent) -> Row:
    new = dict(row)
    new["status"] = "discarded" if ev.payload.get("discarded") else "routed"
    new["batch_id"] = ev.payload.get("batch_id") or new["batch_id"]
    return _touch(new, ev)


def series_on_task_change(row: Row, old_task: Row, new_task_row: Row, ev: StoredEvent) -> Row:
    new = dict(row)
    for state, column in (("done", "tasks_done"), ("error", "tasks_failed")):
        new[column] += int(new_task_row["state"] == state) - int(old_task["state"] == state)
    if new["status"] in ("routed", "dispatched", "error"):
        if new["tasks_failed"] > 0:
            new["status"] = "error"
        elif new["tasks_total"] and new["tasks_done"] >= new["tasks_total"]:
            new["status"] = "dispatched"
        else:
            new["status"] = "routed"
    return _touch(new, ev)


# ------------------------------------------------------------------ tasks

def new_task(ev: StoredEvent, task_id: str, *, kind: str, rule: Any, target: Any) -> Row:
    return {"task_id": task_id, "kind": kind, "series_uid": ev.series_uid, "study_uid": ev.study_uid,
            "rule": rule, "target": target, "priority": None, "state": "queued", "attempts": 0,
            "last_error": None, "created_at": ev.occurred_at, "updated_at": ev.occurred_at,
            "last_event_type": ev.type, "last_stream": ev.stream, "last_seq": ev.stream_seq}


def task_on_event(row: Row, ev: StoredEvent) -> Row:
    new = dict(row)
    p = ev.payload
    t = ev.type
    if t in TASK_CREATING_TYPES:
        new["priority"] = p.get("priority") or new["priority"]
        new["rule"] = p.get("rule") or new["rule"]
        new["target"] = p.get("target") or new["target"]
        new["series_uid"] = new["series_uid"] or ev.series_uid
        new["study_uid"] = new["study_uid"] or ev.study_uid
    elif t == "dispatch.started":
        if row["state"] in ("done", "error"):
            return row  # a late copy from a dispatcher that was cut off: the outcome stands
        new["state"] = "sending"
    elif t == "dispatch.attempt_failed":
        new["state"] = "retrying"
        new["attempts"] = max(new["attempts"], int(p.get("attempt") or 0))
        new["last_error"] = p.get("error")
    elif t == "dispatch.completed":
        new["state"] = "done"
        new["attempts"] = max(new["attempts"], int(p.get("attempt") or 0))
        new["last_error"] = None
    elif t == "dispatch.failed":
        new["state"] = "error"
        new["attempts"] = max(new["attempts"], int(p.get("attempts") or 0))
        new["last_error"] = p.get("error")
    elif t == "dispatch.retry_requested":
        # The dispatcher counts attempts afresh after a manual retry (docs/events.md); so does the view.
        new["state"] = "queued"
        new["attempts"] = 0
    else:
        return row
    new["updated_at"] = ev.occurred_at
    new["last_event_type"] = t
    new["last_stream"] = ev.stream
    new["last_seq"] = ev.stream_seq
    return new


# ------------------------------------------------------------------ configuration

def config_on_event(row: Row | None, ev: StoredEvent) -> Row:
    key = _config_key(ev)
    assert key is not None
    deleted = ev.type == "config.item.deleted"
    return {"kind": key[0], "name": key[1], "item": None if deleted else ev.payload.get("item"),
            "deleted": deleted, "version": (row["version"] if row else 0) + 1, "updated_by": ev.actor,
            "updated_at": ev.occurred_at, "comment": ev.payload.get("comment") or None,
            "last_event_type": ev.type, "last_stream": ev.stream, "last_seq": ev.stream_seq}


# ------------------------------------------------------------------ services

def new_service(name: str, ev: StoredEvent) -> Row:
    return {"service": name, "state": "unknown", "instance": None, "pid": None, "host": None, "version": None,
            "last_started_at": None, "last_stopped_at": None, "last_stop_reason": None,
            "last_crashed_at": None, "last_exit_code": None, "starts": 0, "crashes": 0,
            "last_event_type": ev.type, "last_stream": ev.stream, "last_seq": ev.stream_seq}


def service_on_event(row: Row | None, ev: StoredEvent) -> Row | None:
    p = ev.payload
    new = dict(row) if row else new_service(p["service"], ev)
    t = ev.type
    if t == "service.started":
        new.update(state="running", instance=p.get("instance"), pid=p.get("pid"), host=p.get("host"),
                   version=p.get("version"), last_started_at=ev.occurred_at, starts=new["starts"] + 1)
    elif t == "service.stopped":
        # With several instances of one service, only the one we list as current stops the service.
        if new["instance"] not in (None, p.get("instance")):
            return row
        new.update(state="stopped", last_stopped_at=ev.occurred_at, last_stop_reason=p.get("reason"))
    elif t == "service.crashed":
        new.update(state="crashed", last_crashed_at=ev.occurred_at, last_exit_code=p.get("exit_code"),
                   crashes=new["crashes"] + 1)
    elif t == "service.restarted":
        new.update(state="restarting", pid=p.get("pid"))
    else:
        return row
    new.update(last_event_type=t, last_stream=ev.stream, last_seq=ev.stream_seq)
    return new
