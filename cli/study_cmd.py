"""`caduceus study complete STUDY_UID`: an administrator forces completion of an open study.

Publishes `study.complete_requested` (actor `user:<name>`); the router completes the study's open
batch at its next tick and decides its study-trigger rules as if the study had completed.
"""

from __future__ import annotations

import argparse
import sys

from cli.connection import (
    EXIT_UNREACHABLE,
    add_connection_arguments,
    cli_nats_url,
    default_actor,
    run_with_bus,
)
from shared.bus import Bus
from shared.events import StudyCompleteRequested, make_event


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("study", help="act on studies the router is holding")
    actions = parser.add_subparsers(dest="study_command", required=True)
    complete = actions.add_parser("complete", help="force completion of an open study")
    complete.add_argument("study_uid")
    complete.add_argument("--comment", default="", help="why (kept in the audit log)")
    add_connection_arguments(complete)
    complete.set_defaults(func=run_complete)


def run_complete(args: argparse.Namespace) -> int:
    actor = default_actor()
    event = make_event("study.complete_requested", actor, StudyCompleteRequested(reason=args.comment),
                       study_uid=args.study_uid)

    async def publish(bus: Bus) -> int:
        return await bus.publish(event)

    url = cli_nats_url(args)
    try:
        seq = run_with_bus(url, actor, publish)
    except Exception as exc:  # noqa: BLE001 - unreachable NATS: say so, exit non-zero
        print(f"caduceus: could not publish the request: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"requested completion of study {args.study_uid} (event {event.event_id}, seq {seq})")
    return 0
