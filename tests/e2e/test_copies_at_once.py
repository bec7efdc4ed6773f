"""Two senders send two different copies of the same series at the same moment to `caduceus up`
(whose receiver runs two processes): every instance is delivered, as the copy the blob store kept.

Before the copies were ordered by receipt time in both the receiver and the router, the blob store
could keep one copy and the router route the other; the dispatcher then sent nothing for that
instance (`changed_since_routed`). When that happened depends on timing, so this run is the
end-to-end check of the guarantee; the deterministic reproductions force the orders
(tests/test_copies_of_an_instance.py, services/receiver/tests/test_copies.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from shared.events import RouteDecided, TaskRef
from tests.e2e.dicomfiles import blob_path
from tests.harness import Caduceus, dicom_target, settings_doc, storescu_background, wait_for
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


def test_two_copies_sent_at_once_are_delivered_as_stored(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus], storescp_factory: Callable[..., StoreScp]) -> None:
    dest = storescp_factory()
    cad = caduceus_factory(config={"settings": settings_doc(), "targets": {"dest": dicom_target(dest.port, dest.aet)},
                                   "rules": {"all": {"filter": "True", "targets": ["dest"]}}})
    first = make_series(tmp_path / "a", 40, size=64)
    second = []
    for path in first:
        ds = dcmread(path)
        ds.SeriesDescription = "COPY B"
        second.append(tmp_path / f"b-{path.name}")
        ds.save_as(second[-1])
    senders = [storescu_background(cad.dicom_port, files, tmp_path / f"{name}.log", calling=f"SENDER{name}")
               for name, files in (("A", first), ("B", second))]
    for sender in senders:
        assert sender.finish(120).returncode == 0

    def all_tasks_done() -> list[str] | None:
        tasks = {t.task_id for e in cad.events("route.decided") for t in _tasks(e.payload)}
        done = {e.task_id for e in cad.events("dispatch.completed")} | {e.task_id for e in cad.events("dispatch.failed")}
        return sorted(tasks) if tasks and tasks <= done and _routed(cad) == 40 else None

    wait_for(all_tasks_done, 120, "every routed task finished")
    completed = cad.events("dispatch.completed")
    assert not cad.events("dispatch.failed")
    assert [e.payload["changed_since_routed"] for e in completed if e.payload["changed_since_routed"]] == []
    delivered: dict[str, set[str]] = {}
    for path in dest.files():
        ds = dcmread(path, stop_before_pixels=True)
        delivered.setdefault(str(ds.SOPInstanceUID), set()).add(str(ds.SeriesDescription))
    assert len(delivered) == 40
    for path in first:
        stored = dcmread(blob_path(cad.blob_root, path), stop_before_pixels=True)
        assert str(stored.SeriesDescription) in delivered[str(stored.SOPInstanceUID)]


def _tasks(payload: dict[str, Any]) -> list[TaskRef]:
    return list(RouteDecided.model_validate(payload).tasks)


def _routed(cad: Caduceus) -> int:
    """Distinct SOP instances announced, not superseded (every one must be routed)."""
    return len({e.sop_uid for e in cad.events("image.received") if e.payload.get("duplicate") != "superseded"})
