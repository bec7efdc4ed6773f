"""kill -9 of a service while data flows; the supervisor restarts it; nothing accepted is lost.

Ledger in every test: each SOP Instance UID that storescu saw accepted (parsed from its -v output)
ends at the destination; the destination never gets an identity nobody sent; an instance reaches
it twice only where at-least-once delivery allows it (re-sent by the sender, or re-sent by a
dispatcher that died before recording its progress).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from shared.subjects import BOOKKEEPER_EVENTS
from tests.chaos.flakyscp import FlakyScp
from tests.harness import (
    Caduceus,
    assert_ledger,
    route_all_config,
    sop_uid_of,
    storescp_deliveries,
    storescu,
    storescu_background,
    wait_audit_complete,
    wait_for,
)
from tests.peers import StoreScp, make_series

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


def _all_tasks_done(cad: Caduceus) -> bool:
    requested = {e.task_id for e in cad.events("dispatch.requested")}
    done = {e.task_id for e in cad.events("dispatch.completed")}
    return bool(requested) and requested <= done


def test_receiver_killed_during_association(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                            storescp_factory: Callable[..., StoreScp]) -> None:
    dest = storescp_factory(extra_args=["+uf"])
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet))
    files = make_series(tmp_path / "in", 300, size=128)

    running = storescu_background(cad.dicom_port, files, tmp_path / "storescu-1.log")
    wait_for(lambda: running.successes_so_far() >= 60, 60, "60 instances acknowledged", cad.logs, interval=0.02)
    new_pid = cad.kill9("receiver")
    first = running.finish()
    assert first.returncode != 0, "storescu should have seen the association break"
    assert 50 <= len(first.accepted) < 300, len(first.accepted)

    # As a sender does: send again what was not confirmed, once the receiver is back.
    cad.wait_service_healthy("receiver", new_pid)
    resent_files = [p for p in files if sop_uid_of(p) in first.failed]
    second = storescu(cad.dicom_port, resent_files)
    assert second.returncode == 0 and second.accepted == first.failed, second.output
    accepted = first.accepted | second.accepted

    wait_for(lambda: set(storescp_deliveries(dest.files())) >= accepted, 120, "all 300 at storescp", cad.logs)
    wait_for(lambda: _all_tasks_done(cad), 60, "every dispatch task completed", cad.logs)
    delivered = storescp_deliveries(dest.files())
    assert_ledger(accepted, delivered, resent=second.accepted)
    received = {e.sop_uid for e in cad.events("image.received")}
    assert accepted <= received
    crashed = cad.events("service.crashed")
    assert [e.payload["service"] for e in crashed] == ["receiver"]
    print(f"RESULT receiver kill: storescu got success for {len(first.accepted)}/300 before the kill, "
          f"resent {len(second.accepted)}; storescp files {sum(delivered.values())} for {len(delivered)} instances")
    # The file being written when the receiver died is either complete or absent: the blob
    # store writes to a temp file and renames.
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        blob = cad.blob_root / "instances" / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID) / \
            f"{ds.SOPInstanceUID}.dcm"
        if blob.exists():
            assert blob.stat().st_size > 30000, blob


def test_router_killed_before_series_completion(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                                storescp_factory: Callable[..., StoreScp]) -> None:
    dest = storescp_factory(extra_args=["+uf"])
    # Long enough that the series is still open when the router dies.
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet, series_complete_seconds=4))
    files = make_series(tmp_path / "in", 20, size=64)
    first = storescu(cad.dicom_port, files[:10])
    assert first.returncode == 0 and len(first.accepted) == 10
    new_pid = cad.kill9("router")
    # More images while the router is down / rebuilding its state from the stream.
    second = storescu(cad.dicom_port, files[10:])
    assert second.returncode == 0 and len(second.accepted) == 10
    cad.wait_service_healthy("router", new_pid)
    accepted = first.accepted | second.accepted

    wait_for(lambda: set(storescp_deliveries(dest.files())) >= accepted, 90, "all 20 at storescp", cad.logs)
    wait_for(lambda: _all_tasks_done(cad), 60, "every dispatch task completed", cad.logs)
    time.sleep(3)  # anything sent twice would show up by now
    # No dispatcher died: exactly once.
    assert_ledger(accepted, storescp_deliveries(dest.files()), exactly_once=True)
    completed = cad.events("series.completed")
    decided = cad.events("route.decided")
    requested = cad.events("dispatch.requested")
    batches = [e.payload["batch_id"] for e in completed]
    assert len(batches) == len(set(batches)), "a batch completed twice"
    assert sorted(e.payload["batch_id"] for e in decided) == sorted(batches), "one decision per batch"
    assert len(requested) == len({e.task_id for e in requested}) == len(batches)
    assert sum(e.payload["instance_count"] for e in completed) == 20
    print(f"RESULT router kill: {len(batches)} batch(es), {len(requested)} dispatch task(s), 20/20 delivered once")


def test_router_hung_before_series_completion(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                             storescp_factory: Callable[..., StoreScp]) -> None:
    """SIGSTOP: alive, holding its pid, doing nothing. The launcher's watchdog kills it when its
    heartbeats stop (cli/watchdog.py) and the supervisor restarts it like after a crash."""
    dest = storescp_factory(extra_args=["+uf"])
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet, series_complete_seconds=4),
                           up_args=["--hung-after", "4"])
    files = make_series(tmp_path / "in", 20, size=64)
    first = storescu(cad.dicom_port, files[:10])
    assert first.returncode == 0 and len(first.accepted) == 10
    router = cad.pid("router")
    os.kill(router, signal.SIGSTOP)
    second = storescu(cad.dicom_port, files[10:])
    assert second.returncode == 0 and len(second.accepted) == 10
    wait_for(lambda: cad.pid("router") != router, 60, "the hung router replaced", cad.logs)
    cad.wait_service_healthy("router", cad.pid("router"))
    accepted = first.accepted | second.accepted

    wait_for(lambda: set(storescp_deliveries(dest.files())) >= accepted, 90, "all 20 at storescp", cad.logs)
    wait_for(lambda: _all_tasks_done(cad), 60, "every dispatch task completed", cad.logs)
    time.sleep(3)  # anything sent twice would show up by now
    assert_ledger(accepted, storescp_deliveries(dest.files()), exactly_once=True)
    [crashed] = [e for e in cad.events("service.crashed") if e.payload["service"] == "router"]
    assert crashed.payload["pid"] == router and crashed.payload["exit_code"] == -signal.SIGKILL
    assert crashed.payload["reason"].startswith("no heartbeat for"), crashed.payload
    assert not Path(f"/proc/{router}").exists()


def test_dispatcher_killed_mid_send(tmp_path: Path, caduceus_factory: Callable[..., Caduceus]) -> None:
    dest = FlakyScp(delay=0.08).start()
    try:
        # A short ack_wait so JetStream hands the killed dispatcher's task to its successor soon.
        cad = caduceus_factory(config=route_all_config(dest.port, dest.aet),
                               env_extra={"CADUCEUS_DISPATCH_ACK_WAIT_SECONDS": "6"})
        files = make_series(tmp_path / "in", 60, size=64)
        sent = storescu(cad.dicom_port, files)
        assert sent.returncode == 0 and len(sent.accepted) == 60
        wait_for(lambda: len(dest.stored()) >= 15, 60, "15 instances at the destination", cad.logs,
                 interval=0.05)
        cad.kill9("dispatcher")
        at_kill = len(dest.stored())
        assert at_kill < 60, "the send finished before the kill; slow the destination down"

        delivered = dest.wait_stored(sent.accepted, timeout=120)
        wait_for(lambda: _all_tasks_done(cad), 60, "the task completed", cad.logs)
        assert_ledger(sent.accepted, delivered)
        repeated = {uid: n for uid, n in delivered.items() if n > 1}
        # At least once: what the dead dispatcher sent but had not yet recorded may go again,
        # but the confirmed progress is kept (not the whole series a second time).
        assert len(repeated) < at_kill, f"{len(repeated)} re-sent after the kill at {at_kill}"
        completed = cad.events("dispatch.completed")
        assert len(completed) == 1 and completed[0].payload["skipped_already_sent"] > 0, \
            [e.payload for e in completed]
        print(f"RESULT dispatcher kill: {at_kill}/60 stored at the kill, {len(repeated)} instance(s) sent twice, "
              f"completion: {completed[0].payload}")
    finally:
        dest.stop()


def test_bookkeeper_processor_cleaner_and_ui_killed_in_turn_mid_flow(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
        storescp_factory: Callable[..., StoreScp]) -> None:
    """The services not covered above, each killed while a batch of images is still being routed,
    dispatched and recorded, and the next batch arrives while it restarts.

    None of them is on the delivery path, so the ledger is exactly once; the bookkeeper's audit log
    must still end with every stream event once (it resumes from its durable consumer)."""
    dest = storescp_factory(extra_args=["+uf"])
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet))
    files = make_series(tmp_path / "in", 40, size=64, series_per_study=4)
    victims = ["bookkeeper", "processor", "cleaner", "ui"]
    accepted: set[str] = set()
    for number, victim in enumerate(victims):
        sent = storescu(cad.dicom_port, files[number * 40:(number + 1) * 40])
        assert sent.returncode == 0 and len(sent.accepted) == 40, sent.output
        accepted |= sent.accepted
        cad.kill9(victim)  # its series is still open (2 s quiet period), its events still arriving

    wait_for(lambda: set(storescp_deliveries(dest.files())) >= accepted, 120, "all 160 at storescp",
             cad.logs)
    wait_for(lambda: _all_tasks_done(cad), 60, "every dispatch task completed", cad.logs)
    time.sleep(2)  # anything sent twice would show up by now
    assert_ledger(accepted, storescp_deliveries(dest.files()), exactly_once=True)
    crashed = cad.events("service.crashed")
    assert sorted(e.payload["service"] for e in crashed) == sorted(victims)
    # What the killed bookkeeper had fetched but not stored reaches its successor once the durable's
    # ack wait (60 s) has passed since the delivery, a few seconds before this wait begins: a wait
    # of just 60 s raced it (48-53 s of the 60 were used under load).
    _, stored, _ = wait_audit_complete(cad, timeout=BOOKKEEPER_EVENTS.ack_wait + 30)
    stored_types = Counter(event_type for event_type, in cad.query("select type from events"))
    assert stored_types["image.received"] == 160 and stored_types["service.crashed"] == len(victims)
    print(f"RESULT bookkeeper, processor, cleaner, ui killed in turn: 160/160 delivered once, "
          f"{len(stored)} events in the audit log once each")
