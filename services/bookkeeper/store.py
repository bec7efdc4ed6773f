"""Writing a batch of stream messages to the audit log, and the projections with it, in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from services.bookkeeper.models import DUPLICATES, EVENTS
from services.bookkeeper.projector import advance, clean, dialect_insert
from shared.events import Event

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


def write_batch(engine: Engine, records: list[Record], floors: dict[str, float] | None = None) -> BatchResult:
    """Insert the records (existing event_ids and sequences are left alone), then advance projections."""
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
            present = set(conn.execute(select(EVENTS.c.stream_seq).where(
                EVENTS.c.stream == stream, EVENTS.c.stream_seq.in_(seqs))).scalars())
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


