"""`caduceus retry TASK_ID...` / `--series UID` / `--study UID`: send failed dispatch tasks again.

Publishes one `dispatch.retry_requested` per task (actor `user:<name>`); a dispatcher resets the
task's attempt counter and sends what the target has not confirmed yet. The state of each task is
folded from its dispatch events, so the command can say what it did: a completed task is not
retried, an unknown one is an error. The events come from the bookkeeper's log, which keeps them
for good and finds one task's or one series' events at once; when no bookkeeper answers, from the
EVENTS stream itself, which holds only the last `settings.events_retention_days` and is read
whole.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
from nats.js.errors import NotFoundError

from cli.connection import (
    EXIT_UNREACHABLE,
    add_connection_arguments,
    cli_nats_url,
    connect_cli_bus,
    default_actor,
)
from shared.bookkeeper_client import BookkeeperClient, BookkeeperUnavailable
from shared.bus import Bus, replay
from shared.events import DispatchRetryRequested, Event, make_event
from shared.subjects import BOOKKEEPER_EVENTS, EVENTS_PREFIX

EXIT_NOTHING = 1

# Dispatch event type -> the task state it leaves behind (the names of the bookkeeper's tasks view,
# shared.bookkeeper_client.TASK_STATES).
STATES = {"dispatch.requested": "queued", "dispatch.started": "sending", "dispatch.attempt_failed": "retrying",
          "dispatch.failed": "error", "dispatch.completed": "done", "dispatch.retry_requested": "queued"}


@dataclass
class TaskView:
    request: Event
    state: str = "queued"
    error: str = ""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("retry", help="send failed dispatch tasks again",
                            description="Ask the dispatchers to send failed tasks again (resets their attempt "
                                        "count; instances the target already confirmed are not re-sent, unless the target now names another peer).")
    parser.add_argument("task_ids", nargs="*", metavar="TASK_ID", help="task id(s) to retry")
    parser.add_argument("--series", metavar="UID", help="retry every failed dispatch task of this series")
    parser.add_argument("--study", metavar="UID", help="retry every failed dispatch task of this study: "
                                                        "those of study rules and those of its series")
    parser.add_argument("--comment", default="", help="why (kept in the event)")
    add_connection_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.task_ids and not args.series and not args.study:
        print("caduceus retry: give TASK_ID(s), --series UID or --study UID", file=sys.stderr)
        return 2
    url = cli_nats_url(args)
    try:
        return asyncio.run(_retry(args, url))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"caduceus retry: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _retry(args: argparse.Namespace, url: str) -> int:
    bus = await connect_cli_bus(url, default_actor())
    try:
        tasks = await read_tasks(bus, args.task_ids, args.series, args.study)
        chosen = _choose(tasks, args.task_ids, args.series, args.study)
        if not chosen:
            return EXIT_NOTHING
        for view in chosen:
            await bus.publish(retry_event(view.request, bus.actor, args.comment))
            payload = view.request.payload
            print(f"retry requested: task {payload['task_id']} -> {payload.get('target')} "
                  f"({_scope(view.request)}, was {view.state}"
                  f"{': ' + view.error if view.error else ''})")
        return 0
    finally:
        await bus.close()


async def read_tasks(bus: Bus, task_ids: list[str], series: str | None,
                     study: str | None = None) -> dict[str, TaskView]:
    """The current state of the tasks asked for (and of others, when read from the stream)."""
    tasks: dict[str, TaskView] = {}
    try:
        stored_until = await _bookkeeper_stored_until(bus)
        events = await _dispatch_events_from_bookkeeper(bus, task_ids, series, study)
    except BookkeeperUnavailable:
        async for event in replay(bus, f"{EVENTS_PREFIX}.dispatch.>"):
            fold_task_event(tasks, event)
        return tasks
    # What the bookkeeper had not stored yet (a failure a moment ago) is on the stream's tail; an
    # event it stored meanwhile comes twice and counts once.
    async for event in replay(bus, f"{EVENTS_PREFIX}.dispatch.>", start_seq=stored_until + 1):
        if (series and event.series_uid == series) or (study and event.study_uid == study) \
                or (event.payload.get("task_id") or event.task_id) in task_ids:
            events.setdefault(event.event_id, event)
    for event in sorted(events.values(), key=lambda event: event.stream_seq or 0):
        fold_task_event(tasks, event)
    return tasks


async def _bookkeeper_stored_until(bus: Bus) -> int:
    """The EVENTS sequence up to which the bookkeeper has stored every event (what it has acked)."""
    try:
        info = await bus.js.consumer_info(BOOKKEEPER_EVENTS.stream, BOOKKEEPER_EVENTS.name)
    except NotFoundError:
        raise BookkeeperUnavailable("the bookkeeper has never read the EVENTS stream") from None
    return (info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def _dispatch_events_from_bookkeeper(bus: Bus, task_ids: list[str], series: str | None,
                                           study: str | None = None) -> dict[str, Event]:
    client = BookkeeperClient(bus, timeout=10)
    queries = [{"task_id": task_id} for task_id in task_ids] + ([{"series_uid": series}] if series else []) \
        + ([{"study_uid": study}] if study else [])
    found: dict[str, Event] = {}
    for query in queries:
        for record in await client.all_events(type="dispatch.*", **query):
            found[record.event_id] = record.to_event()
    return found


def fold_task_event(tasks: dict[str, TaskView], event: Event) -> None:
    task_id = event.payload.get("task_id") or event.task_id
    if not task_id:
        return
    if event.type == "dispatch.requested":
        tasks.setdefault(task_id, TaskView(request=event))
        return
    view = tasks.get(task_id)
    if view is None or event.type not in STATES:
        return
    if event.type == "dispatch.started":
        if view.state not in ("done", "error"):  # a late copy does not undo an outcome
            view.state = STATES[event.type]
        return
    view.state = STATES[event.type]
    view.error = str(event.payload.get("error", "")) if event.type != "dispatch.completed" else ""


def _choose(tasks: dict[str, TaskView], task_ids: list[str], series: str | None,
            study: str | None = None) -> list[TaskView]:
    chosen: list[TaskView] = []
    for task_id in task_ids:
        view = tasks.get(task_id)
        if view is None:
            print(f"caduceus retry: no dispatch task {task_id}", file=sys.stderr)
        elif view.state == "done":
            print(f"task {task_id} already completed (done); nothing to retry", file=sys.stderr)
        else:
            chosen.append(view)
    if series:
        chosen += [v for v in _failed(tasks, f"series {series}", lambda r: r.series_uid == series) if v not in chosen]
    if study:
        chosen += [v for v in _failed(tasks, f"study {study}", lambda r: r.study_uid == study) if v not in chosen]
    return chosen


def _failed(tasks: dict[str, TaskView], scope: str, belongs: Callable[[Event], bool]) -> list[TaskView]:
    failed = [v for v in tasks.values() if v.state == "error" and belongs(v.request)]
    if not failed:
        print(f"caduceus retry: no failed dispatch task for {scope}", file=sys.stderr)
    return failed


def _scope(request: Event) -> str:
    return f"series {request.series_uid}" if request.series_uid else f"study {request.study_uid}"


def retry_event(request: Event, actor: str, comment: str) -> Event:
    task_id = request.payload["task_id"]
    return make_event("dispatch.retry_requested", actor, DispatchRetryRequested(task_id=task_id, reason=comment),
                      task_id=task_id, study_uid=request.study_uid, series_uid=request.series_uid,
                      correlation_id=request.correlation_id or request.event_id, causation_id=request.event_id)
