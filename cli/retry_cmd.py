"""`caduceus retry TASK_ID...` / `caduceus retry --series UID`: send failed dispatch tasks again.

Publishes one `dispatch.retry_requested` per task (actor `user:<name>`); a dispatcher resets the
task's attempt counter and sends what the target has not confirmed yet. The state of each task is
read from the dispatch events in the EVENTS stream (the source of truth; no other service needs to
run), so the command can say what it did: a completed task is not retried, an unknown one is an
error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass

import nats.errors

from cli.config_cmd import default_actor
from shared.bus import Bus, replay
from shared.events import DispatchRetryRequested, Event, make_event
from shared.settings import nats_url_for_cli
from shared.subjects import EVENTS_PREFIX

EXIT_NOTHING = 1
EXIT_UNREACHABLE = 3

# Dispatch event type -> the task state it leaves behind.
STATES = {"dispatch.requested": "queued", "dispatch.attempt_failed": "retrying", "dispatch.failed": "failed",
          "dispatch.completed": "completed", "dispatch.retry_requested": "retry requested"}


@dataclass
class TaskView:
    request: Event
    state: str = "queued"
    error: str = ""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("retry", help="send failed dispatch tasks again",
                            description="Ask the dispatchers to send failed tasks again (resets their attempt "
                                        "count; instances the target already confirmed are not re-sent).")
    parser.add_argument("task_ids", nargs="*", metavar="TASK_ID", help="task id(s) to retry")
    parser.add_argument("--series", metavar="UID", help="retry every failed dispatch task of this series")
    parser.add_argument("--comment", default="", help="why (kept in the event)")
    parser.add_argument("--nats-url", default=None, help="NATS server (default: CADUCEUS_NATS_URL or the "
                                                         "server `caduceus up` started)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.task_ids and not args.series:
        print("caduceus retry: give TASK_ID(s) or --series UID", file=sys.stderr)
        return 2
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    try:
        return asyncio.run(_retry(args))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        print(f"caduceus retry: cannot reach NATS: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


async def _retry(args: argparse.Namespace) -> int:
    url = args.nats_url or nats_url_for_cli()
    bus = await Bus.connect(url, actor=default_actor(), connect_timeout=3, max_reconnect_attempts=2)
    try:
        tasks = await read_tasks(bus)
        chosen = _choose(tasks, args.task_ids, args.series)
        if not chosen:
            return EXIT_NOTHING
        for view in chosen:
            await bus.publish(retry_event(view.request, bus.actor, args.comment))
            payload = view.request.payload
            print(f"retry requested: task {payload['task_id']} -> {payload.get('target')} "
                  f"(series {view.request.series_uid}, was {view.state}"
                  f"{': ' + view.error if view.error else ''})")
        return 0
    finally:
        await bus.close()


async def read_tasks(bus: Bus) -> dict[str, TaskView]:
    """Fold the dispatch events of the EVENTS stream into the current state of every task."""
    tasks: dict[str, TaskView] = {}
    async for event in replay(bus, f"{EVENTS_PREFIX}.dispatch.>"):
        task_id = event.payload.get("task_id") or event.task_id
        if not task_id:
            continue
        if event.type == "dispatch.requested":
            tasks.setdefault(task_id, TaskView(request=event))
            continue
        view = tasks.get(task_id)
        if view is None or event.type not in STATES:
            continue
        view.state = STATES[event.type]
        view.error = str(event.payload.get("error", "")) if event.type != "dispatch.completed" else ""
    return tasks


def _choose(tasks: dict[str, TaskView], task_ids: list[str], series: str | None) -> list[TaskView]:
    chosen: list[TaskView] = []
    for task_id in task_ids:
        view = tasks.get(task_id)
        if view is None:
            print(f"caduceus retry: no dispatch task {task_id}", file=sys.stderr)
        elif view.state == "completed":
            print(f"task {task_id} already completed; nothing to retry", file=sys.stderr)
        else:
            chosen.append(view)
    if series:
        failed = [v for v in tasks.values() if v.request.series_uid == series and v.state == "failed"]
        if not failed:
            print(f"caduceus retry: no failed dispatch task for series {series}", file=sys.stderr)
        chosen += [v for v in failed if v not in chosen]
    return chosen


def retry_event(request: Event, actor: str, comment: str) -> Event:
    task_id = request.payload["task_id"]
    return make_event("dispatch.retry_requested", actor, DispatchRetryRequested(task_id=task_id, reason=comment),
                      task_id=task_id, study_uid=request.study_uid, series_uid=request.series_uid,
                      correlation_id=request.correlation_id or request.event_id, causation_id=request.event_id)
