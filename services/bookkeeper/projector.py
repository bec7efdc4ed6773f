"""Applying the log to the projections inside a transaction: live (`advance`) and `rebuild`.

The projections follow the `events` table, not the incoming messages: per stream, a cursor in
`projection_cursors` names the last sequence applied, and `advance()` applies the stored events
after it in sequence order, stopping at the first missing sequence (a message another bookkeeper
process holds, not yet committed). Stream sequences whose event was a duplicate (re-published
event_id) are listed in `event_duplicates`, so they do not look like gaps. Sequences at or below
`floor` (messages the stream no longer has) may be skipped. The cursor row is locked (FOR UPDATE on
Postgres; SQLite has one writer anyway) so two processes never apply the same events.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, Table, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from services.bookkeeper.db import is_transient
from services.bookkeeper.models import (
    CONFIG_ITEMS,
    CURSORS,
    DUPLICATES,
    EVENTS,
    PROJECTION_TABLES,
    SERIES,
    SERVICES,
    TASKS,
)
from services.bookkeeper.projections import ProjectionState, StoredEvent, apply_event, keys_for

log = logging.getLogger(__name__)

CHUNK = 1000
IN_CHUNK = 500
PROJECTION_COLUMNS = [EVENTS.c[name] for name in (
    "stream", "stream_seq", "type", "occurred_at", "actor", "study_uid", "series_uid", "task_id",
    "config_kind", "config_name", "payload")]


def dialect_insert(conn: Connection, table: Table) -> Any:
    return (postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table))


def clean(value: Any) -> Any:
    """Postgres text cannot hold NUL; a hostile DICOM tag must not stop the audit log."""
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def upsert(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    rows = [{k: clean(v) for k, v in row.items()} for row in rows]
    stmt = dialect_insert(conn, table)
    keys = [c.name for c in table.primary_key.columns]
    stmt = stmt.on_conflict_do_update(index_elements=keys, set_={
        c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys})
    conn.execute(stmt, rows)


# ------------------------------------------------------------------ cursor

def lock_cursor(conn: Connection, stream: str) -> int:
    conn.execute(dialect_insert(conn, CURSORS).values(stream=stream, last_seq=0).on_conflict_do_nothing())
    value = conn.execute(select(CURSORS.c.last_seq).where(CURSORS.c.stream == stream).with_for_update()).scalar_one()
    return int(value)


def set_cursor(conn: Connection, stream: str, seq: int) -> None:
    conn.execute(CURSORS.update().where(CURSORS.c.stream == stream).values(last_seq=seq))


# ------------------------------------------------------------------ applying

def advance(conn: Connection, stream: str, floor: float = 0,
            on_progress: Callable[[int], None] | None = None) -> int:
    """Apply the contiguous stored events after the cursor; return how many were applied.

    `on_progress(applied so far)` is called after every chunk (rebuild refreshes statistics there).
    """
    cursor = lock_cursor(conn, stream)
    applied = 0
    while True:
        events, last_seq = _next_run(conn, stream, cursor, floor)
        if last_seq == cursor:
            return applied
        apply_guarded(conn, events)
        set_cursor(conn, stream, last_seq)
        applied += len(events)
        cursor = last_seq
        if on_progress is not None:
            on_progress(applied)


def _next_run(conn: Connection, stream: str, cursor: int, floor: float) -> tuple[list[StoredEvent], int]:
    rows = conn.execute(select(*PROJECTION_COLUMNS).where(EVENTS.c.stream == stream, EVENTS.c.stream_seq > cursor)
                        .order_by(EVENTS.c.stream_seq).limit(CHUNK)).all()
    bound = rows[-1].stream_seq if len(rows) == CHUNK else math.inf
    dup_query = select(DUPLICATES.c.stream_seq).where(DUPLICATES.c.stream == stream,
                                                      DUPLICATES.c.stream_seq > cursor)
    if bound != math.inf:
        dup_query = dup_query.where(DUPLICATES.c.stream_seq <= bound)
    dups = conn.execute(dup_query.order_by(DUPLICATES.c.stream_seq).limit(CHUNK)).scalars().all()
    if len(dups) == CHUNK:
        bound = min(bound, dups[-1])
    by_seq: dict[int, StoredEvent | None] = {int(s): None for s in dups if s <= bound}
    by_seq.update({int(r.stream_seq): StoredEvent.from_row(r) for r in rows if r.stream_seq <= bound})
    expected = cursor + 1
    run: list[StoredEvent] = []
    last = cursor
    for seq in sorted(by_seq):
        # A missing sequence is a gap (not committed yet) unless the stream no longer has it.
        if seq != expected and seq > floor + 1:
            break
        event = by_seq[seq]
        if event is not None:
            run.append(event)
        last = seq
        expected = seq + 1
    return run, last


def apply_guarded(conn: Connection, events: list[StoredEvent]) -> None:
    """Apply a run; if the database refuses the result, apply event by event and skip the one it refuses.

    Live and rebuild both go through here, so a skipped event is skipped the same way in both, and
    the audit log (committed with the projections) never waits for a projection problem.
    """
    try:
        with conn.begin_nested():
            apply_events(conn, events)
        return
    except Exception as exc:
        if is_transient(exc):
            raise
        log.error("projection of %d events failed (%s); applying one by one", len(events), exc)
    for event in events:
        try:
            with conn.begin_nested():
                apply_events(conn, [event])
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("projection skipped event %s:%s (%s): %s", event.stream, event.stream_seq, event.type, exc,
                      extra={"series_uid": event.series_uid, "study_uid": event.study_uid,
                             "task_id": event.task_id, "event_type": event.type})


def apply_events(conn: Connection, events: list[StoredEvent]) -> None:
    if not events:
        return
    state = load_state(conn, events)
    for event in events:
        apply_event(state, event)
    upsert(conn, SERIES, [state.series[k] for k in sorted(state.dirty_series)])
    upsert(conn, TASKS, [state.tasks[k] for k in sorted(state.dirty_tasks)])
    upsert(conn, CONFIG_ITEMS, [state.config_items[k] for k in sorted(state.dirty_config)])
    upsert(conn, SERVICES, [state.services[k] for k in sorted(state.dirty_services)])


def _chunks(values: Iterable[Any]) -> Iterable[list[Any]]:
    items = sorted(values)
    for i in range(0, len(items), IN_CHUNK):
        yield items[i:i + IN_CHUNK]


def _rows(conn: Connection, table: Table, column: Any, values: Iterable[Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for part in _chunks(values):
        found.extend(dict(r._mapping) for r in conn.execute(select(table).where(column.in_(part))))
    return found


def load_state(conn: Connection, events: list[StoredEvent]) -> ProjectionState:
    keys = keys_for(events)
    state = ProjectionState()
    for row in _rows(conn, TASKS, TASKS.c.task_id, keys.tasks):
        state.tasks[row["task_id"]] = row
        if row["series_uid"]:
            keys.series.add(row["series_uid"])
    for row in _rows(conn, SERIES, SERIES.c.series_uid, keys.series):
        state.series[row["series_uid"]] = row
    for row in _rows(conn, SERIES, SERIES.c.study_uid, keys.studies):
        state.series[row["series_uid"]] = row
    if keys.config:
        for part in _chunks(keys.config):
            for r in conn.execute(select(CONFIG_ITEMS).where(
                    tuple_(CONFIG_ITEMS.c.kind, CONFIG_ITEMS.c.name).in_(part))):
                state.config_items[(r.kind, r.name)] = dict(r._mapping)
    for row in _rows(conn, SERVICES, SERVICES.c.service, keys.services):
        state.services[row["service"]] = row
    return state


# ------------------------------------------------------------------ rebuild

def rebuild(conn: Connection) -> dict[str, int]:
    """Empty the projections and replay the whole log (call inside one transaction).

    Every stored event is applied, in (stream, stream_seq) order; gaps are irrelevant here
    because the log is all there is. Readers keep seeing the old tables until commit.
    """
    # Write first: takes SQLite's write lock before any read, and locks the Postgres cursor rows so
    # that live batches wait for the rebuild.
    conn.execute(CURSORS.update().values(last_seq=CURSORS.c.last_seq))
    streams = conn.execute(select(EVENTS.c.stream).distinct()).scalars().all()
    for stream in streams:
        lock_cursor(conn, stream)
    for table in PROJECTION_TABLES:
        conn.execute(delete(table))
    # Reset rather than delete: a live batch waiting on the cursor lock then reads 0 and moves on.
    conn.execute(CURSORS.update().values(last_seq=0))
    counts: dict[str, int] = {}
    refresh = _StatisticsRefresh(conn)
    for stream in sorted(streams):
        counts[stream] = advance(conn, stream, floor=math.inf, on_progress=refresh)
        log.info("rebuilt projections from %d events of %s", counts[stream], stream)
    return counts


class _StatisticsRefresh:
    """ANALYZE the projection tables (Postgres) as a rebuild grows them: after 10k, 40k, 160k ...
    events applied.

    Why: the tables were emptied (or never filled) in this very transaction, so the planner's
    statistics describe them as (nearly) empty and the projector's per-chunk lookups get plans for
    empty tables. A rebuild of 10^6 events into a fresh database measured 130 s instead of ~30 s.
    ANALYZE inside the transaction samples the rows it inserted; the geometric steps keep the total
    cost to a few ANALYZE runs.
    """

    FIRST = 10_000
    FACTOR = 4

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.enabled = conn.dialect.name == "postgresql"
        self.next_at = self.FIRST

    def __call__(self, applied: int) -> None:
        if not self.enabled or applied < self.next_at:
            return
        self.next_at = applied * self.FACTOR
        for table in PROJECTION_TABLES:
            self.conn.exec_driver_sql(f"ANALYZE {table.name}")
