"""`caduceus up` keeps its embedded nats-server working: restarted when it exits, or when its store fails.

Every service reconnects to the same URL by itself, so a restart is all that is needed; without one,
an unattended installation would stay down until somebody noticed.

- *The server exited* (a crash, the OOM killer): restarted at once, then with exponential back-off
  while it keeps failing.
- *Its JetStream store failed a write.* A nats-server whose disk filled up (ENOSPC) leaves the
  stream that failed in a write-error state: after space returns, publishes to it still time out
  until the server restarts, which then finds every stored message and accepts new ones again
  (measured with nats-server 2.15.1; docs/reliability.md). Its health endpoint (`/healthz` on
  the loopback monitoring port) reports the stream's write error; the keeper restarts the server
  once the store's file system has RESTART_FREE_BYTES free again, not before (it would fail the
  same way). The same holds for any unhealthy state seen while the disk was that full (nats-server
  may also disable JetStream altogether when it runs out of disk).
- *Unhealthy for any other reason* (JetStream disabled, the endpoint not answering) for
  UNHEALTHY_RESTART_SECONDS in a row, once the server has run for STARTUP_GRACE_SECONDS (a large
  store takes a while to load): restarted as well.

Each restart is recorded like a service's, as `service.crashed` (when it exited) and
`service.restarted` events for the service "nats".
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from cli.supervisor import backoff_delay
from shared.events import ServiceCrashed, ServiceRestarted
from shared.natsserver import EmbeddedNats

log = logging.getLogger(__name__)

NAME = "nats"
CHECK_SECONDS = 5.0
RESTART_FREE_BYTES = 64 * 1024 * 1024
UNHEALTHY_RESTART_SECONDS = 60.0
STARTUP_GRACE_SECONDS = 120.0
WRITE_ERROR = "write error"

# Supervisor.record: publishes a service.crashed / service.restarted event.
Record = Callable[[str, ServiceCrashed | ServiceRestarted], Awaitable[None]]


class NatsKeeper:
    def __init__(self, nats: EmbeddedNats, record: Record, stopping: asyncio.Event,
                 on_restart: Callable[[], None] = lambda: None, *, check_seconds: float = CHECK_SECONDS,
                 restart_free_bytes: int = RESTART_FREE_BYTES, backoff_max: float = 30.0) -> None:
        self.nats = nats
        self.record = record
        self.stopping = stopping
        self.on_restart = on_restart
        self.check_seconds = check_seconds
        self.restart_free_bytes = restart_free_bytes
        self.backoff_max = backoff_max
        self.restarts = 0
        self.started_at = time.monotonic()
        self._unhealthy_since: float | None = None
        self._consecutive_exits = 0
        self._waiting_for_space = False

    async def run(self) -> None:
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.check_seconds)
                return
            except TimeoutError:
                pass
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - keep watching; the next round tries again
                log.exception("checking nats-server failed")

    async def check(self) -> None:
        code = self.nats.exit_code()
        if code is not None or self.nats.process is None:   # no process: the last restart failed
            await self._restart_after_exit(code)
            return
        healthy, error = await asyncio.to_thread(self.nats.health)
        if healthy:
            self._unhealthy_since = None
            self._consecutive_exits = 0
            self._waiting_for_space = False
            return
        now = time.monotonic()
        if self._unhealthy_since is None:
            self._unhealthy_since = now
            log.warning("nats-server unhealthy: %s", error)
        if not self._has_room():
            # A restart now would fail the same way (or JetStream would disable itself again).
            if not self._waiting_for_space:
                log.error("nats-server unhealthy (%s) with its disk full; it is restarted once %d MB are "
                          "free there", error, self.restart_free_bytes >> 20)
                self._waiting_for_space = True
            return
        if WRITE_ERROR in error or self._waiting_for_space:
            await self._restart(f"unhealthy ({error}) after its disk filled up, and space is back")
        elif (now - self._unhealthy_since >= UNHEALTHY_RESTART_SECONDS
              and now - self.started_at >= STARTUP_GRACE_SECONDS):
            await self._restart(f"unhealthy for {now - self._unhealthy_since:.0f} s ({error})")

    def _has_room(self) -> bool:
        stats = os.statvfs(self.nats.store_dir)
        return stats.f_bavail * stats.f_frsize >= self.restart_free_bytes

    async def _restart_after_exit(self, code: int | None) -> None:
        self._consecutive_exits += 1
        delay = backoff_delay(self._consecutive_exits, 1.0, self.backoff_max) if self._consecutive_exits > 1 else 0.0
        pid = self.nats.process.pid if self.nats.process is not None else 0
        log.error("nats-server (pid %s) exited with %s; restart in %.1f s", pid, code, delay)
        # Recorded after the restart: with the server gone, there is nowhere to publish it yet.
        crashed = ServiceCrashed(service=NAME, pid=pid, exit_code=code, restarts=self.restarts,
                                 restart_in_seconds=delay)
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)
            return
        except TimeoutError:
            pass
        await self._restart(f"it exited with {code}", crashed)

    async def _restart(self, why: str, crashed: ServiceCrashed | None = None) -> None:
        if self.stopping.is_set():
            return
        log.warning("restarting nats-server: %s", why)
        await asyncio.to_thread(self.nats.restart)
        self.restarts += 1
        self.started_at = time.monotonic()
        self._unhealthy_since = None
        self._waiting_for_space = False
        self.on_restart()
        pid = self.nats.process.pid if self.nats.process is not None else 0
        log.warning("nats-server restarted (pid %s)", pid)
        if crashed is not None:
            await self.record("service.crashed", crashed)
        await self.record("service.restarted", ServiceRestarted(service=NAME, pid=pid, restarts=self.restarts))
