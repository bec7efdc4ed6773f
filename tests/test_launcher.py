"""`caduceus up` end to end: real processes, real nats-server, real kill -9 and SIGTERM.

Also the supervisor on its own with children that crash at once (backoff grows, events recorded).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cli.supervisor import ChildSpec, Supervisor, backoff_delay, child_env
from cli.up_cmd import _stop_orphaned_nats
from shared.bus import Bus
from shared.events import Event
from shared.health import EXPECTED_SERVICES
from shared.natsserver import EmbeddedNats, free_port
from shared.subjects import EVENTS_PREFIX, EVENTS_STREAM
from tests.harness import REPO, Caduceus, cli_env, pid_alive, wait_for

EXAMPLE = REPO / "deploy" / "example-config.yaml"


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Caduceus]:
    launched = Caduceus(tmp_path, config=yaml.safe_load(EXAMPLE.read_text()))
    launched.start(wait=False)
    yield launched
    launched.stop()
    launched.kill_all()  # after a failure part-way: nothing may outlive the test


def pid_gone(pid: int) -> bool:
    return not pid_alive(pid)


async def last_event(nats_url: str, event_type: str) -> Event | None:
    bus = await Bus.connect(nats_url, actor="test", declare=False, max_reconnect_attempts=2)
    try:
        return await bus.get_last_for_subject(EVENTS_STREAM, f"{EVENTS_PREFIX}.{event_type}")
    finally:
        await bus.close()


@pytest.mark.slow
def test_up_runs_all_services_restarts_crashed_one_and_stops_cleanly(up: Caduceus) -> None:
    report = up.wait_healthy()
    assert {s["name"] for s in report["streams"]} == {"EVENTS", "CONFIG", "STATUS"}
    state = up.state()
    pids: dict[str, int] = state["services"]
    assert set(pids) == set(EXPECTED_SERVICES)
    nats_url, nats_pid = state["nats_url"], state["nats_pid"]

    # --config was applied as the user before the services started.
    shown = up.cli("config", "show", "--json")
    assert shown.returncode == 0 and "pacs" in json.loads(shown.stdout)["targets"]

    # The UI serves the dashboard, its fragment, the config page and /healthz.
    base = f"http://127.0.0.1:{up.ui_port}"
    assert httpx.get(f"{base}/healthz", timeout=10).json()["nats_connected"] is True
    dashboard = httpx.get(f"{base}/", timeout=10).text
    assert 'hx-get="/fragments/health"' in dashboard and "htmx.min.js" in dashboard
    fragment = httpx.get(f"{base}/fragments/health", timeout=10).text
    for name in EXPECTED_SERVICES:
        assert f'data-service="{name}"' in fragment
    assert "ct-to-pacs" in httpx.get(f"{base}/config", timeout=10).text

    # kill -9 one service: the supervisor restarts it and records the crash.
    victim = "processor"
    os.kill(pids[victim], signal.SIGKILL)
    new_pid = wait_for(lambda: (p := up.state()["services"][victim]) != pids[victim] and p, 30,
                       "processor restarted", up.logs)
    crashed = asyncio.run(last_event(nats_url, "service.crashed"))
    assert crashed is not None and crashed.actor == "supervisor"
    assert crashed.payload["service"] == victim and crashed.payload["pid"] == pids[victim]
    assert crashed.payload["exit_code"] == -signal.SIGKILL
    # service.restarted is published just after the state file got the new pid.
    restarted = wait_for(lambda: (e := asyncio.run(last_event(nats_url, "service.restarted"))) is not None
                         and e.payload["pid"] == new_pid and e, 10, "service.restarted event", up.logs)
    assert restarted.actor == "supervisor" and restarted.payload["restarts"] == 1

    def processor_healthy_again() -> bool:
        instances = {s["service"]: s for s in up.status()["services"]}[victim]["instances"]
        return any(i["pid"] == new_pid and i["state"] == "healthy" for i in instances)

    wait_for(processor_healthy_again, 30, "restarted processor healthy", up.logs)
    # The dead instance's last heartbeat is gone (the crash is in the log), not a stale row.
    instances = {s["service"]: s for s in up.status()["services"]}[victim]["instances"]
    assert [i["pid"] for i in instances] == [new_pid], instances
    for name, pid in pids.items():
        if name != victim:
            assert not pid_gone(pid), f"{name} should still be running"

    # SIGTERM to the launcher: every child and NATS exit, exit code 0, state file removed.
    started = time.monotonic()
    assert up.process is not None
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(60) == 0, up.logs()
    stop_seconds = time.monotonic() - started
    for name, pid in {**pids, victim: new_pid, "nats": nats_pid}.items():
        assert pid_gone(pid), f"{name} (pid {pid}) still running after caduceus up stopped"
    assert not up.state_file.exists()
    # Every service got SIGTERM and stopped by itself (none needed SIGKILL).
    out = (up.root / "up.out").read_text()
    assert "did not stop within" not in out, out
    assert stop_seconds < 30, f"stopping took {stop_seconds:.1f}s"


def test_up_refuses_an_invalid_config_and_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  r:\n    filter: 'True'\n    targets: [ghost]\n")
    result = subprocess.run([sys.executable, "-m", "cli.main", "up", "--data-dir", str(tmp_path / "d"),
                             "--config", str(bad), "--nats-port", str(free_port())],
                            env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown target 'ghost'" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("CADUCEUS_RECEIVER_WORKERS", "two", "must be `auto` or a number of processes from 1 to 99"),
    ("CADUCEUS_DISPATCH_CONCURRENCY", "0", "greater than or equal to 1"),
    ("CADUCEUS_RECEIVER_PUBLISH_TIMEOUT", "soon", "valid number"),
])
def test_up_refuses_an_invalid_process_setting_and_starts_nothing(tmp_path: Path, variable: str, value: str,
                                                                   message: str) -> None:
    # Before, a bad receiver setting only showed as a receiver crashing again and again.
    result = subprocess.run([sys.executable, "-m", "cli.main", "up", "--data-dir", str(tmp_path / "d"),
                             "--nats-port", str(free_port())],
                            env={**cli_env(), variable: value}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    assert "invalid CADUCEUS_* environment setting" in result.stderr and message in result.stderr
    assert variable.removeprefix("CADUCEUS_").lower() in result.stderr
    assert not (tmp_path / "d" / "nats").exists()


def test_status_exits_nonzero_when_services_are_missing(nats_url: str, tmp_path: Path) -> None:
    env = cli_env({"CADUCEUS_NATS_URL": nats_url})
    result = subprocess.run([sys.executable, "-m", "cli.main", "status", "--json"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    assert {s["service"]: s["state"] for s in report["services"]} == dict.fromkeys(EXPECTED_SERVICES, "missing")


def test_status_shows_how_long_each_stream_keeps_messages(nats_url: str) -> None:
    env = cli_env({"CADUCEUS_NATS_URL": nats_url})
    result = subprocess.run([sys.executable, "-m", "cli.main", "status"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    kept = {line.split()[0]: line.split()[-1] for line in result.stdout.split("STREAMS")[1].split("CONSUMERS")[0]
            .splitlines()[2:] if line.strip()}
    assert kept == {"EVENTS": "90d", "CONFIG": "always", "STATUS": "1h"}, result.stdout


def test_a_nats_server_left_on_the_data_dir_is_stopped_whatever_the_state_file_says(tmp_path: Path) -> None:
    orphan = EmbeddedNats(tmp_path / "data" / "nats").start()
    other = EmbeddedNats(tmp_path / "elsewhere" / "nats").start()
    try:
        assert orphan.process is not None and other.process is not None
        _stop_orphaned_nats(tmp_path / "data")   # no state file at all
        assert orphan.process.wait(15) is not None
        assert other.exit_code() is None   # another data dir's server is left alone
    finally:
        orphan.stop()
        other.stop()


def test_backoff_delay_grows_and_caps() -> None:
    assert [backoff_delay(n, 1.0, 10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


async def test_supervisor_restarts_crashing_child_with_backoff_and_records_it(bus: Bus, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    # A child that records each run and then fails at once.
    script = f"import sys; open({str(marker)!r}, 'a').write('x'); sys.exit(3)"
    spec = ChildSpec("processor", [sys.executable, "-c", script], child_env(dict(os.environ), {}),
                     tmp_path / "child.log")
    supervisor = Supervisor([spec], bus, backoff_base=0.2, backoff_max=0.8, stable_after=60, grace=5)
    await supervisor.start()
    deadline = time.monotonic() + 20
    while supervisor.children["processor"].restarts < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    supervisor.request_stop()
    await asyncio.wait_for(supervisor.wait(), 20)
    child = supervisor.children["processor"]
    assert child.restarts >= 4 and marker.read_text().count("x") >= 4
    # Every run failed with 3, except perhaps the last one, stopped by our SIGTERM while it started.
    assert set(child.exits[:-1]) == {3} and child.exits[-1] in (3, -signal.SIGTERM)

    crashed = await _read_events(bus, "service.crashed")
    delays = [e.payload["restart_in_seconds"] for e in crashed]
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8]
    assert all(e.actor == "supervisor" and e.payload["exit_code"] == 3 for e in crashed)
    restarted = await _read_events(bus, "service.restarted")
    assert [e.payload["restarts"] for e in restarted][:4] == [1, 2, 3, 4]


async def test_a_child_exiting_as_the_stop_signals_it_keeps_its_exit_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's Process.send_signal goes through Popen.send_signal, which polls (waitpid WNOHANG)
    first: a child that had exited a moment before was reaped there, and asyncio's child watcher,
    finding it gone, reported exit code 255 (the crash test above failed so under CPU load).
    Here the watcher is held until the stop has signalled the exited child, as a busy machine may."""
    exited, release = threading.Event(), threading.Event()
    real_waitpid = os.waitpid

    def held_waitpid(pid: int, options: int) -> tuple[int, int]:
        if options == 0 and pid > 0:   # the child watcher's blocking wait: hold it after the exit
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            exited.set()
            release.wait(20)
        return real_waitpid(pid, options)

    monkeypatch.setattr(os, "waitpid", held_waitpid)
    spec = ChildSpec("cleaner", [sys.executable, "-c", "import sys; sys.exit(3)"], child_env(dict(os.environ), {}))
    supervisor = Supervisor([spec], None, grace=5)
    await supervisor.start()
    try:
        assert await asyncio.to_thread(exited.wait, 20)
        stopping = asyncio.create_task(supervisor.wait())
        supervisor.request_stop()
        for _ in range(3):
            await asyncio.sleep(0)   # stop() sends its signals before its first wait
    finally:
        release.set()
    await asyncio.wait_for(stopping, 20)
    assert supervisor.children["cleaner"].exits == [3]


