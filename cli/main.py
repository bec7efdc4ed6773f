"""`caduceus` entry point. Each command group lives in its own module with a `register()`."""

from __future__ import annotations

import argparse
import os
import sys

from cli import (
    bookkeeper_cmd,
    config_cmd,
    reroute_cmd,
    retry_cmd,
    rule_cmd,
    service_cmd,
    status_cmd,
    study_cmd,
    tasks_cmd,
    up_cmd,
)
from cli.connection import EXIT_UNREACHABLE
from shared.settings import NoCaduceusFound

COMMAND_MODULES = [up_cmd, service_cmd, status_cmd, config_cmd, rule_cmd, tasks_cmd, retry_cmd, reroute_cmd,
                   study_cmd, bookkeeper_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caduceus", description="Event-sourced DICOM orchestrator")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except NoCaduceusFound as exc:
        print(f"caduceus {args.command}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except BrokenPipeError:
        # The reader went away (`caduceus status | head`): not an error of ours. Python would print
        # a traceback when it flushes stdout at exit, so point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
