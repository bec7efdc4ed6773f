"""The bookkeeper's tables: the insert-only audit log and the projections derived from it.

Table definitions are SQLModel classes; the code reads and writes them through SQLAlchemy Core
(`Model.__table__`) because the audit path needs `ON CONFLICT DO NOTHING` and bulk upserts.
The alembic migrations in `migrations/versions` must create exactly these tables
(tests/test_migrations.py compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    Text,
    UniqueConstraint,
    column,
)
from sqlalchemy import table as table_clause
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive text otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT autoincrement on Postgres; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _text(nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(Text, nullable=nullable, index=index))


def _time(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable))


class EventRow(SQLModel, table=True):
    """One row per event ever seen on EVENTS or CONFIG. Never updated, never deleted."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("stream", "stream_seq", name="uq_events_stream_seq"),
        # Unique per stream, not overall: an archived incarnation (`EVENTS~<created>`) may hold the
        # ids the new one repeats (ids derived from stream sequences; migration 0005).
        UniqueConstraint("stream", "event_id", name="uq_events_stream_event_id"),
        Index("ix_events_series_uid", "series_uid"),
        Index("ix_events_study_uid", "study_uid"),
        Index("ix_events_task_id", "task_id"),
        Index("ix_events_correlation_id", "correlation_id"),
        Index("ix_events_type", "type"),
        Index("ix_events_occurred_at", "occurred_at"),
    )

    id: int | None = Field(default=None, sa_column=Column(BigId, primary_key=True, autoincrement=True))
    event_id: str = Field(sa_column=Column(Text, nullable=False))
    stream: str = Field(sa_column=Column(Text, nullable=False))
    stream_seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    type: str = Field(sa_column=Column(Text, nullable=False))
    schema_version: int = Field(sa_column=Column(Integer, nullable=False))
    occurred_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    recorded_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    actor: str = Field(sa_column=Column(Text, nullable=False))
    correlation_id: str | None = _text()
    causation_id: str | None = _text()
    study_uid: str | None = _text()
    series_uid: str | None = _text()
    sop_uid: str | None = _text()
    task_id: str | None = _text()
    config_kind: str | None = _text()
    config_name: str | None = _text()
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DuplicateRow(SQLModel, table=True):
    """A stream message whose event_id was already stored (re-published after the dedup window).

    Kept so that every stream sequence is accounted for: the projector advances only over a gapless
    run of sequences, and a dropped duplicate must not look like a gap.
    """

    __tablename__ = "event_duplicates"

    stream: str = Field(sa_column=Column(Text, primary_key=True))
    stream_seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    event_id: str = Field(sa_column=Column(Text, nullable=False))
    recorded_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class CursorRow(SQLModel, table=True):
    """Last stream sequence whose event has been applied to the projections, per stream."""

    __tablename__ = "projection_cursors"

    stream: str = Field(sa_column=Column(Text, primary_key=True))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


class StreamRow(SQLModel, table=True):
    """The incarnation of each stream the log follows: a stream of the same name created anew (a
    lost or replaced NATS store) restarts its sequences, and the old events are then archived."""

    __tablename__ = "streams"

    stream: str = Field(sa_column=Column(Text, primary_key=True))
    created_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class SeriesRow(SQLModel, table=True):
    __tablename__ = "series"
    __table_args__ = (
        Index("ix_series_study_uid", "study_uid"),
        Index("ix_series_status", "status"),
        Index("ix_series_last_received", "last_received"),
        # The series browser pages by most recent activity (queries.py); without this index every
        # page sorted the whole table (bench/growth.py: non-linear at 10^6 events).
        Index("ix_series_last_event_at", "last_event_at", "series_uid"),
    )

    series_uid: str = Field(sa_column=Column(Text, primary_key=True))
    study_uid: str | None = _text()
    patient_id: str | None = _text()
    patient_name: str | None = _text()
    modality: str | None = _text()
    description: str | None = _text()
    sender: str | None = _text()
    sender_host: str | None = _text()
    instance_count: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    first_received: datetime | None = _time()
    last_received: datetime | None = _time()
    status: str = Field(sa_column=Column(Text, nullable=False))
    batch_id: str | None = _text()
    tasks_total: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    tasks_done: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    tasks_failed: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    last_event_type: str = Field(sa_column=Column(Text, nullable=False))
    last_event_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    last_stream: str = Field(sa_column=Column(Text, nullable=False))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


