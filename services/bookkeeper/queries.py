"""The read side of the RPC API: one function per method, request model in, response model out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel
from sqlalchemy import Connection, Engine, and_, func, or_, select

from services.bookkeeper.models import CONFIG_ITEMS, CURSORS, DUPLICATES, EVENTS, SERIES, SERVICES, TASKS
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
    rows = conn.execute(query.order_by(EVENTS.c.stream_seq, EVENTS.c.stream).limit(req.limit)).all()
    records = [EventRecord.model_validate(dict(r._mapping)) for r in rows]
    next_seq = records[-1].stream_seq if len(records) == req.limit else None
    return EventsResponse(events=records, next_since_seq=next_seq)


def series(conn: Connection, req: SeriesRequest) -> SeriesResponse:
    conditions: list[Any] = []
    for name in ("status", "study_uid", "patient_id", "modality", "sender"):
        value = getattr(req, name)
        if value is not None:
            conditions.append(SERIES.c[name] == value)
    if req.search:
        pattern = f"%{_like_escape(req.search.lower())}%"
        conditions.append(or_(*(func.lower(SERIES.c[c]).like(pattern, escape="\\") for c in (
            "patient_name", "patient_id", "description", "series_uid", "study_uid"))))
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
