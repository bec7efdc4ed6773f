"""The write path without NATS: gaps, duplicates, floors, unreadable and hostile messages (both backends)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from services.bookkeeper.db import open_database
from services.bookkeeper.incarnation import follow_incarnation
from services.bookkeeper.models import CURSORS, DUPLICATES, EVENTS, SERIES
from services.bookkeeper.store import Record, advance_all, record_from_event, record_unreadable, write_batch
from services.bookkeeper.tests.scenario import image, projection_snapshot, series_events

REPO = Path(__file__).resolve().parents[3]
STUDY, SERIES_UID = "1.2.3.4", "1.2.3.4.5"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = open_database(database_url)
    yield engine
    engine.dispose()


def records(count: int) -> list[Record]:
    return [record_from_event(image(STUDY, SERIES_UID, n), "EVENTS", n + 1, None) for n in range(count)]


def cursor(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(CURSORS.c.last_seq).where(CURSORS.c.stream == "EVENTS")).scalar_one())


def instance_count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(SERIES.c.instance_count)).scalar_one())


def test_projection_waits_at_a_gap_and_continues_when_it_is_filled(engine: Engine) -> None:
    recs = records(6)
    write_batch(engine, recs[:2] + recs[3:])  # sequence 3 held by "another process"
    assert cursor(engine) == 2 and instance_count(engine) == 2
    write_batch(engine, [recs[2]])
    assert cursor(engine) == 6 and instance_count(engine) == 6
    write_batch(engine, recs)  # redelivery of everything: nothing changes
    assert cursor(engine) == 6 and instance_count(engine) == 6


def test_duplicate_event_id_is_not_a_gap(engine: Engine) -> None:
    recs = records(3)
    again = Record("EVENTS", 4, dict(recs[0].row, stream_seq=4))  # same event_id, later sequence
    write_batch(engine, recs + [again] + [Record("EVENTS", 5, dict(records(5)[4].row, stream_seq=5))])
    assert cursor(engine) == 5 and instance_count(engine) == 4
    with engine.connect() as conn:
        assert conn.execute(select(DUPLICATES.c.stream_seq, DUPLICATES.c.event_id)).all() == [
            (4, recs[0].row["event_id"])]


def test_floor_skips_sequences_the_stream_no_longer_has(engine: Engine) -> None:
    recs = records(5)
    write_batch(engine, recs[3:])  # 1..3 expired from the stream before we stored them
    assert cursor(engine) == 0
    advance_all(engine, ["EVENTS"], floors={"EVENTS": 3})  # what the service's gap watch does
    assert cursor(engine) == 5 and instance_count(engine) == 2


def test_unreadable_and_hostile_messages_are_kept(engine: Engine) -> None:
    hostile = image(STUDY, SERIES_UID, 1, PatientName="Evil\x00Name", SeriesDescription="' OR 1=1; --")
    write_batch(engine, [
        record_from_event(image(STUDY, SERIES_UID, 0), "EVENTS", 1, None),
        record_unreadable(b"\xff\xfe not json", "msg-2", "image.received", "EVENTS", 2, None),
        record_from_event(hostile, "EVENTS", 3, None),
    ])
    assert cursor(engine) == 3
    with engine.connect() as conn:
        rows = conn.execute(select(EVENTS.c.stream_seq, EVENTS.c.type, EVENTS.c.payload)
                            .order_by(EVENTS.c.stream_seq)).all()
        series = conn.execute(select(SERIES)).one()
    assert [r.type for r in rows] == ["image.received", "unreadable", "image.received"]
    assert "not json" in rows[1].payload["raw"]
    assert rows[2].payload["tags"]["SeriesDescription"] == "' OR 1=1; --"
    assert series.instance_count == 2 and series.patient_name in ("Evil\ufffdName", "Evil\x00Name")


def test_cli_rebuild_accepts_plain_postgres_url(engine: Engine, database_url: str) -> None:
    write_batch(engine, records(4))
    live = projection_snapshot(engine)
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    out = subprocess.run([sys.executable, "-m", "cli.main", "bookkeeper", "rebuild", "--database-url", url],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rebuilt projections from 4 events (EVENTS: 4)" in out.stdout
    assert projection_snapshot(engine) == live


def test_cli_rebuild_refuses_a_database_without_an_audit_log(tmp_path: Path) -> None:
    # A mistyped --data-dir must not get a new, empty database and a report of "0 events".
    missing = tmp_path / "typo" / "bookkeeper.sqlite"
    out = subprocess.run([sys.executable, "-m", "cli.main", "bookkeeper", "rebuild", "--data-dir", str(missing.parent)],
                         cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and f"no bookkeeper database at {missing}" in out.stderr, out
    assert not missing.parent.exists()


def test_an_event_the_database_refuses_does_not_stop_the_log(engine: Engine, database_url: str) -> None:
    recs = records(4)
    # A lone surrogate cannot be encoded for either database.
    bad = Record("EVENTS", 2, dict(recs[1].row, actor="receiver\ud800"))
    write_batch(engine, [recs[0], bad, recs[2], recs[3]])
    with engine.connect() as conn:
        rows = conn.execute(select(EVENTS.c.stream_seq, EVENTS.c.type, EVENTS.c.event_id)
                            .order_by(EVENTS.c.stream_seq)).all()
    assert [(r.stream_seq, r.type) for r in rows] == [(1, "image.received"), (2, "unreadable"),
                                                      (3, "image.received"), (4, "image.received")]
    assert rows[1].event_id == "unstorable:EVENTS:2"
    assert cursor(engine) == 4 and instance_count(engine) == 3


def test_an_event_the_projection_cannot_store_is_skipped_live_and_in_rebuild(engine: Engine,
                                                                              database_url: str) -> None:
    from services.bookkeeper.rebuild import rebuild_database
    from shared.events import ServiceStarted, make_event

    huge = make_event("service.started", "x", ServiceStarted(service="odd", instance="i", pid=2**70, host="h",
                                                             version="1"))
    recs = records(2) + [record_from_event(huge, "EVENTS", 3, None)]
    recs.append(record_from_event(image(STUDY, SERIES_UID, 9), "EVENTS", 4, None))
    write_batch(engine, recs)
    assert cursor(engine) == 4 and instance_count(engine) == 3  # the image after the odd event counts
    live = projection_snapshot(engine)
    assert live["services"] == []
    rebuild_database(database_url)
    assert projection_snapshot(engine) == live


def test_a_superseded_copy_does_not_reopen_its_series(engine: Engine) -> None:
    # A receiver's journal replay publishes an older copy after a later one was stored (and routed,
    # and sent) as `duplicate: superseded`; the router ignores it and opens no batch. The series
    # view said "receiving" for good.
    events = series_events(STUDY, SERIES_UID, 2, "done")
    stale = image(STUDY, SERIES_UID, 0)
    stale.payload["duplicate"] = "superseded"
    write_batch(engine, [record_from_event(e, "EVENTS", n + 1, None) for n, e in enumerate([*events, stale])])
    with engine.connect() as conn:
        series = conn.execute(select(SERIES)).one()
    assert series.status == "dispatched" and series.instance_count == 2


def test_a_superseded_copy_naming_the_stored_copy_reopens_its_series(engine: Engine) -> None:
    # Such an event makes the router route the stored copy it names (a copy that may never have
    # been announced) in a new batch: the series is receiving again, its count unchanged.
    events = series_events(STUDY, SERIES_UID, 2, "done")
    stale = image(STUDY, SERIES_UID, 0)
    stale.payload.update(duplicate="superseded", stored={
        "received_stamp": 1, "sha256": "e" * 64, "size": 1, "sop_class_uid": "1.2", "transfer_syntax_uid": "1.2"})
    write_batch(engine, [record_from_event(e, "EVENTS", n + 1, None) for n, e in enumerate([*events, stale])])
    with engine.connect() as conn:
        series = conn.execute(select(SERIES)).one()
    assert series.status == "receiving" and series.instance_count == 2


def test_the_new_incarnation_of_a_stream_is_stored_even_where_its_event_ids_repeat_the_old_ones(
        engine: Engine) -> None:
    # After a NATS store loss the router numbers batches from the new stream's sequences again, and
    # its ids (batch, tasks, decisions) are derived from them: a series re-sent to the same position
    # gets the very event ids of the archived incarnation. Those events were taken for duplicates of
    # the archived rows, so the new decisions and tasks were missing from the log and its views.
    old = records(3)
    write_batch(engine, old)
    assert follow_incarnation(engine, "EVENTS", datetime.now(UTC), last_seq=0, conflict=True)
    write_batch(engine, old)  # the same ids at the same sequences, on the new stream
    with engine.connect() as conn:
        rows = conn.execute(select(EVENTS.c.stream, EVENTS.c.event_id)).all()
        duplicates = conn.execute(select(DUPLICATES.c.stream_seq)).all()
    current = sorted(event_id for stream, event_id in rows if stream == "EVENTS")
    assert current == sorted(r.row["event_id"] for r in old) and not duplicates
    assert cursor(engine) == 3
