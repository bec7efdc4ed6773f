"""A destination that is not running: attempts fail, the task ends failed with an alert, and after
the destination is up `caduceus retry --series UID` (the CLI, as an operator runs it) delivers it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.harness import Caduceus, dicom_target, settings_doc, storescu, wait_for
from tests.peers import StoreScp, make_series

pytestmark = pytest.mark.slow


def test_target_down_then_cli_retry_delivers(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                             storescp_factory: Callable[..., StoreScp]) -> None:
    target = storescp_factory(start=False)
    config = {"settings": settings_doc(dispatch_retries=2, dispatch_retry_wait_seconds=0.5),
              "targets": {"down": dicom_target(target.port, target.aet)},
              "rules": {"all": {"filter": "True", "targets": ["down"]}}}
    cad = caduceus_factory(config=config)
    files = make_series(tmp_path / "in", 6, size=64)
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    sent = storescu(cad.dicom_port, files)
    assert sent.returncode == 0 and len(sent.accepted) == 6, sent.output

    failed = cad.wait_events("dispatch.failed", lambda found: len(found) == 1, 90, "dispatch.failed")[0]
    task_id = failed.task_id
    assert failed.series_uid == series_uid
    # dispatch_retries is the number of attempts in total (docs/configuration.md).
    assert failed.payload["target"] == "down" and failed.payload["attempts"] == 2, failed.payload
    assert sorted(failed.payload["failed_sop_uids"]) == sorted(sent.accepted)
    attempts = [e for e in cad.events("dispatch.attempt_failed") if e.task_id == task_id]
    assert [e.payload["attempt"] for e in attempts] == [1, 2], [e.payload for e in attempts]
    assert all(e.payload["sent"] == 0 for e in attempts)
    alerts = cad.wait_events("alert.raised", lambda found: any(e.task_id == task_id or
                                                                e.series_uid == series_uid for e in found), 20)
    assert any(e.payload["severity"] in ("error", "critical") for e in alerts), [e.payload for e in alerts]
    assert not target.files()

    # What the operator sees: status points at the failed task, `caduceus tasks` shows it with its error.
    status = wait_for(lambda: _attention(cad.cli("status")), 30, "status shows the failed task")
    assert "ATTENTION: 1 task(s) failed" in status and "TASKS  1 error" in status, status
    listed = cad.cli("tasks", "--state", "error")
    assert listed.returncode == 0, listed.stderr
    assert f"task={task_id}" in listed.stdout, listed.stdout
    assert "last error: could not connect to" in listed.stdout and "Connection refused" in listed.stdout
    assert f"caduceus retry {task_id}" in listed.stdout

    # The operator starts the destination and retries the series from the command line.
    target.start()
    result = cad.cli("retry", "--series", series_uid, "--comment", "target is back")
    assert result.returncode == 0, result.stdout + result.stderr
    assert task_id is not None and task_id in result.stdout + result.stderr
    target.wait_for(6, timeout=60)
    completed = cad.wait_events("dispatch.completed", lambda found: any(e.task_id == task_id for e in found), 60)
    assert [e.payload["sent"] for e in completed if e.task_id == task_id] == [6]
    retry = [e for e in cad.events("dispatch.retry_requested") if e.task_id == task_id]
    assert len(retry) == 1 and retry[0].actor.startswith("user:")
    assert target.sop_uids() == sent.accepted
    assert len(target.files()) == 6

    # The task's story in the audit log, in order.
    wait_for(lambda: cad.query("select count(*) from events where task_id = :t and type = 'dispatch.completed'",
                               t=task_id)[0][0] == 1, 30, "bookkeeper has the completion")
    story = [row[0] for row in cad.query("select type from events where task_id = :t order by stream_seq",
                                         t=task_id)]
    assert story[0] == "dispatch.requested" and story[-1] == "dispatch.completed", story
    assert story.index("dispatch.failed") < story.index("dispatch.retry_requested"), story
    done = cad.cli("tasks", "--series", series_uid)
    assert "done" in done.stdout and "attempts=1" in done.stdout and "1 task(s)" in done.stdout, done.stdout
    assert "ATTENTION" not in cad.cli("status").stdout


def _attention(result: subprocess.CompletedProcess[str]) -> str | None:
    return result.stdout if "ATTENTION" in result.stdout else None
