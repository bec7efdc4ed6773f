"""Infrastructure failures while data flows: NATS killed and restarted, Postgres unavailable,
the blob store's disk full. The ledger holds through each."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import POSTGRES_ADMIN_URL, tmpfs
from tests.harness import (
    Caduceus,
    assert_ledger,
    pid_alive,
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


def _resend_until_accepted(cad: Caduceus, files: list[Path], not_accepted: set[str], rounds: int = 5) -> set[str]:
    """What a sender does with failures: send them again later. Returns what got accepted."""
    accepted: set[str] = set()
    pending = set(not_accepted)
    for _ in range(rounds):
        if not pending:
            break
        result = storescu(cad.dicom_port, [p for p in files if sop_uid_of(p) in pending])
        accepted |= result.accepted
        pending -= result.accepted
        if pending:
            time.sleep(2)
    assert not pending, f"{len(pending)} never accepted"
    return accepted


def _all_tasks_done(cad: Caduceus) -> bool:
    requested = {e.task_id for e in cad.events("dispatch.requested")}
    done = {e.task_id for e in cad.events("dispatch.completed")}
    return bool(requested) and requested <= done


# ---------------------------------------------------------------- NATS

def test_nats_killed_and_restarted_mid_flow(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                            storescp_factory: Callable[..., StoreScp]) -> None:
    dest = storescp_factory(extra_args=["+uf"])
    cad = caduceus_factory(config=route_all_config(dest.port, dest.aet))
    nats_pid = int(cad.state()["nats_pid"])
    files = make_series(tmp_path / "in", 400, size=64)
    try:
        running = storescu_background(cad.dicom_port, files, tmp_path / "storescu.log")
        wait_for(lambda: running.successes_so_far() >= 40, 60, "40 instances acknowledged", cad.logs, interval=0.02)
        # `caduceus up` restarts a nats-server that exits within seconds, so the outage is made
        # longer than the receiver's publish timeout (5 s) by first freezing the server (a hung
        # server: connections open, nothing answered), then killing it. The instances are small,
        # so the receiver's journal accepts them through the outage; their events follow once
        # the restarted server (same port, same JetStream store) is up.
        os.kill(nats_pid, signal.SIGSTOP)
        time.sleep(8)
        os.kill(nats_pid, signal.SIGKILL)
        first = running.finish()
        assert len(first.accepted) == 400 and not first.failed, first.output[-2000:]

        cad.wait_healthy(timeout=90)
        assert cad.process is not None and cad.process.poll() is None, "caduceus up died with NATS"
        assert cad.state()["nats_pid"] != nats_pid, "nats-server was not restarted by caduceus up"
        accepted = first.accepted | _resend_until_accepted(cad, files, first.failed)

        wait_for(lambda: set(storescp_deliveries(dest.files())) >= accepted, 120, "all 400 at storescp",
                 cad.logs)
        wait_for(lambda: _all_tasks_done(cad), 60, "every dispatch task completed", cad.logs)
        assert_ledger(accepted, storescp_deliveries(dest.files()), resent=first.failed)
        # Every success answered to storescu has its image.received in the stream (the worst bug:
        # success without a durable event).
        received = {e.sop_uid for e in cad.events("image.received")}
        assert accepted <= received
        wait_audit_complete(cad, timeout=90)
        crashed = [e.payload["service"] for e in cad.events("service.crashed")]
        delivered = storescp_deliveries(dest.files())
        print(f"RESULT nats restart: storescu accepted {len(first.accepted)}/400 in the association, "
              f"resent {len(first.failed)}; deliveries {sum(delivered.values())} for {len(delivered)} instances; "
              f"services crashed: {crashed}")
    finally:
        cad.kill_all()


def test_nats_store_lost_while_the_services_run(tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
                                               storescp_factory: Callable[..., StoreScp]) -> None:
    """NATS comes back with an empty store (a lost volume, a server replaced) while every service
    keeps running; the next process that connects (here `caduceus status`) declares the streams
    again and the operator applies the configuration again. Images sent after that must be routed
    and delivered: the services that follow EVENTS lost their durables, KV buckets and positions
    with the store, and pulled and replayed in vain, healthy by their heartbeats, for good."""
    dest = storescp_factory(extra_args=["+uf"])
    config = route_all_config(dest.port, dest.aet)
    cad = caduceus_factory(config=config)
    first = storescu(cad.dicom_port, make_series(tmp_path / "one", 5, size=64))
    assert first.returncode == 0 and len(first.accepted) == 5
    wait_for(lambda: set(storescp_deliveries(dest.files())) >= first.accepted, 60, "the first series delivered",
             cad.logs)
    try:
        # Frozen while its store is removed (a live server would notice), then killed: `caduceus up`
        # restarts it within seconds, on an empty store.
        nats_pid = int(cad.state()["nats_pid"])
        os.kill(nats_pid, signal.SIGSTOP)
        for store in (cad.data / "nats").iterdir():
            if store.is_dir():
                shutil.rmtree(store)
        os.kill(nats_pid, signal.SIGKILL)
        wait_for(lambda: cad.state()["nats_pid"] != nats_pid and _nats_health(cad)[0] == 200, 60,
                 "nats-server restarted on an empty store", cad.logs)
        cad.cli("status")
        cad.apply_config(config)
        files = make_series(tmp_path / "two", 5, size=64)
        second = wait_for(lambda: (lambda r: r if r.returncode == 0 else None)(storescu(cad.dicom_port, files)),
                          60, "the second series accepted", cad.logs, interval=2)
        wait_for(lambda: set(storescp_deliveries(dest.files())) >= second.accepted, 120,
                 "the second series delivered", cad.logs)
        # The audit log follows the new stream too (the old one's rows archived).
        wait_for(lambda: cad.query("select count(*) from events where stream = 'EVENTS' and type = 'image.received'"
                                   )[0][0] == 5, 60, "the second series in the audit log", cad.logs)
        # Each one that follows EVENTS starts again on the new stream (checked every 10 s; the
        # bookkeeper may have stored the new stream's events before its own check came round).
        following = {"router", "dispatcher", "bookkeeper", "processor"}
        wait_for(lambda: following <= {e.payload["service"] for e in cad.events("service.restarted")}, 60,
                 "the services following EVENTS started again", cad.logs)
    finally:
        cad.kill_all()


# ---------------------------------------------------------------- Postgres

@contextlib.contextmanager
def _connections_refused(database: str) -> Iterator[None]:
    """Postgres refuses new connections to `database` and drops the open ones, until the block ends."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,))
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')


