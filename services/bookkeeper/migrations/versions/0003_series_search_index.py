"""indexed substring search for the series browser (pg_trgm on Postgres, FTS5 trigram on SQLite)

Revision ID: 0003
Revises: 0002

The series browser searches five columns of `series` for a case-insensitive substring
(services/bookkeeper/queries.py). `LIKE '%...%'` cannot use a b-tree, so every search scanned the
whole table (bench/growth.py). This adds a trigram index beside `series`, kept in sync by triggers on
`series` (so the projector, live and in `caduceus bookkeeper rebuild`, needs no code for it; a
rebuild's DELETE and re-insert of every series refills it):

- Postgres: `series_search(series_uid, document)` with a GIN `gin_trgm_ops` index on `document`.
  `document` is lower(coalesce(column, '')) of the five columns joined by chr(31), which makes
  `document LIKE '%needle%'` equal to the per-column predicate for any needle without chr(31)
  (queries.py relies on this).
- SQLite: an FTS5 table with the trigram tokenizer (SQLite >= 3.34), keyed by a small
  `series_search_docs` table that gives each series a stable integer id (a `series` rowid is not
  stable: VACUUM may renumber the rowids of a table without an INTEGER PRIMARY KEY).

A side table rather than an index on `series` itself: every projected event rewrites its series row
(last_event_at, counters), and a GIN index on `series` would take ~100 new trigram entries per row
version; the side table is written only when a searchable column actually changes (trigger WHEN).

When the trigram machinery is missing (pg_trgm not installable by this role, SQLite without FTS5 or
the trigram tokenizer) the migration logs a warning and the search stays a scan: on Postgres the side
table is still kept (scanning it is cheaper than scanning `series`) and the index can be added later
with the two statements in the warning; on SQLite nothing is created and queries.py scans `series`.
"""
from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

log = logging.getLogger("services.bookkeeper.migrations")

COLUMNS = ("patient_name", "patient_id", "description", "series_uid", "study_uid")
PG_INDEX = "CREATE INDEX ix_series_search_trgm ON series_search USING gin (document gin_trgm_ops)"


def _pg_document(row: str) -> str:
    # models.PG_SEARCH_SEPARATOR between the fields: a needle without it cannot match across two.
    return " || chr(31) || ".join(f"lower(coalesce({row}.{c}, ''))" for c in COLUMNS)


def _sqlite_document(row: str) -> str:
    # The FTS5 trigram tokenizer folds case itself; the separator keeps fields apart as on Postgres.
    return " || char(31) || ".join(f"coalesce({row}.{c}, '')" for c in COLUMNS)


