"""Destinations that misbehave: failure statuses, aborted and refused associations.

One caduceus, three series, three misbehaving pynetdicom destinations (tests/chaos/flakyscp.py):
- `busy`: answers 0xA700 to the first C-STORE of every instance -> the dispatcher retries and
  the second attempt delivers what the first did not;
- `aborter`: aborts the first association after 3 instances -> retry sends the rest;
- `strict`: wants called AE title STRICT, the target is configured with the wrong one, so every
  association is rejected -> dispatch.failed + alert.raised (the error state: files kept, task
  retryable); the operator fixes the target and runs `caduceus retry` -> delivered.
Plus a destination that refuses associations for a while (`refuse`), then accepts: delivered
within the configured attempts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.chaos.flakyscp import FlakyScp
from tests.harness import Caduceus, assert_ledger, dicom_target, settings_doc, storescu, wait_for
from tests.peers import make_series

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _series_sops(files: list[Path]) -> dict[str, set[str]]:
    by_description: dict[str, set[str]] = {}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        by_description.setdefault(str(ds.SeriesDescription), set()).add(str(ds.SOPInstanceUID))
    return by_description


def _config(busy: FlakyScp, aborter: FlakyScp, strict_port: int, strict_aet: str,
            refusing: FlakyScp) -> dict[str, Any]:
    return {
        "settings": settings_doc(dispatch_retries=4, dispatch_retry_wait_seconds=0.5,
                                 dispatch_retry_max_wait_seconds=1),
        "targets": {"busy": dicom_target(busy.port, busy.aet), "aborter": dicom_target(aborter.port, aborter.aet),
                    "strict": dicom_target(strict_port, strict_aet),
                    "refusing": dicom_target(refusing.port, refusing.aet)},
        "rules": {"r-busy": {"filter": "@SeriesDescription@ == 'AXIAL 0'", "targets": ["busy"]},
                  "r-aborter": {"filter": "@SeriesDescription@ == 'AXIAL 1'", "targets": ["aborter"]},
                  "r-strict": {"filter": "@SeriesDescription@ == 'AXIAL 2'", "targets": ["strict"]},
                  "r-refusing": {"filter": "@SeriesDescription@ == 'AXIAL 3'", "targets": ["refusing"]}},
    }


def test_failure_statuses_aborts_and_refusals(tmp_path: Path, caduceus_factory: Callable[..., Caduceus]) -> None:
    busy = FlakyScp(aet="BUSY", fail_first=1).start()
    aborter = FlakyScp(aet="ABORTER", abort_after=3).start()
    strict = FlakyScp(aet="STRICT").start()
    refusing = FlakyScp(aet="REFUSING", refuse=True).start()
    peers = [busy, aborter, strict, refusing]
    try:
        config = _config(busy, aborter, strict.port, "WRONG", refusing)
        cad = caduceus_factory(config=config)
        files = make_series(tmp_path / "in", 8, size=64, series_per_study=4)
        expected = _series_sops(files)
        sent = storescu(cad.dicom_port, files)
        assert sent.returncode == 0 and len(sent.accepted) == 32, sent.output
        # The refusing destination accepts again after it refused two associations (attempts).
        def accept_later() -> None:
            deadline = time.monotonic() + 60
            while refusing.associations < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            refusing.set_refuse(False)

        threading.Thread(target=accept_later, daemon=True).start()

        # 0xA700 for every first try: retried, then all delivered.
        delivered = busy.wait_stored(expected["AXIAL 0"], timeout=60)
        assert_ledger(expected["AXIAL 0"], delivered, exactly_once=True)
        assert sum(1 for _, status in busy.receipts if status == 0xA700) == 8
        # Aborted after 3: retried, all delivered, the 3 confirmed ones not sent again.
        delivered = aborter.wait_stored(expected["AXIAL 1"], timeout=60, detail=cad.logs)
        assert_ledger(expected["AXIAL 1"], delivered, exactly_once=True)
        assert aborter.aborted == 1 and aborter.associations >= 2
        # Refused for a while, then accepted.
        delivered = refusing.wait_stored(expected["AXIAL 3"], timeout=60)
        assert_ledger(expected["AXIAL 3"], delivered, exactly_once=True)
        assert refusing.associations >= 3, str(refusing)
        refused = [e for e in cad.events("dispatch.attempt_failed") if e.payload["target"] == "refusing"]
        assert refused and all("rejected" in e.payload["error"] for e in refused), [e.payload for e in refused]

        # Wrong called AE title: every association rejected -> failed, alert, files kept.
        failed = cad.wait_events("dispatch.failed", lambda found: len(found) >= 1, 60)
        assert [e.payload["target"] for e in failed] == ["strict"], [e.payload for e in failed]
        assert set(failed[0].payload["failed_sop_uids"]) == expected["AXIAL 2"]
        assert failed[0].payload["attempts"] == 4
        cad.wait_events("alert.raised", lambda found: any(e.task_id == failed[0].task_id for e in found), 30)
        assert not strict.receipts

        attempt_errors = {e.payload["target"]: e.payload["error"] for e in cad.events("dispatch.attempt_failed")}
        assert {"busy", "aborter", "strict", "refusing"} <= set(attempt_errors), attempt_errors

        # The operator fixes the target, then retries the failed series.
        cad.apply_config(_config(busy, aborter, strict.port, "STRICT", refusing), comment="fix AE title")
        series_uid = str(failed[0].series_uid)
        result = cad.cli("retry", "--series", series_uid)
        assert result.returncode == 0, result.stdout + result.stderr
        delivered = strict.wait_stored(expected["AXIAL 2"], timeout=60)
        assert_ledger(expected["AXIAL 2"], delivered, exactly_once=True)

        def all_completed() -> bool:
            return len(cad.events("dispatch.completed")) == 4

        wait_for(all_completed, 30, "4 dispatch.completed", cad.logs)
    finally:
        for peer in peers:
            peer.stop()