def test_postgres_unavailable_for_a_while(tmp_path: Path, postgres_url: str,
                                          caduceus_factory: Callable[..., Caduceus], storescp: StoreScp) -> None:
    cad = caduceus_factory(config=route_all_config(storescp.port, storescp.aet),
                           env_extra={"CADUCEUS_DATABASE_URL": postgres_url})
    database = postgres_url.rsplit("/", 1)[1]
    files = make_series(tmp_path / "in", 10, size=64, series_per_study=3)
    first = storescu(cad.dicom_port, files[:10])
    assert first.returncode == 0
    wait_for(lambda: cad.query("select count(*) from events where type = 'image.received'")[0][0] == 10, 30,
             "bookkeeper recorded the first images")
    bookkeeper_pid = cad.pid("bookkeeper")
    with _connections_refused(database):
        # Events keep flowing while the database is gone: ingest and delivery do not need it.
        second = storescu(cad.dicom_port, files[10:])
        assert second.returncode == 0 and len(second.accepted) == 20
        storescp.wait_for(30, timeout=60)
        time.sleep(4)
        # The outage is real: the bookkeeper's durable holds the events it could not store.
        lag = {c["name"]: c["num_pending"] + c["num_ack_pending"] for c in cad.status()["consumers"]}
        assert lag["bookkeeper-events"] > 0, lag
    accepted = first.accepted | second.accepted
    assert storescp.sop_uids() == accepted

    _, stored, _ = wait_audit_complete(cad, timeout=120)
    assert cad.query("select count(*) from events where type = 'image.received'")[0][0] == 30
    # Whether the bookkeeper rode it out or was restarted by the supervisor, it is healthy now.
    crashed = [e.payload for e in cad.events("service.crashed") if e.payload["service"] == "bookkeeper"]
    new_pid = cad.pid("bookkeeper")
    cad.wait_service_healthy("bookkeeper", new_pid)
    print(f"RESULT postgres outage: {len(stored)} events stored once; bookkeeper crashes={len(crashed)} "
          f"pid {bookkeeper_pid}->{new_pid}")


