"""How one-shot CLI commands find and reach caduceus's NATS, and whom they act as."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.bookkeeper_client import BookkeeperClient, BookkeeperError
from shared.bus import Bus
from shared.settings import nats_url_for_cli

T = TypeVar("T")


def default_actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no passwd entry (containers): still say it was a person
        return "user:unknown"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="data dir of a running `caduceus up`, to find its NATS "
                             "(default $CADUCEUS_DATA_DIR or ./caduceus-data)")
    parser.add_argument("--nats-url", default=None,
                        help="NATS of an installation not started by `caduceus up` here "
                             "(default $CADUCEUS_NATS_URL)")


def cli_nats_url(args: argparse.Namespace) -> str:
    """The NATS URL for this command; raises NoCaduceusFound (reported by `cli.main`)."""
    return nats_url_for_cli(args.data_dir, args.nats_url)


async def connect_cli_bus(url: str, actor: str, *, declare: bool = True) -> Bus:
    """A bus for one-shot commands: fails after a few tries instead of waiting forever."""
    # The bus logs connection chatter as warnings (useful in services); a command reports its own errors.
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    return await Bus.connect(url, actor=actor, declare=declare, connect_timeout=3, max_reconnect_attempts=2)


EXIT_UNREACHABLE = 3  # as every command that cannot reach NATS


def with_bookkeeper(args: argparse.Namespace, action: Callable[[BookkeeperClient], Awaitable[int]]) -> int:
    """Run `action` with a client of the bookkeeper's query RPC; its exit code, 3 without NATS, 1
    when the bookkeeper does not answer or fails."""
    url = cli_nats_url(args)

    async def run() -> int:
        try:
            bus = await connect_cli_bus(url, default_actor(), declare=False)
        except Exception as exc:  # noqa: BLE001 - say what failed, no traceback
            print(f"error: cannot reach NATS at {url}: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        try:
            return await action(BookkeeperClient(bus))
        except BookkeeperError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await bus.close()

    return asyncio.run(run())


def run_with_bus(url: str, actor: str, work: Callable[[Bus], Awaitable[T]], *, declare: bool = True) -> T:
    async def runner() -> T:
        bus = await connect_cli_bus(url, actor, declare=declare)
        try:
            return await work(bus)
        finally:
            await bus.close()

    return asyncio.run(runner())
