"""A series discarded because no rule matched when it completed is routed later, after the rule is
fixed, with `caduceus reroute --series UID` (the CLI, as an operator runs it): issue 4's "kept
for the retention period and recoverable"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness import Caduceus, dicom_target, settings_doc, storescu, wait_for
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


def test_a_discarded_series_is_routed_after_the_rule_is_fixed(tmp_path: Path,
                                                                caduceus_factory: Callable[..., Caduceus],
                                                                storescp: StoreScp) -> None:
    target = {"pacs": dicom_target(storescp.port, storescp.aet)}
    mr_only = {"settings": settings_doc(), "targets": target,
               "rules": {"mr": {"filter": "@Modality@ == 'MR'", "targets": ["pacs"]}}}
    cad = caduceus_factory(config=mr_only)
    files = make_series(tmp_path / "in", 4, size=64)  # CT: no rule matches
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    sent = storescu(cad.dicom_port, files)
    assert sent.returncode == 0 and len(sent.accepted) == 4, sent.output
    cad.wait_events("series.discarded", lambda found: any(e.series_uid == series_uid for e in found), 60)
    assert not storescp.files()

    cad.apply_config({**mr_only, "rules": {"ct-and-mr": {"filter": "@Modality@ in ('CT', 'MR')",
                                                         "targets": ["pacs"]}}})
    wait_for(lambda: cad.query("select count(*) from events where series_uid = :s and type = 'series.discarded'",
                               s=series_uid)[0][0] == 1, 30, "the bookkeeper has the discarded batch")
    result = cad.cli("reroute", "--series", series_uid, "--comment", "CT rule added")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "decided again under the current rules" in result.stdout
    storescp.wait_for(4, timeout=60)
    assert storescp.sop_uids() == sent.accepted

    [request] = cad.events("route.requested")
    assert request.actor.startswith("user:") and request.payload["reason"] == "CT rule added"
    decided = [e for e in cad.events("route.decided") if e.series_uid == series_uid]
    assert [e.payload["discarded"] for e in decided] == [True, False]
    assert decided[1].payload["matched_rules"] == ["ct-and-mr"]
    assert decided[1].payload["batch_id"] == request.payload["batch_id"] != decided[0].payload["batch_id"]
    done = wait_for(lambda: (lambda out: out if "done" in out else None)(cad.cli("tasks", "--series", series_uid).stdout),
                    30, "the task is done in the tasks view")
    assert "1 task(s)" in done

    unknown = cad.cli("reroute", "--series", "1.2.3.999")
    assert unknown.returncode == 1 and "no completed batch of series 1.2.3.999" in unknown.stderr
