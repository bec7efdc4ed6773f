"""A realistic mix of events for the bookkeeper tests, and helpers to run the service in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from services.bookkeeper.models import CURSORS, DUPLICATES, EVENTS, PROJECTION_TABLES
from services.bookkeeper.service import BookkeeperService
from shared import subjects
from shared.bus import Bus
from shared.events import (
    ConfigItemChanged,
    DispatchAttemptFailed,
    DispatchCompleted,
    DispatchFailed,
    DispatchRequested,
    Event,
    ImageReceived,
    RouteDecided,
    RuleEvaluation,
    SeriesCompleted,
    SeriesDiscarded,
    ServiceCrashed,
    TaskRef,
    deterministic_event_id,
    make_event,
)
from shared.settings import Settings

ROOT = "1.2.826.0.1.3680043.10.999"


def image(study: str, series: str, n: int, sender: str = "MODALITY1", **tags: str) -> Event:
    sop = f"{series}.{n}"
    all_tags = {"PatientID": f"PID-{study[-1]}", "PatientName": f"Doe^Jane{study[-1]}", "Modality": "CT",
                "SeriesDescription": f"Thorax {series[-1]}", "StudyInstanceUID": study,
                "SeriesInstanceUID": series, "SOPInstanceUID": sop, **tags}
    return make_event("image.received", "receiver", ImageReceived(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        blob_key=f"instances/{study}/{series}/{sop}.dcm", size=1024 + n, sha256="ab" * 32, calling_aet=sender,
        called_aet="CADUCEUS", peer_host="127.0.0.1", peer_port=40000 + n, association_id=f"assoc-{series}",
        tags=all_tags), study_uid=study, series_uid=series, sop_uid=sop, correlation_id=f"assoc-{series}")


def series_events(study: str, series: str, images: int, outcome: str) -> list[Event]:
    """Images, completion, routing and the dispatch story of one series ('done', 'error', 'discard')."""
    events = [image(study, series, n) for n in range(images)]
    batch = f"batch-{series}"
    completed = events[-1].caused("series.completed", "router", SeriesCompleted(
        batch_id=batch, manifest_key=f"manifests/{batch}.json", instance_count=images, first_seq=1,
        last_seq=images, calling_aet="MODALITY1", peer_host="127.0.0.1"))
    events.append(completed)
    task_id = deterministic_event_id(batch, "rule-ct", "pacs")
    if outcome == "discard":
        decided = completed.caused("route.decided", "router", RouteDecided(
            trigger="series", batch_id=batch, evaluations=[RuleEvaluation(rule="rule-ct", matched=False)],
            matched_rules=[], tasks=[], discarded=True, reason="no rule matched"))
        discarded = decided.caused("series.discarded", "router", SeriesDiscarded(
            batch_id=batch, manifest_key=f"manifests/{batch}.json", reason="no rule matched"))
        return events + [decided, discarded]
    decided = completed.caused("route.decided", "router", RouteDecided(
        trigger="series", batch_id=batch, evaluations=[RuleEvaluation(rule="rule-ct", matched=True)],
        matched_rules=["rule-ct"], tasks=[TaskRef(task_id=task_id, kind="dispatch", rule="rule-ct", target="pacs")],
        discarded=False, reason="matched rule-ct"))
    requested = decided.caused("dispatch.requested", "router", DispatchRequested(
        task_id=task_id, rule="rule-ct", target="pacs", manifest_key=f"manifests/{batch}.json",
        instance_count=images, priority="urgent" if outcome == "done" else "normal"), task_id=task_id)
    events += [decided, requested]
    failed_attempt = requested.caused("dispatch.attempt_failed", "dispatcher", DispatchAttemptFailed(
        task_id=task_id, target="pacs", attempt=1, error="association rejected", sent=0, failed=images,
        retry_in_seconds=5))
    events.append(failed_attempt)
    if outcome == "done":
        events.append(requested.caused("dispatch.completed", "dispatcher", DispatchCompleted(
            task_id=task_id, target="pacs", sent=images, warnings=0, skipped_already_sent=0, attempt=2,
            duration_seconds=0.4)))
    else:
        events.append(requested.caused("dispatch.failed", "dispatcher", DispatchFailed(
            task_id=task_id, target="pacs", attempts=3, error="connection refused")))
    return events


def config_events() -> list[Event]:
    def change(type_: str, kind: str, name: str, item: dict[str, Any] | None) -> Event:
        return make_event(type_, "admin", ConfigItemChanged(kind=kind, name=name, item=item, comment="test"),  # type: ignore[arg-type]
                          config_kind=kind, config_name=name)

    return [
        change("config.item.created", "settings", "settings", {"ae_title": "CADUCEUS"}),
        change("config.item.created", "targets", "pacs", {"type": "dicom", "host": "127.0.0.1", "port": 104,
                                                          "called_aet": "PACS"}),
        change("config.item.updated", "targets", "pacs", {"type": "dicom", "host": "127.0.0.1", "port": 11113,
                                                          "called_aet": "PACS"}),
        change("config.item.created", "targets", "old", {"type": "dicom", "host": "127.0.0.1", "port": 105,
                                                         "called_aet": "OLD"}),
        change("config.item.deleted", "targets", "old", None),
    ]


STUDY_A, STUDY_B = f"{ROOT}.1", f"{ROOT}.2"
SERIES_DONE, SERIES_ERROR, SERIES_DISCARD = f"{STUDY_A}.1", f"{STUDY_A}.2", f"{STUDY_B}.3"


def mixed_events(images: int = 5) -> list[Event]:
    events = config_events()
    events += series_events(STUDY_A, SERIES_DONE, images, "done")
    events += series_events(STUDY_A, SERIES_ERROR, images, "error")
    events += series_events(STUDY_B, SERIES_DISCARD, images, "discard")
    events.append(make_event("service.crashed", "launcher", ServiceCrashed(
        service="dispatcher", pid=4242, exit_code=-9, restarts=1, restart_in_seconds=2)))
    return events


# ------------------------------------------------------------------ running the service

def settings_for(nats_url: str, database_url: str, data_dir: Path, instance: str = "") -> Settings:
    return Settings(nats_url=nats_url, database_url=database_url, data_dir=data_dir, heartbeat_seconds=30,
                    instance=instance)


@asynccontextmanager
async def running(settings: Settings, batch: int = 200) -> AsyncIterator[BookkeeperService]:
    service = BookkeeperService(settings, batch=batch)
    task = asyncio.create_task(service.run())
    try:
        # setup() done when the RPC server is up
        deadline = time.monotonic() + 30
        while service.rpc is None or service.rpc.sub is None:
            if task.done():
                task.result()
            assert time.monotonic() < deadline, "bookkeeper did not start"
            await asyncio.sleep(0.05)
        yield service
    finally:
        service.request_stop("test done")
        await asyncio.wait_for(task, 30)


def stored_state(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        last: dict[str, int] = {s: n for s, n in conn.execute(
            select(EVENTS.c.stream, func.max(EVENTS.c.stream_seq)).group_by(EVENTS.c.stream))}
        dups: dict[str, int] = {s: n for s, n in conn.execute(
            select(DUPLICATES.c.stream, func.max(DUPLICATES.c.stream_seq)).group_by(DUPLICATES.c.stream))}
        cursors: dict[str, int] = {s: n for s, n in conn.execute(select(CURSORS.c.stream, CURSORS.c.last_seq))}
    return {s: max(last.get(s, 0), dups.get(s, 0)) for s in set(last) | set(dups)} | {
        f"cursor:{s}": v for s, v in cursors.items()}


async def wait_caught_up(bus: Bus, engine: Engine, timeout: float = 30) -> None:
    """Until every message of EVENTS and CONFIG is accounted for and projected."""
    deadline = time.monotonic() + timeout
    while True:
        wanted = {s: await bus.last_seq(s) for s in (subjects.EVENTS_STREAM, subjects.CONFIG_STREAM)}
        state = await asyncio.to_thread(stored_state, engine)
        if all(state.get(s, 0) >= n and state.get(f"cursor:{s}", 0) >= n for s, n in wanted.items()):
            return
        assert time.monotonic() < deadline, f"not caught up: want {wanted}, have {state}"
        await asyncio.sleep(0.1)


def projection_snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as conn:
        return {t.name: [dict(r._mapping) for r in conn.execute(
            select(t).order_by(*t.primary_key.columns)).all()] for t in PROJECTION_TABLES}
