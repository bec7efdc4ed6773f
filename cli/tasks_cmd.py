"""`caduceus tasks`: dispatch and processing tasks from the bookkeeper's projection.

The way to find what did not get delivered: `caduceus tasks --state error` lists the tasks that
used up their attempts, with the last error and the `caduceus retry` that resends them.
"""

from __future__ import annotations

import argparse

from cli.connection import add_connection_arguments, with_bookkeeper
from shared.bookkeeper_client import TASK_STATES, BookkeeperClient, TaskRecord


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("tasks", help="list dispatch/processing tasks (e.g. the failed ones: --state error)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", choices=TASK_STATES, help="only tasks in this state")
    parser.add_argument("--series", dest="series_uid", metavar="UID", help="only this series' tasks")
    parser.add_argument("--target", help="only tasks for this target")
    parser.add_argument("--limit", type=int, default=50, help="newest first, at most this many (default 50)")
    parser.add_argument("--json", action="store_true", help="one JSON document per line")
    add_connection_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    filters = {"state": args.state, "series_uid": args.series_uid, "target": args.target}

    async def action(client: BookkeeperClient) -> int:
        page = await client.tasks(**{k: v for k, v in filters.items() if v is not None},
                                  limit=max(1, min(args.limit, 1000)))
        for task in page.tasks:
            print(task.model_dump_json() if args.json else format_task(task))
        if not args.json:
            print(summary_line(len(page.tasks), page.total, args.state))
            failed = [t.task_id for t in page.tasks if t.state == "error"]
            if failed:
                print(f"resend with: caduceus retry {' '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}"
                      f"  (or --series UID)")
        return 0

    return with_bookkeeper(args, action)


def format_task(task: TaskRecord) -> str:
    when = task.updated_at.strftime("%Y-%m-%d %H:%M:%S")
    line = (f"{when}  {task.state:<8} {task.kind:<8} {task.target or '-':<16} attempts={task.attempts}  "
            f"task={task.task_id}  series={task.series_uid or '-'}")
    if task.last_error and task.state in ("error", "retrying"):
        line += f"\n    last error: {task.last_error}"
    return line


def summary_line(shown: int, total: int, state: str | None) -> str:
    what = f"{state} task(s)" if state else "task(s)"
    return f"{total} {what}" + (f", newest {shown} shown" if shown < total else "")
