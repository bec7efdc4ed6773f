"""Issue 3, "done means": after a run, every event on the EVENTS and CONFIG streams is in the
bookkeeper's `events` table exactly once, on SQLite and on Postgres (fresh database).

The run has deliveries, a failing destination (attempts, failure, alert), a discarded series and
a configuration change, so most event types pass through.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.events import Event
from tests.harness import Caduceus, dicom_target, settings_doc, storescu, wait_for
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


def _stream_rows(cad: Caduceus) -> list[tuple[str, int, str]]:
    events: list[Event] = [*cad.events(), *cad.config_events()]
    return [(str(e.stream), int(e.stream_seq or 0), e.event_id) for e in events]


def _db_rows(cad: Caduceus) -> list[tuple[str, int, str]]:
    return [(str(s), int(q), str(i)) for s, q, i in cad.query("select stream, stream_seq, event_id from events")]


def _db_duplicates(cad: Caduceus) -> list[tuple[str, int, str]]:
    return [(str(s), int(q), str(i)) for s, q, i in
            cad.query("select stream, stream_seq, event_id from event_duplicates")]


def test_every_stream_event_is_in_the_audit_log_once(tmp_path: Path, database_url: str,
                                                     caduceus_factory: Callable[..., Caduceus],
                                                     storescp: StoreScp,
                                                     storescp_factory: Callable[..., StoreScp]) -> None:
    down = storescp_factory(start=False)
    config = {"settings": settings_doc(),
              "targets": {"ok": dicom_target(storescp.port, storescp.aet),
                          "down": dicom_target(down.port, down.aet)},
              "rules": {"to-ok": {"filter": "@SeriesDescription@ != 'AXIAL 2'", "targets": ["ok"]},
                        "to-down": {"filter": "@SeriesDescription@ == 'AXIAL 1'", "targets": ["down"]}}}
    cad = caduceus_factory(config=config, env_extra={"CADUCEUS_DATABASE_URL": database_url})
    files = make_series(tmp_path / "in", 4, size=64, series_per_study=3)
    sent = storescu(cad.dicom_port, files)
    assert sent.returncode == 0 and len(sent.accepted) == 12, sent.output
    storescp.wait_for(8, timeout=60)
    cad.wait_events("dispatch.failed", lambda found: len(found) == 1, 60)
    cad.wait_events("series.discarded", lambda found: len(found) == 1, 60)
    # A configuration change by an operator, after the fact.
    config["settings"] = settings_doc(retention_days=7)
    cad.apply_config(config, comment="longer retention")

    def complete() -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]] | None:
        stream, stored = _stream_rows(cad), _db_rows(cad)
        accounted = {(s, q) for s, q, _ in stored} | {(s, q) for s, q, _ in _db_duplicates(cad)}
        return (stream, stored) if {(s, q) for s, q, _ in stream} <= accounted else None

    stream, stored = wait_for(complete, 60, "bookkeeper caught up with both streams", cad.logs)

    stream_ids = Counter(event_id for _, _, event_id in stream)
    stored_ids = Counter(event_id for _, _, event_id in stored)
    assert max(stored_ids.values()) == 1, "an event stored twice"
    assert set(stored_ids) == set(stream_ids), (set(stream_ids) ^ set(stored_ids))
    # Same event at the same place: the bookkeeper's (stream, sequence) is the stream's.
    first_place: dict[str, tuple[str, int]] = {}
    for s, q, event_id in sorted(stream, key=lambda row: (row[0], row[1])):
        first_place.setdefault(event_id, (s, q))
    assert {event_id: (s, q) for s, q, event_id in stored} == first_place
    # Anything the stream holds twice (re-published beyond the dedup window) is accounted as a duplicate.
    assert len(stream) == len(stored) + len([row for row in _db_duplicates(cad) if row in stream])

    by_stream = Counter(s for s, _, _ in stored)
    assert by_stream["CONFIG"] >= 6 and by_stream["EVENTS"] >= 30, by_stream
    types = {row[0] for row in cad.query("select distinct type from events")}
    assert {"image.received", "series.completed", "series.discarded", "route.decided", "dispatch.requested",
            "dispatch.completed", "dispatch.attempt_failed", "dispatch.failed", "alert.raised",
            "config.item.created", "config.item.updated", "service.started"} <= types, types
