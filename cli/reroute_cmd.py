"""`caduceus reroute --series UID | --study UID`: decide a completed batch again under today's rules.

For a series that was discarded (no rule matched when it completed, or a rule was missing for a
moment) or that should go somewhere new: the last completed batch of the series (or study) is
looked up in the bookkeeper's log, and `route.requested` asks the router to evaluate the rules in
force now on it, as if it had just completed. The decision and its tasks are new (batch id
`<original>~<request>`); the files are the ones stored (a task sends an instance only while its
stored bytes are those the batch was routed with). Preview first with `caduceus rule test --series`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from cli.connection import (
    EXIT_UNREACHABLE,
    add_connection_arguments,
    cli_nats_url,
    connect_cli_bus,
    default_actor,
)
from shared.bookkeeper_client import BookkeeperClient, BookkeeperError, EventRecord
from shared.events import Event, RouteRequested, make_event, new_event_id

EXIT_NOTHING = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("reroute", help="decide a completed series or study again under the current rules",
                            description="Evaluate the rules in force now on the last completed batch of a series "
                                        "(or study) and create the tasks they call for; for a series that was "
                                        "discarded, or that must go somewhere new. Preview: caduceus rule test "
                                        "--series UID.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--series", metavar="UID", help="the series' last completed series batch")
    which.add_argument("--study", metavar="UID", help="the study's last completed study batch (study rules)")
    parser.add_argument("--comment", default="", help="why (kept in the event)")
    add_connection_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_reroute(args, cli_nats_url(args)))


async def _reroute(args: argparse.Namespace, url: str) -> int:
    try:
        bus = await connect_cli_bus(url, default_actor())
    except Exception as exc:  # noqa: BLE001 - say what failed, no traceback
        print(f"caduceus reroute: cannot reach NATS at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        completed = await _last_completed(BookkeeperClient(bus), args.series, args.study)
        if completed is None:
            what = f"series {args.series}" if args.series else f"study {args.study}"
            print(f"caduceus reroute: no completed batch of {what} in the audit log (still receiving, or "
                  "never received?)", file=sys.stderr)
            return EXIT_NOTHING
        request = reroute_event(completed, bus.actor, args.comment)
        await bus.publish(request)
        payload = RouteRequested.model_validate(request.payload)
        follow = (f"`caduceus bookkeeper history {args.series}` and `caduceus tasks --series {args.series}`"
                  if args.series else f"`caduceus bookkeeper events --study {args.study} --newest`")
        print(f"reroute requested: batch {payload.original_batch_id} is decided again under the current rules "
              f"as batch {payload.batch_id}; the outcome: {follow}")
        return 0
    except BookkeeperError as exc:
        print(f"caduceus reroute: {exc} (the audit log is where completed batches are found)", file=sys.stderr)
        return EXIT_NOTHING
    finally:
        await bus.close()


async def _last_completed(client: BookkeeperClient, series: str | None, study: str | None) -> EventRecord | None:
    if series:
        found = await client.all_events(type="series.completed", series_uid=series)
    else:
        found = await client.all_events(type="study.completed", study_uid=study)
    return max(found, key=lambda record: record.stream_seq, default=None)


def reroute_event(completed: EventRecord, actor: str, comment: str) -> Event:
    original = str(completed.payload["batch_id"])
    event_id = new_event_id()
    batch_id = f"{original}~{event_id[:12]}"  # names the request, so each reroute's tasks are its own
    return make_event("route.requested", actor, RouteRequested(
        batch_id=batch_id, original_batch_id=original, completed_type=completed.type,  # type: ignore[arg-type]
        completed=completed.payload, reason=comment),
        event_id=event_id, study_uid=completed.study_uid, series_uid=completed.series_uid,
        causation_id=completed.event_id, correlation_id=batch_id)
