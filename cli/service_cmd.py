"""`caduceus service NAME`: run one service in the foreground (what the launcher spawns)."""

from __future__ import annotations

import argparse
import runpy

from shared.health import EXPECTED_SERVICES as SERVICES


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("service", help="run one service in the foreground")
    parser.add_argument("name", choices=SERVICES)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Same as `python -m services.NAME`; the CLI does not import service code otherwise.
    runpy.run_module(f"services.{args.name}", run_name="__main__", alter_sys=True)
    return 0
