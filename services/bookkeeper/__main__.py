"""`python -m services.bookkeeper`: run the service; `... rebuild [--database-url URL]`: rebuild its projections.

The rebuild is an entry point of the service's own process, so that `caduceus bookkeeper rebuild`
runs it without the CLI importing the service's database code.
"""

import argparse
import json
import sys

from services.bookkeeper.service import BookkeeperService
from shared.runtime import run_service
from shared.settings import load_settings


def rebuild_main(argv: list[str]) -> int:
    from services.bookkeeper.rebuild import NoAuditLog, rebuild_database

    parser = argparse.ArgumentParser(prog="python -m services.bookkeeper rebuild")
    parser.add_argument("--database-url")
    args = parser.parse_args(argv)
    try:
        counts = rebuild_database(args.database_url or load_settings().resolved_database_url())
    except NoAuditLog as exc:
        print(f"caduceus bookkeeper rebuild: {exc}; nothing done (check --database-url or --data-dir)",
              file=sys.stderr)
        return 1
    print(json.dumps(counts))  # one line for `caduceus bookkeeper rebuild` to read
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["rebuild"]:
        sys.exit(rebuild_main(sys.argv[2:]))
    run_service(BookkeeperService)