def _changed(old: str, new: str, distinct: str) -> str:
    return " OR ".join(f"{old}.{c} {distinct} {new}.{c}" for c in COLUMNS)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        _upgrade_postgres(bind)
    elif bind.dialect.name == "sqlite":
        _upgrade_sqlite(bind)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for trigger in ("series_search_insert", "series_search_update", "series_search_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON series")
        op.execute("DROP FUNCTION IF EXISTS series_search_sync()")
        op.execute("DROP TABLE IF EXISTS series_search")
    elif bind.dialect.name == "sqlite":
        for trigger in ("series_search_insert", "series_search_update", "series_search_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        op.execute("DROP TABLE IF EXISTS series_search")
        op.execute("DROP TABLE IF EXISTS series_search_docs")


# ------------------------------------------------------------------ Postgres

def _pg_trgm_ready(bind: sa.Connection) -> bool:
    """CREATE EXTENSION pg_trgm if this role may; False (and a warning) if it may not.

    pg_trgm is a trusted extension (Postgres >= 13): a role with CREATE on the database can install
    it, a superuser always can. A failure must not abort the migration's transaction, hence the
    savepoint.
    """
    if bind.execute(sa.text("SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'")).first():
        return True
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
        return True
    except sa.exc.DBAPIError as exc:
        log.warning("pg_trgm extension could not be created (%s): the series browser search is not indexed "
                    "and scans series_search. To index it, as a superuser: CREATE EXTENSION pg_trgm; %s;",
                    str(exc.orig).strip().splitlines()[0], PG_INDEX)
        return False


def _upgrade_postgres(bind: sa.Connection) -> None:
    op.execute("CREATE TABLE series_search (series_uid TEXT PRIMARY KEY, document TEXT NOT NULL)")
    op.execute(f"""
        CREATE FUNCTION series_search_sync() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('DELETE', 'UPDATE') THEN
                DELETE FROM series_search WHERE series_uid = OLD.series_uid;
            END IF;
            IF TG_OP IN ('INSERT', 'UPDATE') THEN
                INSERT INTO series_search (series_uid, document) VALUES (NEW.series_uid, {_pg_document('NEW')});
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("CREATE TRIGGER series_search_insert AFTER INSERT ON series "
               "FOR EACH ROW EXECUTE FUNCTION series_search_sync()")
    # Only when a searchable value changes: most series writes touch counters and timestamps only.
    op.execute(f"CREATE TRIGGER series_search_update AFTER UPDATE ON series FOR EACH ROW "
               f"WHEN ({_changed('OLD', 'NEW', 'IS DISTINCT FROM')}) EXECUTE FUNCTION series_search_sync()")
    op.execute("CREATE TRIGGER series_search_delete AFTER DELETE ON series "
               "FOR EACH ROW EXECUTE FUNCTION series_search_sync()")
    op.execute(f"INSERT INTO series_search (series_uid, document) SELECT series_uid, {_pg_document('series')} "
               f"FROM series")
    if _pg_trgm_ready(bind):
        op.execute(PG_INDEX)


# ------------------------------------------------------------------ SQLite

def _fts5_trigram_available(bind: sa.Connection) -> bool:
    version = bind.execute(sa.text("SELECT sqlite_version()")).scalar_one()
    try:
        with bind.begin_nested():
            bind.execute(sa.text("CREATE VIRTUAL TABLE temp.caduceus_trigram_probe USING fts5(x, tokenize='trigram')"))
            bind.execute(sa.text("DROP TABLE temp.caduceus_trigram_probe"))
        return True
    except sa.exc.DBAPIError as exc:
        log.warning("SQLite %s has no FTS5 trigram tokenizer (%s; needs >= 3.34 with FTS5): the series browser "
                    "search is not indexed and scans the series table", version, str(exc.orig).strip())
        return False


def _upgrade_sqlite(bind: sa.Connection) -> None:
    if not _fts5_trigram_available(bind):
        return
    op.execute("CREATE TABLE series_search_docs (docid INTEGER PRIMARY KEY, series_uid TEXT NOT NULL UNIQUE)")
    op.execute("CREATE VIRTUAL TABLE series_search USING fts5(document, tokenize='trigram')")
    docid = "(SELECT docid FROM series_search_docs WHERE series_uid = {}.series_uid)"
    op.execute(f"""
        CREATE TRIGGER series_search_insert AFTER INSERT ON series BEGIN
            INSERT INTO series_search_docs (series_uid) VALUES (new.series_uid);
            INSERT INTO series_search (rowid, document) VALUES ({docid.format('new')}, {_sqlite_document('new')});
        END""")
    # Only when a searchable value changes: most series writes touch counters and timestamps only.
    op.execute(f"""
        CREATE TRIGGER series_search_update AFTER UPDATE ON series WHEN {_changed('old', 'new', 'IS NOT')} BEGIN
            UPDATE series_search_docs SET series_uid = new.series_uid WHERE series_uid = old.series_uid;
            UPDATE series_search SET document = {_sqlite_document('new')} WHERE rowid = {docid.format('new')};
        END""")
    op.execute(f"""
        CREATE TRIGGER series_search_delete AFTER DELETE ON series BEGIN
            DELETE FROM series_search WHERE rowid = {docid.format('old')};
            DELETE FROM series_search_docs WHERE series_uid = old.series_uid;
        END""")
    op.execute("INSERT INTO series_search_docs (series_uid) SELECT series_uid FROM series ORDER BY series_uid")
    op.execute(f"INSERT INTO series_search (rowid, document) SELECT d.docid, {_sqlite_document('s')} "
               f"FROM series AS s JOIN series_search_docs AS d ON d.series_uid = s.series_uid")
