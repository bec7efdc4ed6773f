"""Writing a batch of stream messages to the audit log, and the projections with it, in one transaction."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from services.bookkeeper.db import is_transient
from services.bookkeeper.incarnation import StreamReplaced
from services.bookkeeper.models import DUPLICATES, EVENTS
from services.bookkeeper.projector import advance, clean, dialect_insert
from shared.events import Event

log = logging.getLogger(__name__)

ENVELOPE_STRINGS = ("event_id", "type", "actor", "correlation_id", "causation_id", "study_uid", "series_uid",
                    "sop_uid", "task_id", "config_kind", "config_name")


@dataclass(frozen=True)
class Record:
    """One stream message ready for the `events` table."""

    stream: str
    stream_seq: int
    row: dict[str, Any]


@dataclass
class BatchResult:
    stored: int = 0
    duplicates: int = 0
    projected: int = 0


def record_from_event(event: Event, stream: str, stream_seq: int, recorded_at: datetime | None) -> Record:
    row: dict[str, Any] = {name: clean(getattr(event, name)) for name in ENVELOPE_STRINGS}
    row.update(stream=stream, stream_seq=stream_seq, schema_version=event.schema_version,
               occurred_at=event.occurred_at, recorded_at=recorded_at or datetime.now(UTC),
               payload=event.payload)
    return Record(stream, stream_seq, row)


def record_unreadable(raw: bytes, msg_id: str | None, event_type: str | None, stream: str, stream_seq: int,
                      recorded_at: datetime | None) -> Record:
    """A message that is not a valid event is still part of the stream: keep it, visibly."""
    row: dict[str, Any] = {name: None for name in ENVELOPE_STRINGS}
    row.update(event_id=clean(msg_id) or f"unreadable:{stream}:{stream_seq}", type="unreadable",
               actor=clean(event_type) or "unknown", stream=stream, stream_seq=stream_seq, schema_version=0,
               occurred_at=recorded_at or datetime.now(UTC), recorded_at=recorded_at or datetime.now(UTC),
               payload={"raw": raw.decode("utf-8", errors="replace"), "declared_type": event_type})
    return Record(stream, stream_seq, row)


# Ids of messages stored in place of an event (not readable, or refused by the database).
SET_ASIDE_IDS = ("unreadable:", "unstorable:")


def write_batch(engine: Engine, records: list[Record], floors: dict[str, float] | None = None) -> BatchResult:
    """Insert the records (existing event_ids and sequences are left alone), then advance projections.

    Transient database errors propagate (the caller naks and retries). A batch the database refuses
    for its content is split: each record is written alone, and one that still fails is stored as
    `unreadable` with its text, so a single odd event can never stop the audit log.
    """
    try:
        return _write(engine, records, floors)
    except Exception as exc:
        if is_transient(exc) or isinstance(exc, StreamReplaced):
            raise
        log.error("batch of %d refused by the database (%s); writing one by one", len(records), exc)
    result = BatchResult()
    for record in records:
        try:
            part = _write(engine, [record], floors)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.error("event %s:%s refused by the database, stored as unreadable: %s", record.stream,
                      record.stream_seq, exc)
            part = _write(engine, [_as_unreadable(record, exc)], floors)
        result.stored += part.stored
        result.duplicates += part.duplicates
        result.projected += part.projected
    return result


def _as_unreadable(record: Record, exc: Exception) -> Record:
    text = json.dumps(record.row, default=str, ensure_ascii=True)
    return record_unreadable(text.encode(), f"unstorable:{record.stream}:{record.stream_seq}",
                             f"{record.row.get('type')}: {type(exc).__name__}", record.stream, record.stream_seq,
                             record.row.get("recorded_at"))


def _write(engine: Engine, records: list[Record], floors: dict[str, float] | None) -> BatchResult:
    result = BatchResult()
    records = sorted(records, key=lambda r: (r.stream, r.stream_seq))
    streams = sorted({r.stream for r in records})
    with engine.begin() as conn:
        if records:
            # executemany: psycopg 3 pipelines it; measured faster than multi-row VALUES here.
            conn.execute(dialect_insert(conn, EVENTS).on_conflict_do_nothing(),
                         [r.row for r in records])
        for stream in streams:
            mine = [r for r in records if r.stream == stream]
            seqs = [r.stream_seq for r in mine]
            present: dict[int, str] = dict(conn.execute(select(EVENTS.c.stream_seq, EVENTS.c.event_id).where(
                EVENTS.c.stream == stream, EVENTS.c.stream_seq.in_(seqs))).tuples().all())
            for r in mine:
                stored_id = present.get(r.stream_seq)
                if stored_id is not None and stored_id != r.row["event_id"] \
                        and not stored_id.startswith(SET_ASIDE_IDS) and not r.row["event_id"].startswith(SET_ASIDE_IDS):
                    raise StreamReplaced(stream, r.stream_seq)  # rolls the batch back
            # Stored under another sequence already: the event_id was published twice.
            dups = [{"stream": stream, "stream_seq": r.stream_seq, "event_id": r.row["event_id"],
                     "recorded_at": r.row["recorded_at"]} for r in mine if r.stream_seq not in present]
            if dups:
                conn.execute(dialect_insert(conn, DUPLICATES).on_conflict_do_nothing(), dups)
            result.stored += len(present)
            result.duplicates += len(dups)
            result.projected += advance(conn, stream, (floors or {}).get(stream, 0))
    return result


def advance_all(engine: Engine, streams: list[str], floors: dict[str, float] | None = None) -> int:
    """Apply what is stored but not yet projected (e.g. after another process filled a gap)."""
    with engine.begin() as conn:
        return sum(advance(conn, s, (floors or {}).get(s, 0)) for s in streams)


