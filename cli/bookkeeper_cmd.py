"""`caduceus bookkeeper ...`: rebuild projections (direct DB access) and read the audit log (via RPC)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from cli.connection import add_connection_arguments, with_bookkeeper
from shared.bookkeeper_client import BookkeeperClient, EventRecord, SeriesHistoryResponse
from shared.settings import cli_data_dir, load_settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("bookkeeper", help="audit log: rebuild projections, list events, series history")
    commands = parser.add_subparsers(dest="bookkeeper_command", required=True)

    rebuild = commands.add_parser("rebuild", help="drop and rebuild the projections from the events table "
                                  "(opens the database directly; the bookkeeper may be stopped)")
    rebuild.add_argument("--database-url", help="SQLAlchemy URL (default: CADUCEUS_DATABASE_URL or the "
                         "SQLite file in the data dir)")
    rebuild.add_argument("--data-dir", help="data dir whose bookkeeper.sqlite to rebuild (default: "
                         "CADUCEUS_DATA_DIR, else ./caduceus-data)")
    rebuild.set_defaults(func=cmd_rebuild)

    events = commands.add_parser("events", help="list events from the audit log")
    events.add_argument("--series", dest="series_uid")
    events.add_argument("--study", dest="study_uid")
    events.add_argument("--task", dest="task_id")
    events.add_argument("--correlation", dest="correlation_id")
    events.add_argument("--type", help="event type, or a prefix with '*' (dispatch.*)")
    events.add_argument("--stream", choices=["EVENTS", "CONFIG"])
    events.add_argument("--since-seq", type=int, default=0)
    events.add_argument("--limit", type=int, default=100)
    events.add_argument("--newest", action="store_true", help="the newest --limit events (default: the oldest)")
    events.add_argument("--json", action="store_true", help="one JSON document per line")
    add_connection_arguments(events)
    events.set_defaults(func=cmd_events)

    history = commands.add_parser("history", help="one series: its state, tasks and events")
    history.add_argument("series_uid")
    history.add_argument("--json", action="store_true")
    add_connection_arguments(history)
    history.set_defaults(func=cmd_history)


# ------------------------------------------------------------------ rebuild

def cmd_rebuild(args: argparse.Namespace) -> int:
    # The service's own entry point does the work: the CLI does not import a service's code.
    url = args.database_url or load_settings().model_copy(
        update={"data_dir": cli_data_dir(args.data_dir)}).resolved_database_url()
    done = subprocess.run([sys.executable, "-m", "services.bookkeeper", "rebuild", "--database-url", url],
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        return 1  # the reason is on stderr already
    counts: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    total = sum(counts.values())
    detail = ", ".join(f"{stream}: {n}" for stream, n in sorted(counts.items())) or "empty log"
    print(f"rebuilt projections from {total} events ({detail})")
    return 0


# ------------------------------------------------------------------ RPC commands

def cmd_events(args: argparse.Namespace) -> int:
    filters = {k: getattr(args, k) for k in ("series_uid", "study_uid", "task_id", "correlation_id", "type",
                                              "stream", "since_seq", "limit", "newest")}

    async def action(client: BookkeeperClient) -> int:
        page = await client.events(**{k: v for k, v in filters.items() if v is not None})
        for event in page.events:
            print(event.model_dump_json() if args.json else format_event(event))
        if not args.json and page.next_since_seq is not None:
            stream = f" --stream {args.stream}" if args.stream else " (with --stream EVENTS or CONFIG: "\
                "their sequences are counted apart)"
            print(f"(more: --since-seq {page.next_since_seq}{stream})")
        return 0

    return with_bookkeeper(args, action)


def cmd_history(args: argparse.Namespace) -> int:
    async def action(client: BookkeeperClient) -> int:
        history = await client.series_history(args.series_uid)
        if args.json:
            print(history.model_dump_json(indent=2))
        else:
            print(format_history(history))
        return 0 if history.series or history.events else 1

    return with_bookkeeper(args, action)


# ------------------------------------------------------------------ formatting

SUMMARY_FIELDS = ("severity", "message", "target", "destination", "rule", "reason", "error", "attempt", "attempts", "sent",
                  "changed_since_routed", "instance_count", "matched_rules", "discarded", "trigger", "calling_aet",
                  "duplicate", "service", "kind", "name")


def summarize(payload: dict[str, Any]) -> str:
    parts = [f"{k}={json.dumps(payload[k]) if not isinstance(payload[k], str) else payload[k]}"
             for k in SUMMARY_FIELDS if k in payload and payload[k] not in (None, "", [])]
    return " ".join(parts)


def format_event(event: EventRecord) -> str:
    when = event.occurred_at.strftime("%Y-%m-%d %H:%M:%S")
    where = event.sop_uid and f"sop={event.sop_uid}" or event.task_id and f"task={event.task_id}" or ""
    summary = summarize(event.payload)
    if event.type == "image.quarantined":  # where the bytes are, relative to <data dir>/blobs
        summary += f" kept={event.payload.get('blob_key') or 'not kept'}"
    return f"{event.stream}#{event.stream_seq:<6} {when} {event.type:<26} {event.actor:<12} {where} {summary}".rstrip()


def format_history(history: SeriesHistoryResponse) -> str:
    lines: list[str] = []
    s = history.series
    if s is None:
        lines.append("series not in the projections (no image.received seen)")
    else:
        lines += [
            f"Series   {s.series_uid}",
            f"Study    {s.study_uid}",
            f"Patient  {s.patient_name or '-'} ({s.patient_id or '-'})",
            f"         {s.modality or '-'} {s.description or ''}".rstrip(),
            f"From     {s.sender or '-'} {s.sender_host or ''}".rstrip(),
            f"Status   {s.status}  instances={s.instance_count}  tasks: {s.tasks_done} done, "
            f"{s.tasks_failed} failed of {s.tasks_total}",
            f"Received {s.first_received:%Y-%m-%d %H:%M:%S} .. {s.last_received:%Y-%m-%d %H:%M:%S}"
            if s.first_received and s.last_received else "Received -",
        ]
    if history.tasks:
        lines.append("")
        lines.append("Tasks")
        for t in history.tasks:
            err = f"  last error: {t.last_error}" if t.last_error else ""
            lines.append(f"  {t.task_id}  {t.kind:<12} {t.state:<9} target={t.target or '-'} rule={t.rule or '-'} "
                         f"attempts={t.attempts}{err}")
    lines.append("")
    lines.append(f"Events ({len(history.events)})")
    lines += [f"  {format_event(e)}" for e in history.events]
    return "\n".join(lines)
