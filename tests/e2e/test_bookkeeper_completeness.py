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

from tests.harness import Caduceus, dicom_target, settings_doc, storescu, wait_audit_complete
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


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

    _, stored, _ = wait_audit_complete(cad)

    by_stream = Counter(s for s, _, _ in stored)
    assert by_stream["CONFIG"] >= 6 and by_stream["EVENTS"] >= 30, by_stream
    types = {row[0] for row in cad.query("select distinct type from events")}
    assert {"image.received", "series.completed", "series.discarded", "route.decided", "dispatch.requested",
            "dispatch.completed", "dispatch.attempt_failed", "dispatch.failed", "alert.raised",
            "config.item.created", "config.item.updated", "service.started"} <= types, types