# ---------------------------------------------------------------- disk full

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs mounted where the blob store lives (the data dir's `blobs`)."""
    data_dir = tmp_path / "data"
    with tmpfs(data_dir / "blobs", "20m"):
        yield data_dir


def _fill(path: Path, leave_bytes: int) -> None:
    """Write `path` until the file system has about `leave_bytes` free (0: completely full)."""
    stats = os.statvfs(path.parent)
    size = max(0, stats.f_bavail * stats.f_frsize - leave_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        written = 0
        for chunk_size in (1 << 20, 1 << 12, 1):  # big chunks, then small ones for the last bytes
            chunk = b"\0" * chunk_size
            while leave_bytes == 0 or written + chunk_size <= size:
                try:
                    written += os.write(fd, chunk)
                except OSError:
                    break  # ENOSPC: that was the point
    finally:
        os.close(fd)


def test_blob_disk_full_answers_a700_then_recovers(tmp_path: Path, small_disk: Path,
                                                   caduceus_factory: Callable[..., Caduceus],
                                                   storescp: StoreScp) -> None:
    cad = caduceus_factory(config=route_all_config(storescp.port, storescp.aet, min_free_space_mb=5),
                           data_dir=small_disk)
    blobs = small_disk / "blobs"
    files = make_series(tmp_path / "in", 15, size=128)
    try:
        ok = storescu(cad.dicom_port, files[:5])
        assert ok.returncode == 0 and len(ok.accepted) == 5

        # Below the free-space floor: refused with 0xA700 before anything is written.
        _fill(blobs / "filler-1", leave_bytes=3 * 1024 * 1024)
        floor = storescu(cad.dicom_port, files[5:10], extra=["-nh"])  # -nh: go on after a failure
        assert not floor.accepted and len(floor.failed) == 5, floor.output
        assert floor.statuses and all("OutOfResources" in s for s in floor.statuses.values()), floor.output
        rejected = cad.wait_events("image.rejected", lambda found: len(found) >= 5, 30)
        assert all("free space" in e.payload["reason"] and e.payload["status"] == 0xA700 for e in rejected)

        # No floor, and the disk really full: the blob write fails, so 0xA700. (The first instance
        # is accepted all the same: its journal record was durable before its file write failed in
        # the journal applier, and it stays in the journal until the file can be written.)
        cad.apply_config(route_all_config(storescp.port, storescp.aet, min_free_space_mb=0))
        _fill(blobs / "filler-2", leave_bytes=0)
        first_full = storescu(cad.dicom_port, files[10:11])
        receiver_log = cad.data / "logs" / "receiver.log"
        wait_for(lambda: "No space left" in receiver_log.read_text(errors="replace"), 30, "the failed blob write",
                 cad.logs)
        full = storescu(cad.dicom_port, files[11:], extra=["-nh"])
        assert not full.accepted and len(full.failed) == 4, full.output
        cad.wait_events("image.rejected", lambda found: any("write failed" in e.payload["reason"] for e in found),
                        30)
        assert pid_alive(cad.pid("receiver"))

        # Space returns: the sender's retries are accepted and everything is delivered.
        (blobs / "filler-1").unlink()
        (blobs / "filler-2").unlink()
        accepted = ok.accepted | first_full.accepted | _resend_until_accepted(
            cad, files, floor.failed | first_full.failed | full.failed)
        storescp.wait_for(15, timeout=90)
        assert storescp.sop_uids() == accepted
        assert not cad.events("image.quarantined")
        # No partial file left behind by the failed writes (a temp file is renamed or removed).
        assert not list((blobs / ".tmp").iterdir())
    finally:
        cad.kill_all()


@pytest.fixture
def small_data_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 MB tmpfs holding the whole data dir: blobs, journal, NATS's store, SQLite, logs."""
    with tmpfs(tmp_path / "data", "160m") as data_dir:
        yield data_dir


def _nats_health(cad: Caduceus) -> tuple[int, str]:
    url = f"{cad.state()['nats_monitor_url']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:   # not listening: exited, or being restarted
        return 0, f"unreachable: {exc}"


def test_whole_data_disk_full_then_space_returns(tmp_path: Path, small_data_disk: Path,
                                                 caduceus_factory: Callable[..., Caduceus],
                                                 storescp: StoreScp) -> None:
    """NATS's store shares the full disk: its streams fail their writes, and stay failed until
    nats-server restarts; `caduceus up` restarts it once there is room again, and everything the
    receiver accepted is delivered."""
    cad = caduceus_factory(config=route_all_config(storescp.port, storescp.aet, min_free_space_mb=5),
                           data_dir=small_data_disk,
                           env_extra={"CADUCEUS_RECEIVER_JOURNAL_SEGMENT_MB": "16", "CADUCEUS_RECEIVER_WORKERS": "1"})
    files = make_series(tmp_path / "in", 15, size=128)
    filler = small_data_disk / "filler"
    try:
        ok = storescu(cad.dicom_port, files[:5])
        assert ok.returncode == 0 and len(ok.accepted) == 5
        storescp.wait_for(5, timeout=60)

        _fill(filler, leave_bytes=0)
        refused = storescu(cad.dicom_port, files[5:10], extra=["-nh"])
        assert not refused.accepted and len(refused.failed) == 5, refused.output
        # Heartbeats and the refusals' events hit the full disk: nats-server's store fails a write
        # (seen in most runs), or nats-server gives up altogether.
        code, failure = wait_for(lambda: (lambda health: health if health[0] != 200 else None)(_nats_health(cad)),
                                 60, "nats-server unhealthy", cad.logs)
        nats_pid = cad.state()["nats_pid"]
        status = cad.cli("status")
        if _nats_health(cad)[0] != 200:   # (unless it already got over it by itself)
            assert status.returncode == 1 and "nats        UNHEALTHY: " in status.stdout, status.stdout

        filler.unlink()
        # Usually a stream stays broken and `caduceus up` restarts nats-server; sometimes the
        # failed write was one nats-server got over by itself. Either way it must be healthy.
        wait_for(lambda: _nats_health(cad)[0] == 200, 60, "nats-server healthy again", cad.logs)
        restarted = cad.state()["nats_pid"] != nats_pid
        accepted = ok.accepted | _resend_until_accepted(cad, files, refused.failed | {sop_uid_of(p) for p in files[10:]})
        storescp.wait_for(15, timeout=120)
        assert storescp.sop_uids() == accepted
        if restarted:
            cad.wait_events("service.restarted", lambda found: any(e.payload["service"] == "nats" for e in found), 60)
        # The bookkeeper's SQLite on the same disk failed its writes too: it catches up, each event once.
        _, stored, _ = wait_audit_complete(cad, timeout=120)
        print(f"RESULT whole disk full: nats-server failed with {code} {failure[:120]!r}, then "
              f"{'was restarted' if restarted else 'recovered by itself'}; "
              f"{len(accepted)} accepted, all delivered; {len(stored)} events in the audit log")
    finally:
        cad.kill_all()