class TaskRow(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_series_uid", "series_uid"),
        Index("ix_tasks_state", "state"),
        Index("ix_tasks_target", "target"),
    )

    task_id: str = Field(sa_column=Column(Text, primary_key=True))
    kind: str = Field(sa_column=Column(Text, nullable=False))
    series_uid: str | None = _text()
    study_uid: str | None = _text()
    rule: str | None = _text()
    target: str | None = _text()
    priority: str | None = _text()
    state: str = Field(sa_column=Column(Text, nullable=False))
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    last_error: str | None = _text()
    created_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    last_event_type: str = Field(sa_column=Column(Text, nullable=False))
    last_stream: str = Field(sa_column=Column(Text, nullable=False))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


class ConfigItemRow(SQLModel, table=True):
    __tablename__ = "config_items"

    kind: str = Field(sa_column=Column(Text, primary_key=True))
    name: str = Field(sa_column=Column(Text, primary_key=True))
    item: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    deleted: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    version: int = Field(sa_column=Column(Integer, nullable=False))
    updated_by: str = Field(sa_column=Column(Text, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    comment: str | None = _text()
    last_event_type: str = Field(sa_column=Column(Text, nullable=False))
    last_stream: str = Field(sa_column=Column(Text, nullable=False))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


class ServiceRow(SQLModel, table=True):
    __tablename__ = "services"

    service: str = Field(sa_column=Column(Text, primary_key=True))
    state: str = Field(sa_column=Column(Text, nullable=False))
    instance: str | None = _text()
    pid: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    host: str | None = _text()
    version: str | None = _text()
    last_started_at: datetime | None = _time()
    last_stopped_at: datetime | None = _time()
    last_stop_reason: str | None = _text()
    last_crashed_at: datetime | None = _time()
    last_exit_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    starts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    crashes: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    last_event_type: str = Field(sa_column=Column(Text, nullable=False))
    last_stream: str = Field(sa_column=Column(Text, nullable=False))
    last_seq: int = Field(sa_column=Column(BigInteger, nullable=False))


def table(model: type[SQLModel]) -> Any:
    return model.__table__  # type: ignore[attr-defined]


EVENTS = table(EventRow)
DUPLICATES = table(DuplicateRow)
CURSORS = table(CursorRow)
STREAMS = table(StreamRow)
SERIES = table(SeriesRow)
TASKS = table(TaskRow)
CONFIG_ITEMS = table(ConfigItemRow)
SERVICES = table(ServiceRow)

# Derived from the log; `rebuild` empties and refills exactly these.
PROJECTION_TABLES = (SERIES, TASKS, CONFIG_ITEMS, SERVICES)
metadata = SQLModel.metadata

# The series browser's trigram search index (migration 0003). Not in `metadata`: the objects differ
# per backend, may be absent (no pg_trgm / no FTS5 trigram tokenizer), and are written only by
# triggers on `series`, so nothing but queries.py names them, and only to read.
# The columns the search looks in (the index holds exactly these; migration 0003 lists them too).
SEARCH_COLUMNS = ("patient_name", "patient_id", "description", "series_uid", "study_uid")
# Postgres: one row per series, `document` = lower(coalesce(column, '')) of the columns joined by
# PG_SEARCH_SEPARATOR (chr(31) in migration 0003's trigger), GIN trigram index.
PG_SERIES_SEARCH = table_clause("series_search", column("series_uid"), column("document"))
PG_SEARCH_SEPARATOR = "\x1f"
# SQLite: FTS5 (trigram tokenizer) rows keyed by series_search_docs.docid.
SQLITE_SERIES_SEARCH = table_clause("series_search", column("rowid"), column("document"))
SQLITE_SERIES_SEARCH_DOCS = table_clause("series_search_docs", column("docid"), column("series_uid"))


def is_search_index_table(name: str) -> bool:
    """A table of the search index: series_search, series_search_docs, FTS5's series_search_* shadows."""
    return name == "series_search" or name.startswith("series_search_")
