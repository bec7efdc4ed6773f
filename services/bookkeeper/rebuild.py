"""`caduceus bookkeeper rebuild`: replay the audit log into fresh projections, directly on the database."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from services.bookkeeper.db import create_db_engine, normalize_url, open_database
from services.bookkeeper.projector import rebuild


class NoAuditLog(Exception):
    """The URL names no caduceus audit log (a mistyped path would otherwise get a new, empty one)."""


def rebuild_database(url: str) -> dict[str, int]:
    """Migrate to head, then empty and refill the projections in one transaction.

    Safe while the bookkeeper runs: the cursor rows are locked first, so live batches wait for the
    rebuild to commit and then continue from the rebuilt cursor.
    """
    _require_audit_log(url)
    engine = open_database(url)
    try:
        with engine.begin() as conn:
            return rebuild(conn)
    finally:
        engine.dispose()


def _require_audit_log(url: str) -> None:
    parsed = make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        if not Path(parsed.database).is_file():
            raise NoAuditLog(f"no bookkeeper database at {parsed.database}")
    engine = create_db_engine(url)
    try:
        if not inspect(engine).has_table("events"):
            raise NoAuditLog(f"{parsed.render_as_string(hide_password=True)} holds no caduceus audit log "
                             "(no events table)")
    finally:
        engine.dispose()
