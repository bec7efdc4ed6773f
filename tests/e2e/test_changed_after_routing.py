"""A task that waits (its destination down) and a sender re-sending the same instances with other
content meanwhile: the waiting task must not deliver the new content, which its rule never
matched, to its destination; the new copies go where their own rules say. Found by a
loss-hunting review (a RESEARCH-only archive received the CLINICAL re-send). Small instances
(journaled) and large ones (their own file) are stamped differently, so both are tried."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness import Caduceus, dicom_target, settings_doc, storescu
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size", [64, 512])
def test_a_waiting_task_does_not_send_content_replaced_after_routing(
        tmp_path: Path, size: int, caduceus_factory: Callable[..., Caduceus],
        storescp_factory: Callable[..., StoreScp]) -> None:
    research, clinical = storescp_factory(start=False), storescp_factory()
    config = {"settings": settings_doc(dispatch_retries=1),
              "targets": {"research": dicom_target(research.port, research.aet),
                          "clinical": dicom_target(clinical.port, clinical.aet)},
              "rules": {"research": {"filter": "@SeriesDescription@ == 'RESEARCH'", "targets": ["research"]},
                        "clinical": {"filter": "@SeriesDescription@ == 'CLINICAL'", "targets": ["clinical"]}}}
    cad = caduceus_factory(config=config)
    first = make_series(tmp_path / "v1", 3, size=size)
    second = []
    for path in first:
        ds = dcmread(path)
        ds.SeriesDescription = "RESEARCH"
        ds.save_as(path)
        ds.SeriesDescription = "CLINICAL"
        second.append(tmp_path / f"v2-{path.name}")
        ds.save_as(second[-1])
    assert storescu(cad.dicom_port, first).returncode == 0
    [failed] = cad.wait_events("dispatch.failed", lambda found: len(found) == 1, 90)
    assert failed.payload["target"] == "research"

    assert storescu(cad.dicom_port, second).returncode == 0  # same UIDs, other content
    clinical.wait_for(3, timeout=60)
    research.start()
    assert cad.cli("retry", failed.task_id or "").returncode == 0
    completed = cad.wait_events("dispatch.completed", lambda found: any(e.task_id == failed.task_id for e in found),
                                60, "the retried research task")
    [done] = [e for e in completed if e.task_id == failed.task_id]
    assert sorted(done.payload["changed_since_routed"]) == sorted(dcmread(p).SOPInstanceUID for p in first)
    assert done.payload["sent"] == 0 and not research.files()
    assert {str(dcmread(f).SeriesDescription) for f in clinical.files()} == {"CLINICAL"}
