"""`caduceus up`'s heartbeat watchdog (cli/watchdog.py): who counts as hung, and a hung service restarted."""

from __future__ import annotations

import signal
import types
from typing import Any, cast

import pytest

from cli import watchdog as watchdog_module
from cli.supervisor import ChildSpec, Supervisor
from cli.watchdog import HeartbeatWatchdog
from shared.bus import Bus

HUNG_AFTER = 10.0


class FakeConnection:
    is_connected = True


def watchdog_over(pids: dict[str, int]) -> tuple[HeartbeatWatchdog, list[tuple[int, int]]]:
    supervisor = Supervisor([ChildSpec(name, ["true"], {}) for name in pids], None)
    for name, pid in pids.items():
        supervisor.children[name].process = cast(Any, types.SimpleNamespace(pid=pid, returncode=None))
    bus = cast(Bus, types.SimpleNamespace(nc=FakeConnection()))
    return HeartbeatWatchdog(supervisor, bus, HUNG_AFTER), []


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(watchdog_module.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    return killed


def test_only_a_silent_service_whose_heartbeats_were_seen_is_killed(kills: list[tuple[int, int]]) -> None:
    dog, _ = watchdog_over({"router": 101, "dispatcher": 102, "bookkeeper": 103})
    dog.check(now=0.0)   # connected from now on
    dog.last_beat.update({101: 1.0, 102: 1.0})   # the bookkeeper never beat: still in its setup
    dog.check(now=5.0)
    assert not kills
    dog.last_beat[102] = 14.0   # the dispatcher keeps beating, the router went silent at 1.0
    dog.check(now=15.0)
    assert kills == [(101, signal.SIGKILL)]
    router = dog.supervisor.children["router"]
    assert router.exit_reason.startswith("no heartbeat for 14 s")
    assert 101 not in dog.last_beat


def test_nobody_is_killed_when_no_heartbeat_arrives_at_all(kills: list[tuple[int, int]]) -> None:
    dog, _ = watchdog_over({"router": 101, "dispatcher": 102})
    dog.check(now=0.0)
    dog.last_beat.update({101: 1.0, 102: 1.0})
    dog.check(now=30.0)   # both silent: the path is broken, not the services
    assert not kills


def test_an_outage_of_the_launchers_own_connection_restarts_the_clock(kills: list[tuple[int, int]]) -> None:
    dog, _ = watchdog_over({"router": 101})
    dog.check(now=0.0)
    dog.last_beat[101] = 1.0
    FakeConnection.is_connected = False
    try:
        dog.check(now=20.0)
    finally:
        FakeConnection.is_connected = True
    dog.check(now=21.0)   # connected again at 21: the router has until 31
    assert not kills
    dog.check(now=32.0)   # alone, silent since before the outage and 11 s after it
    assert kills == [(101, signal.SIGKILL)]
