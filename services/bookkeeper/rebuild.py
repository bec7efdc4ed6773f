"""`caduceus bookkeeper rebuild`: replay the audit log into fresh projections, directly on the database."""

from __future__ import annotations

from services.bookkeeper.db import open_database
from services.bookkeeper.projector import rebuild


def rebuild_database(url: str) -> dict[str, int]:
    """Migrate to head, then empty and refill the projections in one transaction.

    Safe while the bookkeeper runs: the cursor rows are locked first, so live batches wait for the
    rebuild to commit and then continue from the rebuilt cursor.
    """
    engine = open_database(url)
    try:
        with engine.begin() as conn:
            return rebuild(conn)
    finally:
        engine.dispose()
