"""`caduceus config apply|show|history`: the configuration is the fold of the CONFIG stream.

`apply` validates the whole document first (nothing is published when any part is invalid), plans
the difference against the current fold and publishes one `config.item.*` event per changed item,
with the user as actor. Re-applying the same document publishes nothing. Then (unless `--no-wait`)
it waits until every running service reports, in its heartbeat, that it uses the configuration up
to the last sequence published (shared/config/applied.py), and says who does and who does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from nats.js.errors import APIError

from cli.connection import (
    EXIT_UNREACHABLE,
    add_connection_arguments,
    cli_nats_url,
    default_actor,
    run_with_bus,
)
from shared.bus import Bus
from shared.config.applied import AppliedReport, wait_applied
from shared.config.model import CaduceusConfig, ConfigError, raw_document
from shared.config.state import fold, plan_changes, read_all, read_all_at
from shared.events import ConfigItemChanged, Event

EXIT_INVALID = 2
EXIT_CONFLICT = 4
EXIT_NOT_CONFIRMED = 5   # published, but a running service did not report it in use within --wait
DEFAULT_WAIT_SECONDS = 30.0
WRONG_LAST_SEQUENCE = 10071  # JetStream error code for a failed Nats-Expected-Last-Sequence

class FileError(ValueError):
    """The configuration file cannot be read or parsed."""


def load_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)  # YAML is a superset of JSON, so any other name works too
    except (ValueError, yaml.YAMLError) as exc:
        raise FileError(f"{path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                        f"{exc}") from None


def load_config_file(path: Path) -> CaduceusConfig:
    """Read and validate; raises FileError or ConfigError with a message naming the problem."""
    document = load_document(path)
    if document is None or document == {}:
        # Applying it would delete every rule and target: far more often a wrong or truncated file.
        raise FileError(f"{path} is empty; to remove every rule and target, apply a file that says so "
                        "(targets: {} and rules: {})")
    return CaduceusConfig.parse(document)


def print_warnings(config: CaduceusConfig, prefix: str) -> None:
    for warning in config.warnings():
        print(f"{prefix}: warning: {warning}", file=sys.stderr)


class ConcurrentChange(RuntimeError):
    """Someone else changed the configuration between our read and our publish."""


async def plan_apply(bus: Bus, desired: CaduceusConfig, actor: str, comment: str = "") -> tuple[list[Event], int]:
    """The events that turn the current fold into `desired`, and the CONFIG sequence they are based on."""
    events, based_on = await read_all_at(bus)
    return plan_changes(fold(events), desired, actor, comment), based_on


async def publish_plan(bus: Bus, changes: list[Event], based_on: int) -> int:
    """Publish a plan with "expected last sequence" N, N+1, ...; return the CONFIG sequence of the
    configuration it makes (`based_on` for an empty plan).

    If another apply slipped in after the plan was made, JetStream refuses ours instead of
    silently mixing two plans, and ConcurrentChange is raised.
    """
    last_seq = based_on
    for done, event in enumerate(changes):
        try:
            last_seq = await bus.publish(event, expected_last_seq=last_seq)
        except APIError as exc:
            if exc.err_code != WRONG_LAST_SEQUENCE:
                raise
            raise ConcurrentChange(
                f"the configuration was changed by someone else while applying ({done} of {len(changes)} "
                f"change(s) published); run the command again") from None
    return last_seq


async def apply_config(bus: Bus, desired: CaduceusConfig, actor: str, comment: str = "",
                       dry_run: bool = False) -> list[Event]:
    """Plan against the current fold and publish (unless dry_run); return the planned events."""
    changes, based_on = await plan_apply(bus, desired, actor, comment)
    if not dry_run:
        await publish_plan(bus, changes, based_on)
    return changes


async def apply_and_confirm(bus: Bus, desired: CaduceusConfig, actor: str, comment: str, dry_run: bool,
                            wait: float | None) -> tuple[list[Event], AppliedReport | None]:
    """Plan and publish (unless dry_run), then wait up to `wait` s (None: not at all) for the running
    services to report the configuration in use (also when nothing changed: whether it is)."""
    changes, based_on = await plan_apply(bus, desired, actor, comment)
    if dry_run:
        return changes, None
    seq = await publish_plan(bus, changes, based_on)
    if wait is None or seq == 0:
        return changes, None
    return changes, await wait_applied(bus, seq, timeout=wait)


def describe_change(event: Event) -> str:
    verb = event.type.rsplit(".", 1)[-1]
    fields = event.payload.get("changed_fields") or []
    return f"{verb:8} {event.config_kind}/{event.config_name}" + (f" ({', '.join(fields)})" if fields else "")


# ------------------------------------------------------------------ commands

def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("config", help="apply, show and list the history of the configuration")
    config_sub = parser.add_subparsers(dest="config_command", required=True)

    apply = config_sub.add_parser("apply", help="validate a YAML/JSON file and publish what changed")
    apply.add_argument("file", type=Path)
    apply.add_argument("--comment", default="", help="recorded with every change event")
    apply.add_argument("--dry-run", action="store_true", help="validate and show the plan, publish nothing")
    apply.add_argument("--actor", default=None, help="who applies it (default user:<OS user>)")
    apply.add_argument("--wait", type=float, default=DEFAULT_WAIT_SECONDS, metavar="SECONDS",
                       help="how long to wait for every running service to report that it uses the new "
                            f"configuration (default {DEFAULT_WAIT_SECONDS:g}); exit code {EXIT_NOT_CONFIRMED} "
                            "if one did not")
    apply.add_argument("--no-wait", action="store_true", help="publish and return at once")
    add_connection_arguments(apply)
    apply.set_defaults(func=cmd_apply)

    show = config_sub.add_parser("show", help="print the current configuration (fold of the CONFIG stream)")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    add_connection_arguments(show)
    show.set_defaults(func=cmd_show)

    history = config_sub.add_parser("history", help="list every configuration event")
    history.add_argument("--json", action="store_true", help="one JSON list")
    add_connection_arguments(history)
    history.set_defaults(func=cmd_history)


def _fail(message: str, code: int) -> int:
    print(f"caduceus config: {message}", file=sys.stderr)
    return code


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        desired = load_config_file(args.file)
    except (FileError, ConfigError) as exc:
        return _fail(f"invalid configuration, nothing applied: {exc}", EXIT_INVALID)
    print_warnings(desired, "caduceus config")
    actor = args.actor or default_actor()
    url = cli_nats_url(args)
    wait = None if args.no_wait else max(0.0, args.wait)
    try:
        changes, report = run_with_bus(url, actor, lambda bus: apply_and_confirm(
            bus, desired, actor, args.comment, args.dry_run, wait))
    except ConcurrentChange as exc:
        return _fail(str(exc), EXIT_CONFLICT)
    except Exception as exc:  # noqa: BLE001 - connection trouble: say what and where
        return _fail(f"failed talking to NATS at {url}: {exc!r}", EXIT_UNREACHABLE)
    if not changes:
        print("no changes")
    else:
        prefix = "would apply" if args.dry_run else "applied"
        print(f"{prefix} {len(changes)} change(s) as {actor}:")
        for event in changes:
            print(f"  {describe_change(event)}")
    if report is None:
        return 0
    print(render_applied(report))
    return 0 if report.confirmed else EXIT_NOT_CONFIRMED


def render_applied(report: AppliedReport) -> str:
    """Which running service instances use configuration sequence `report.seq`, and which not."""
    running = [i for i in report.instances if i.state != "stopped"]
    late = [i for i in report.instances if i.state in ("pending", "not reporting")]
    if not running:
        return (f"configuration {report.seq}: no service is running (each reads the whole configuration "
                "when it starts)")
    elif not late:
        head = (f"configuration {report.seq} in use by every running service ({len(running)} instance(s), "
                f"confirmed in {report.waited_seconds:.1f} s)")
    else:
        head = (f"NOT CONFIRMED: {len(late)} of {len(running)} running instance(s) did not report configuration "
                f"{report.seq} in use within {report.waited_seconds:.1f} s")
    lines = [head]
    for i in report.instances:
        if i.state == "applied":
            what = "applied"
        elif i.state == "pending":
            where = " of a CONFIG stream replaced since" if i.other_stream else ""
            what = f"NOT APPLIED (still at {i.config_seq}{where}; last heartbeat {i.age_seconds:.1f} s ago)"
        elif i.state == "not reporting":
            what = "UNKNOWN (an older version: its heartbeat does not say which configuration it uses)"
        else:
            what = "stopped while waiting (reads the whole configuration when it starts)"
        lines.append(f"  {i.service:<11} {i.instance:<40} {what}")
    if report.not_running:
        names = ", ".join(service if age is None else f"{service} (last heartbeat {age:.0f} s ago)"
                          for service, age in report.not_running.items())
        lines.append(f"not running: {names} (a service reads the whole configuration when it starts)")
    return "\n".join(lines)


def current_document(events: list[Event]) -> dict[str, Any]:
    items = fold(events)
    try:
        return CaduceusConfig.from_items(items).to_document()
    except ValueError:
        # Items this version cannot read (newer schema): show them as stored rather than nothing.
        return raw_document(items)


def cmd_show(args: argparse.Namespace) -> int:
    url = cli_nats_url(args)
    try:
        events = run_with_bus(url, default_actor(), read_all)
    except Exception as exc:  # noqa: BLE001
        return _fail(f"failed talking to NATS at {url}: {exc!r}", EXIT_UNREACHABLE)
    document = current_document(events)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")
    return 0


def history_rows(events: list[Event]) -> list[dict[str, Any]]:
    rows = []
    for event in events:
        change = ConfigItemChanged.model_validate(event.payload)
        rows.append({
            "seq": event.stream_seq,
            "time": event.occurred_at.isoformat(timespec="seconds"),
            "actor": event.actor,
            "type": event.type,
            "kind": change.kind,
            "name": change.name,
            "comment": change.comment,
            "changed_fields": change.changed_fields,
            "event_id": event.event_id,
        })
    return rows


def cmd_history(args: argparse.Namespace) -> int:
    url = cli_nats_url(args)
    try:
        events = run_with_bus(url, default_actor(), read_all)
    except Exception as exc:  # noqa: BLE001
        return _fail(f"failed talking to NATS at {url}: {exc!r}", EXIT_UNREACHABLE)
    rows = history_rows(events)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no configuration events")
        return 0
    for row in rows:
        print(f"{row['seq']:>5}  {row['time']}  {row['actor']:<20}  {row['type']:<20}  "
              f"{row['kind']}/{row['name']}"
              + (f" ({', '.join(row['changed_fields'])})" if row["changed_fields"] else "")
              + (f"  # {row['comment']}" if row["comment"] else ""))
    return 0
