"""`caduceus status [--json]`: service health, stream depths and consumer lag (shared/health.py).

Exit code 0 when every expected service has a fresh heartbeat, 1 when one is stale or missing,
3 when NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys

from cli.config_cmd import EXIT_UNREACHABLE, default_actor, run_with_bus
from shared.health import EXPECTED_SERVICES, HealthReport, collect_health
from shared.settings import nats_url_for_cli

EXIT_UNHEALTHY = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("status", help="service health, stream depths and consumer lag")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument("--data-dir", default=None,
                        help="data dir of a running `caduceus up` (to find its NATS); "
                             "default $CADUCEUS_DATA_DIR or ./caduceus-data")
    parser.add_argument("--services", default=",".join(EXPECTED_SERVICES),
                        help="services that must be healthy (comma separated; default all seven)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    expected = tuple(s.strip() for s in args.services.split(",") if s.strip())
    try:
        report = run_with_bus(args.data_dir, default_actor(), lambda bus: collect_health(bus, expected))
    except Exception as exc:  # noqa: BLE001
        print(f"caduceus status: cannot read status from NATS at {nats_url_for_cli(args.data_dir)}: {exc!r}",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        print(render(report))
    return 0 if report.healthy else EXIT_UNHEALTHY


def render(report: HealthReport) -> str:
    lines = [f"caduceus: {'healthy' if report.healthy else 'UNHEALTHY'}  "
             f"({report.checked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC)", "", "SERVICES"]
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
                         f"{'  ' + details if details else ''}{marker if i == 0 else ''}")
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


def _kept(max_age_seconds: float) -> str:
    if not max_age_seconds:
        return "always"
    if max_age_seconds >= 86400:
        return f"{round(max_age_seconds / 86400, 1):g}d"
    return f"{round(max_age_seconds / 3600, 1):g}h"
