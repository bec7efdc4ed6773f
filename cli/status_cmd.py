"""`caduceus status [--json]`: service health, stream depths and consumer lag (shared/health.py).

Exit code 0 when every expected service has a fresh heartbeat (and the embedded NATS of a
`caduceus up` on this data dir passes its own health check), 1 when one is stale or missing (or
that NATS is unhealthy), 3 when NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from cli.connection import (
    EXIT_UNREACHABLE,
    add_connection_arguments,
    cli_nats_url,
    default_actor,
    run_with_bus,
)
from shared.bookkeeper_client import BookkeeperClient, BookkeeperError
from shared.bus import Bus
from shared.health import EXPECTED_SERVICES, HealthReport, collect_health
from shared.natsserver import nats_health
from shared.settings import up_state

EXIT_UNHEALTHY = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("status", help="service health, stream depths and consumer lag")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    add_connection_arguments(parser)
    parser.add_argument("--services", default=",".join(EXPECTED_SERVICES),
                        help="services that must be healthy (comma separated; default all seven)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    expected = tuple(s.strip() for s in args.services.split(",") if s.strip())
    url = cli_nats_url(args)

    async def gather(bus: Bus) -> tuple[HealthReport, Work | None]:
        return await collect_health(bus, expected), await work_view(bus)

    try:
        report, work = run_with_bus(url, default_actor(), gather)
    except Exception as exc:  # noqa: BLE001
        print(f"caduceus status: cannot read status from NATS at {url}: {exc!r}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    nats = embedded_nats_health(args.data_dir, args.nats_url)
    if args.json:
        print(json.dumps({**report.model_dump(mode="json"), "nats": nats,
                          **(asdict(work) if work else {})}, indent=2))
    else:
        print(render(report, nats, work))
    return 0 if all_healthy(report, nats) else EXIT_UNHEALTHY


@dataclass
class Work:
    """What needs an operator, from the bookkeeper: failed tasks, recently quarantined images."""

    tasks_by_state: dict[str, int]
    quarantined_last_day: int


async def work_view(bus: Bus) -> Work | None:
    """None when the bookkeeper does not answer (its own line in SERVICES says why)."""
    client = BookkeeperClient(bus, timeout=3)
    try:
        stats = await client.stats()
        recent = await client.count(since=datetime.now(UTC) - timedelta(days=1))
    except BookkeeperError:
        return None
    return Work(stats.tasks_by_state, recent.counts.get("image.quarantined", 0))


def all_healthy(report: HealthReport, nats: dict[str, object] | None) -> bool:
    return report.healthy and (nats is None or bool(nats["healthy"]))


def embedded_nats_health(data_dir: str | None, explicit_url: str | None = None) -> dict[str, object] | None:
    """nats-server's /healthz, for the embedded NATS of a `caduceus up` on this data dir (none when
    the command was pointed at another NATS)."""
    url = up_state(data_dir).get("nats_monitor_url")
    if not isinstance(url, str) or os.environ.get("CADUCEUS_NATS_URL") or explicit_url:
        return None
    healthy, error = nats_health(url)
    return {"healthy": healthy, "error": error, "monitor_url": url}


def render(report: HealthReport, nats: dict[str, object] | None = None, work: Work | None = None) -> str:
    lines = [f"caduceus: {'healthy' if all_healthy(report, nats) else 'UNHEALTHY'}  "
             f"({report.checked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC)"]
    failed = work.tasks_by_state.get("error", 0) if work else 0
    if failed:
        lines.append(f"ATTENTION: {failed} task(s) failed and wait for an operator: "
                     "`caduceus tasks --state error` lists them, `caduceus retry` resends")
    if work and work.quarantined_last_day:
        lines.append(f"ATTENTION: {work.quarantined_last_day} image(s) quarantined in the last 24 h (refused "
                     "with 0xC000, kept under <data dir>/blobs/quarantine): "
                     "`caduceus bookkeeper events --type image.quarantined` says why")
    lines += ["", "SERVICES"]
    if nats is not None:
        state = "healthy" if nats["healthy"] else f"UNHEALTHY: {nats['error']}"
        lines.append(f"  {'nats':<11} {state}  (embedded; {nats['monitor_url']}/healthz)")
    config_last = next((s.last_seq for s in report.streams if s.name == "CONFIG"), None)
    for service in report.services:
        marker = "" if service.expected else "  (not expected)"
        if not service.instances:
            lines.append(f"  {service.service:<11} {service.state:<8} no heartbeat{marker}")
            continue
        for i, inst in enumerate(service.instances):
            name = service.service if i == 0 else ""
            details = " ".join(f"{k}={v}" for k, v in inst.details.items())
            lines.append(f"  {name:<11} {inst.state:<8} {inst.instance:<32} pid {inst.pid:<7} "
                         f"beat {inst.age_seconds:>6.1f}s ago  up {inst.uptime_seconds:>8.0f}s"
                         f"  {_config(inst.config_seq, config_last)}"
                         f"{'  ' + details if details else ''}{marker if i == 0 else ''}")
    if work is not None:
        tasks = work.tasks_by_state
        counts = ", ".join(f"{tasks.get(state, 0)} {state}" for state in ("error", "retrying", "sending", "queued", "done"))
        lines += ["", f"TASKS  {counts}  (bookkeeper's projection; `caduceus tasks`)"]
    lines += ["", "STREAMS", f"  {'name':<8} {'messages':>10} {'bytes':>14} {'first':>8} {'last':>8} {'consumers':>9} "
                             f"{'kept':>8}"]
    for stream in report.streams:
        lines.append(f"  {stream.name:<8} {stream.messages:>10} {stream.bytes:>14} {stream.first_seq:>8} "
                     f"{stream.last_seq:>8} {stream.consumer_count:>9} {_kept(stream.max_age_seconds):>8}")
    lines += ["", "CONSUMERS", f"  {'stream':<8} {'durable':<20} {'pending':>9} {'ack_pending':>11} "
                               f"{'redelivered':>11} {'ack_floor':>9}"]
    if not report.consumers:
        lines.append("  (no durable consumers yet)")
    for c in report.consumers:
        lines.append(f"  {c.stream:<8} {c.name:<20} {c.num_pending:>9} {c.num_ack_pending:>11} "
                     f"{c.num_redelivered:>11} {c.ack_floor_seq:>9}")
    return "\n".join(lines)


def _config(seq: int | None, last: int | None) -> str:
    """Which configuration an instance uses; flagged when the CONFIG stream has a later one."""
    if seq is None:
        return "config ?"
    return f"config {seq}" + (f" (BEHIND {last})" if last is not None and seq < last else "")


def _kept(max_age_seconds: float) -> str:
    if not max_age_seconds:
        return "always"
    if max_age_seconds >= 86400:
        return f"{round(max_age_seconds / 86400, 1):g}d"
    return f"{round(max_age_seconds / 3600, 1):g}h"
