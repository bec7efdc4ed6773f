"""`caduceus up` restarts a service that is alive but no longer working: one that stopped heartbeating.

The supervisor restarts a service that exits; one that hangs (a deadlock, a blocked event loop, a
process stopped with SIGSTOP) would keep its pid and do nothing, and only `caduceus status`
would show it stale. Every service heartbeats every `CADUCEUS_HEARTBEAT_SECONDS` from its event
loop, and the heartbeats reach core NATS subscribers even when JetStream cannot store them (a
full disk), so the watchdog listens on `caduceus.status.>` and, for each supervised process:

- judges it only once a heartbeat of that very pid was seen (a service still in its setup, e.g.
  waiting for its database, is not hung);
- and only while its own NATS connection has been up for the whole period (no heartbeat can
  arrive during an outage), and, when other services run, while some other service's heartbeats
  do arrive (so that a NATS that delivers nothing is not blamed on every service at once);
- kills it with SIGKILL after `hung_after` seconds without a heartbeat. The supervisor then
  restarts it as after any crash: `service.crashed` (with the reason) and `service.restarted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from typing import Any

from shared.bus import Bus
from shared.subjects import STATUS_PREFIX

from .supervisor import Child, Supervisor

log = logging.getLogger("caduceus.watchdog")

CHECK_SECONDS = 2.0


class HeartbeatWatchdog:
    def __init__(self, supervisor: Supervisor, bus: Bus, hung_after: float, check_seconds: float = CHECK_SECONDS) -> None:
        self.supervisor = supervisor
        self.bus = bus
        self.hung_after = hung_after
        self.check_seconds = check_seconds
        self.last_beat: dict[int, float] = {}   # pid -> time.monotonic() of its last heartbeat
        self._connected_since: float | None = None
        self._sub: Any = None

    async def run(self) -> None:
        self._sub = await self.bus.nc.subscribe(f"{STATUS_PREFIX}.>", cb=self._on_heartbeat)
        try:
            while not self.supervisor.stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.supervisor.stopping.wait(), timeout=self.check_seconds)
                if not self.supervisor.stopping.is_set():
                    self.check(time.monotonic())
        finally:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_heartbeat(self, msg: Any) -> None:
        try:
            pid = int(json.loads(msg.data)["payload"]["pid"])
        except (ValueError, KeyError, TypeError):
            return   # not a heartbeat we can read; the STATUS readers report those
        self.last_beat[pid] = time.monotonic()

    def check(self, now: float) -> None:
        if not self.bus.nc.is_connected:
            self._connected_since = None
            return
        if self._connected_since is None:
            self._connected_since = now
        running = [child for child in self.supervisor.children.values() if child.running and child.pid]
        # Forget processes that are gone (restarted services, receiver workers) after a while.
        for pid, seen in list(self.last_beat.items()):
            if now - seen > 10 * self.hung_after:
                del self.last_beat[pid]
        for child in running:
            reason = self._hung(child, running, now)
            if reason:
                self._kill(child, reason)

    def _hung(self, child: Child, running: list[Child], now: float) -> str:
        assert child.pid is not None and self._connected_since is not None
        seen = self.last_beat.get(child.pid)
        if seen is None:
            return ""
        silent = now - max(seen, self._connected_since)
        if silent < self.hung_after:
            return ""
        others = [other for other in running if other is not child and other.pid in self.last_beat]
        if others and not any(now - self.last_beat[other.pid or 0] < self.hung_after for other in others):
            return ""   # nobody's heartbeats arrive: the path, not this service
        return f"no heartbeat for {now - seen:.0f} s (watchdog limit {self.hung_after:g} s)"

    def _kill(self, child: Child, reason: str) -> None:
        pid = child.pid
        assert pid is not None
        log.error("%s (pid %s) is alive but silent: %s; killing it so that it is restarted",
                  child.spec.name, pid, reason)
        child.exit_reason = reason
        self.last_beat.pop(pid, None)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
