"""Which incarnation of each stream the audit log follows.

A stream's sequence numbers are unique only within one incarnation of it. When the NATS store is
lost or replaced (a wiped data dir, a move to a new cluster) while the database is kept, EVENTS and
CONFIG start again at sequence 1 and the new events would meet old rows under the same sequences:
the log took them for events it had already stored, acknowledged them and dropped them (found by a
loss-hunting review). Now the log records each stream's creation time; when a stream turns out to
be a new one, the old incarnation's rows are kept under the name `<stream>~<its creation time>`
(history and searches by series still find them) and the stream is followed from its start.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, func, select, update

from services.bookkeeper.models import CURSORS, DUPLICATES, EVENTS, STREAMS
from services.bookkeeper.projector import dialect_insert

log = logging.getLogger(__name__)


class StreamReplaced(Exception):
    """A stored sequence holds another event than the stream now has there."""

    def __init__(self, stream: str, stream_seq: int) -> None:
        super().__init__(f"{stream} sequence {stream_seq} holds another event in the log than on the stream: "
                         "the stream was created anew")
        self.stream = stream


def follow_incarnation(engine: Engine, stream: str, created_at: datetime, last_seq: int,
                       conflict: bool = False) -> str | None:
    """Record `stream`'s creation time; archive the rows of an earlier incarnation. Returns the
    archive name when rows were archived.

    A log written before incarnations were recorded adopts the stream as it is, unless it holds
    sequences beyond the stream's last one (then they cannot be this stream's). `conflict`: a
    stored sequence was found to hold another event than the stream (StreamReplaced): the stream
    is what counts, so the rows are archived whatever the recorded time says.
    """
    with engine.begin() as conn:
        known = conn.execute(select(STREAMS.c.created_at).where(STREAMS.c.stream == stream)).scalar()
        if known is not None and _same_moment(known, created_at) and not conflict:
            return None
        stored_max = conn.execute(select(func.max(EVENTS.c.stream_seq)).where(EVENTS.c.stream == stream)).scalar()
        archive = None
        if stored_max is not None and (known is not None or stored_max > last_seq or conflict):
            archive = _archive(conn, stream, known)
        conn.execute(delete(STREAMS).where(STREAMS.c.stream == stream))
        conn.execute(dialect_insert(conn, STREAMS), [{"stream": stream, "created_at": created_at}])
        return archive


def _archive(conn: Connection, stream: str, known: datetime | None) -> str:
    stamp = known.strftime("%Y%m%dT%H%M%S.%fZ") if known is not None else "before-incarnations"
    archive = f"{stream}~{stamp}"
    conn.execute(update(EVENTS).where(EVENTS.c.stream == stream).values(stream=archive))
    conn.execute(update(DUPLICATES).where(DUPLICATES.c.stream == stream).values(stream=archive))
    conn.execute(delete(CURSORS).where(CURSORS.c.stream == stream))  # the projections follow from the start
    log.warning("the %s stream was created anew; the log keeps its earlier events as %s", stream, archive)
    return archive


def _same_moment(a: datetime, b: datetime) -> bool:
    # SQLite keeps microseconds, NATS reports nanoseconds: compare what both can hold.
    return abs((a - b).total_seconds()) < 1e-6
