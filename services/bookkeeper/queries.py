"""The read side of the RPC API: one function per method, request model in, response model out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, and_, func, or_, select, text

from services.bookkeeper.models import (
    CONFIG_ITEMS,
    CURSORS,
    DUPLICATES,
    EVENTS,
    PG_SEARCH_SEPARATOR,
    PG_SERIES_SEARCH,
    SEARCH_COLUMNS,
    SERIES,
    SERVICES,
    SQLITE_SERIES_SEARCH,
    SQLITE_SERIES_SEARCH_DOCS,
    TASKS,
)
from shared.bookkeeper_client import (
    ConfigItemRecord,
    ConfigItemsRequest,
    ConfigItemsResponse,
    CountRequest,
    CountResponse,
    EventRecord,
    EventsRequest,
    EventsResponse,
    SeriesHistoryRequest,
    SeriesHistoryResponse,
    SeriesRecord,
    SeriesRequest,
    SeriesResponse,
    ServiceRecord,
    ServicesRequest,
    ServicesResponse,
    StatsRequest,
    StatsResponse,
    TaskRecord,
    TasksRequest,
    TasksResponse,
)


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# A trigram index can only answer a needle of at least 3 characters: pg_trgm extracts no trigram from a
# shorter one (the GIN scan would read the whole index) and FTS5's trigram tokenizer matches no row.
# A shorter search scans `series` with the same predicate instead (same results, no prefix-only
# compromise): linear in the series count, as before the index. A common short needle (a digit of a
# UID) fills the page after a few rows of ix_series_last_event_at; the total is always a full count.
TRIGRAM = 3
_FTS_PRESENT = "caduceus.series_search_fts"


def series_search_condition(conn: Connection, search: str) -> Any:
    """Case-insensitive substring of any SEARCH_COLUMNS; served by the trigram index where it can be.

    The result is always the original predicate (`lower(column) LIKE '%needle%'` on one of the
    columns); the index only narrows the rows it is evaluated on. Its candidates are a superset of
    the matches: on Postgres `document` holds each lower(column) (and no more, see below), on SQLite
    the FTS5 tokenizer folds case (Unicode, a superset of SQLite's ASCII-only lower()/LIKE, hence
    the recheck). So results are identical with or without the index, on both backends.
    """
    needle = search.lower()
    pattern = f"%{_like_escape(needle)}%"
    exact = or_(*(func.lower(SERIES.c[c]).like(pattern, escape="\\") for c in SEARCH_COLUMNS))
    if len(needle) < TRIGRAM:
        return exact
    if conn.dialect.name == "postgresql" and PG_SEARCH_SEPARATOR not in needle:
        # `document` is lower(coalesce(column, '')) of the columns joined by the separator, so a
        # needle without the separator is in `document` exactly when it is in one lower(column): the
        # same predicate, without a recheck that would hide the GIN index's selectivity from the
        # planner. Without pg_trgm (migration 0003) this scans the narrow side table: still correct.
        return SERIES.c.series_uid.in_(select(PG_SERIES_SEARCH.c.series_uid).where(
            PG_SERIES_SEARCH.c.document.like(pattern, escape="\\")))
    if conn.dialect.name == "sqlite" and _sqlite_fts_present(conn):
        phrase = '"' + needle.replace('"', '""') + '"'  # an FTS5 string: every character literal
        matched = select(SQLITE_SERIES_SEARCH.c.rowid).where(SQLITE_SERIES_SEARCH.c.document.match(phrase))
        candidates = select(SQLITE_SERIES_SEARCH_DOCS.c.series_uid).where(
            SQLITE_SERIES_SEARCH_DOCS.c.docid.in_(matched))
        return and_(SERIES.c.series_uid.in_(candidates), exact)
    return exact


def _sqlite_fts_present(conn: Connection) -> bool:
    """Whether migration 0003 could create the FTS5 table (cached per database connection)."""
    info = conn.connection.info
    if _FTS_PRESENT not in info:
        info[_FTS_PRESENT] = conn.execute(text(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'series_search'")).first() is not None
    return bool(info[_FTS_PRESENT])


def events(conn: Connection, req: EventsRequest) -> EventsResponse:
    query = select(EVENTS)
    for name in ("series_uid", "study_uid", "task_id", "correlation_id", "stream"):
        value = getattr(req, name)
        if value is not None:
            query = query.where(EVENTS.c[name] == value)
    if req.type:
        if req.type.endswith("*"):
            query = query.where(EVENTS.c.type.like(_like_escape(req.type[:-1]) + "%", escape="\\"))
        else:
            query = query.where(EVENTS.c.type == req.type)
    if req.since_seq:
        query = query.where(EVENTS.c.stream_seq > req.since_seq)
    if req.newest:
        # The last ones stored, across both streams (their sequences are separate counters).
        rows = conn.execute(query.order_by(EVENTS.c.recorded_at.desc(), EVENTS.c.stream_seq.desc())
                            .limit(req.limit)).all()[::-1]
    else:
        rows = conn.execute(query.order_by(EVENTS.c.stream_seq, EVENTS.c.stream).limit(req.limit)).all()
    records = [EventRecord.model_validate(dict(r._mapping)) for r in rows]
    next_seq = records[-1].stream_seq if len(records) == req.limit and not req.newest else None
    return EventsResponse(events=records, next_since_seq=next_seq)


def series(conn: Connection, req: SeriesRequest) -> SeriesResponse:
    conditions: list[Any] = []
    for name in ("status", "study_uid", "patient_id", "modality", "sender"):
        value = getattr(req, name)
        if value is not None:
            conditions.append(SERIES.c[name] == value)
    if req.search:
        conditions.append(series_search_condition(conn, req.search))
    where = and_(True, *conditions)
    total = conn.execute(select(func.count()).select_from(SERIES).where(where)).scalar_one()
    rows = conn.execute(select(SERIES).where(where)
                        .order_by(SERIES.c.last_event_at.desc(), SERIES.c.series_uid)
                        .offset(req.offset).limit(req.limit)).all()
    return SeriesResponse(series=[SeriesRecord.model_validate(dict(r._mapping)) for r in rows], total=total)


def series_history(conn: Connection, req: SeriesHistoryRequest) -> SeriesHistoryResponse:
    row = conn.execute(select(SERIES).where(SERIES.c.series_uid == req.series_uid)).first()
    task_rows = conn.execute(select(TASKS).where(TASKS.c.series_uid == req.series_uid)
                             .order_by(TASKS.c.created_at, TASKS.c.task_id)).all()
    task_ids = [t.task_id for t in task_rows]
    match = EVENTS.c.series_uid == req.series_uid
    if task_ids:
        match = or_(match, EVENTS.c.task_id.in_(task_ids))
    event_rows = conn.execute(select(EVENTS).where(match)
                              .order_by(EVENTS.c.stream, EVENTS.c.stream_seq).limit(req.limit)).all()
    return SeriesHistoryResponse(
        series=SeriesRecord.model_validate(dict(row._mapping)) if row else None,
        tasks=[TaskRecord.model_validate(dict(t._mapping)) for t in task_rows],
        events=[EventRecord.model_validate(dict(e._mapping)) for e in event_rows])


def tasks(conn: Connection, req: TasksRequest) -> TasksResponse:
    conditions = [TASKS.c[name] == getattr(req, name) for name in ("state", "series_uid", "target", "kind")
                  if getattr(req, name) is not None]
    where = and_(True, *conditions)
    total = conn.execute(select(func.count()).select_from(TASKS).where(where)).scalar_one()
    rows = conn.execute(select(TASKS).where(where).order_by(TASKS.c.updated_at.desc(), TASKS.c.task_id)
                        .offset(req.offset).limit(req.limit)).all()
    return TasksResponse(tasks=[TaskRecord.model_validate(dict(r._mapping)) for r in rows], total=total)


def count(conn: Connection, req: CountRequest) -> CountResponse:
    query = select(EVENTS.c.type, func.count()).group_by(EVENTS.c.type)
    if req.series_uid is not None:
        query = query.where(EVENTS.c.series_uid == req.series_uid)
    if req.study_uid is not None:
        query = query.where(EVENTS.c.study_uid == req.study_uid)
    if req.since is not None:
        query = query.where(EVENTS.c.occurred_at >= req.since)
    counts = {t: int(n) for t, n in conn.execute(query).all()}
    return CountResponse(counts=dict(sorted(counts.items())), total=sum(counts.values()))


def config_items(conn: Connection, req: ConfigItemsRequest) -> ConfigItemsResponse:
    query = select(CONFIG_ITEMS).order_by(CONFIG_ITEMS.c.kind, CONFIG_ITEMS.c.name)
    if req.kind:
        query = query.where(CONFIG_ITEMS.c.kind == req.kind)
    if not req.include_deleted:
        query = query.where(CONFIG_ITEMS.c.deleted.is_(False))
    return ConfigItemsResponse(items=[ConfigItemRecord.model_validate(dict(r._mapping))
                                      for r in conn.execute(query).all()])


def services(conn: Connection, req: ServicesRequest) -> ServicesResponse:
    rows = conn.execute(select(SERVICES).order_by(SERVICES.c.service)).all()
    return ServicesResponse(services=[ServiceRecord.model_validate(dict(r._mapping)) for r in rows])


def stats(conn: Connection, req: StatsRequest) -> StatsResponse:
    last_rows = conn.execute(select(EVENTS.c.stream, func.max(EVENTS.c.stream_seq)).group_by(EVENTS.c.stream)).all()
    last = {str(stream): int(seq) for stream, seq in last_rows}
    oldest, newest = conn.execute(select(func.min(EVENTS.c.recorded_at), func.max(EVENTS.c.recorded_at))).one()
    return StatsResponse(
        database=conn.dialect.name,
        events_total=conn.execute(select(func.count()).select_from(EVENTS)).scalar_one(),
        duplicates_total=conn.execute(select(func.count()).select_from(DUPLICATES)).scalar_one(),
        last_stored_seq=last,
        projected_seq={r.stream: int(r.last_seq) for r in conn.execute(select(CURSORS)).all()},
        series_by_status=dict(conn.execute(select(SERIES.c.status, func.count()).group_by(SERIES.c.status)).all()),
        tasks_by_state=dict(conn.execute(select(TASKS.c.state, func.count()).group_by(TASKS.c.state)).all()),
        oldest_event_at=oldest,
        newest_event_at=newest,
    )


QUERIES: dict[str, Callable[[Connection, Any], BaseModel]] = {
    "events": events,
    "series": series,
    "series_history": series_history,
    "tasks": tasks,
    "count": count,
    "config_items": config_items,
    "services": services,
    "stats": stats,
}


def run_query(engine: Engine, method: str, request: BaseModel) -> BaseModel:
    with engine.connect() as conn:
        return QUERIES[method](conn, request)