async def test_supervisor_stop_kills_a_child_that_ignores_sigterm(bus: Bus, tmp_path: Path) -> None:
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    log_file = tmp_path / "stubborn.log"
    spec = ChildSpec("cleaner", [sys.executable, "-c", script], child_env(dict(os.environ), {}), log_file)
    supervisor = Supervisor([spec], bus, grace=1.0)
    await supervisor.start()
    while "ready" not in (log_file.read_text() if log_file.exists() else ""):
        await asyncio.sleep(0.05)
    started = time.monotonic()
    supervisor.request_stop()
    await asyncio.wait_for(supervisor.wait(), 10)
    assert supervisor.children["cleaner"].exits == [-signal.SIGKILL]
    assert time.monotonic() - started < 5
    assert await _read_events(bus, "service.crashed") == []


async def _read_events(bus: Bus, event_type: str) -> list[Event]:
    from nats.js.api import DeliverPolicy

    from shared.bus import event_from_msg

    info = await bus.js.stream_info(EVENTS_STREAM, subjects_filter=f"{EVENTS_PREFIX}.{event_type}")
    count = (info.state.subjects or {}).get(f"{EVENTS_PREFIX}.{event_type}", 0)
    events: list[Event] = []
    if not count:
        return events
    sub = await bus.js.subscribe(f"{EVENTS_PREFIX}.{event_type}", ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
    try:
        while len(events) < count:
            events.append(event_from_msg(await sub.next_msg(timeout=5)))
    finally:
        await sub.unsubscribe()
    return events


def test_killed_launcher_leaves_no_orphans_and_up_starts_again(tmp_path: Path) -> None:
    first = Caduceus(tmp_path, services="processor,cleaner")
    second = Caduceus(tmp_path, services="processor,cleaner", nats_port=first.nats_port)
    try:
        first.start(wait=False)
        wait_for(lambda: first.state_file.exists() and len(first.state()["services"]) == 2, 60,
                 "first launcher started", first.logs)
        state = first.state()
        assert first.process is not None
        first.process.kill()  # SIGKILL to the launcher alone: no chance to clean up
        first.process.wait(10)
        # The services die with their launcher (PR_SET_PDEATHSIG) ...
        for name, pid in state["services"].items():
            wait_for(functools.partial(pid_gone, pid), 30, f"{name} gone after its launcher was killed")
        # ... and a new `up` on the same data dir stops the NATS left behind and starts normally.
        assert not pid_gone(state["nats_pid"])
        second.start(wait=False)
        assert second.process is not None
        launcher_pid = second.process.pid
        wait_for(lambda: second.state_file.exists() and second.state()["supervisor_pid"] == launcher_pid,
                 60, "second launcher started", second.logs)
        assert pid_gone(state["nats_pid"])
        wait_for(lambda: second.cli("status", "--services", "processor,cleaner").returncode == 0, 30,
                 "services healthy after relaunch", second.logs)
        assert second.stop() == 0
    finally:
        first.kill_all()
        second.kill_all()
