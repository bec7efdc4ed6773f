"""Run each service as its own OS process and keep it running (used by `caduceus up`).

- A child that exits while we are not stopping (non-zero exit, killed by a signal, or even exit 0)
  is restarted after an exponential backoff (base * 2^(n-1), capped); the count of consecutive
  failures resets once a child has run for `stable_after` seconds.
- A child that is alive but stopped heartbeating is killed so that it is restarted (cli/watchdog.py).
- Each exit is recorded as a `service.crashed` event and each restart as `service.restarted`
  (actor "supervisor") on the EVENTS stream. When NATS cannot take the event, the supervisor logs
  it and still restarts the child: keeping the services up matters more than the record.
- `stop()`: SIGTERM to every child, wait `grace` seconds (the service runtime lets in-flight
  handlers finish within 20 s), SIGKILL the stragglers.
- A child's output (stdout and stderr) goes through a pipe into its log file, which the launcher
  rotates by size (cli/logfiles.py).
- Children run in their own session (a terminal Ctrl-C reaches only the launcher, which then stops
  them in order) and, on Linux, get SIGTERM if the launcher itself dies (PR_SET_PDEATHSIG), so a
  killed launcher does not leave orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.logfiles import RotatingLog, log_pipe
from shared.bus import Bus
from shared.events import ServiceCrashed, ServiceRestarted, make_event
from shared.health import default_instance, forget_instance
from shared.libc import LIBC

log = logging.getLogger("caduceus.supervisor")

ACTOR = "supervisor"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent dies."""
    if sys.platform.startswith("linux") and LIBC is not None:
        with contextlib.suppress(Exception):
            LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path | None = None


@dataclass
class Child:
    spec: ChildSpec
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    consecutive_failures: int = 0
    exits: list[int | None] = field(default_factory=list)
    exit_reason: str = ""   # why the launcher itself ended the process (cli/watchdog.py), if it did

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def backoff_delay(consecutive_failures: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, consecutive_failures - 1))))


class Supervisor:
    def __init__(self, specs: list[ChildSpec], bus: Bus | None, *, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, stable_after: float = 30.0, grace: float = 25.0,
                 on_change: Callable[[Supervisor], None] | None = None,
                 log_max_bytes: int = 50 * 1024 * 1024, log_files_kept: int = 5) -> None:
        self.children = {spec.name: Child(spec) for spec in specs}
        # One per service, shared by its successive processes (a restarted child's new pipe and
        # the old one's last lines may both still be read for a moment).
        self.logs = {spec.name: RotatingLog(spec.log_file, log_max_bytes, log_files_kept)
                     for spec in specs if spec.log_file is not None}
        self._pumps: set[asyncio.Task[None]] = set()
        self.bus = bus
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.grace = grace
        self.on_change = on_change
        self.stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    def pids(self) -> dict[str, int | None]:
        return {name: child.pid for name, child in self.children.items()}

    # ------------------------------------------------------------ running

    async def start(self) -> None:
        for child in self.children.values():
            await self._spawn(child)
        self._notify()
        self._watchers = [asyncio.create_task(self._watch(child)) for child in self.children.values()]

    async def wait(self) -> None:
        """Until stop() was requested and every child has exited."""
        await self.stopping.wait()
        await self._terminate_all()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self._drain_logs()

    def request_stop(self) -> None:
        self.stopping.set()

    async def _spawn(self, child: Child) -> None:
        spec = child.spec
        target = self.logs.get(spec.name)
        out: Any = asyncio.subprocess.DEVNULL
        if target is not None:
            out, task = await log_pipe(target)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)
        try:
            child.process = await asyncio.create_subprocess_exec(
                *spec.argv, env=spec.env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            if target is not None:
                os.close(out)  # the child has its own copy; the pipe ends when every copy is closed
        child.started_at = time.monotonic()
        log.info("started %s (pid %s)", spec.name, child.pid)

    async def _drain_logs(self, timeout: float = 5.0) -> None:
        """The children's last lines, then the files closed. A pipe stays open while a process
        that inherited it lives on (a receiver worker finishing its drain), hence the timeout."""
        if self._pumps:
            _, pending = await asyncio.wait(set(self._pumps), timeout=timeout)
            for task in pending:
                task.cancel()
        for target in self.logs.values():
            target.close()

    async def _watch(self, child: Child) -> None:
        while True:
            assert child.process is not None
            code = await child.process.wait()
            child.exits.append(code)
            if self.stopping.is_set():
                log.info("%s exited with %s", child.spec.name, _describe(code))
                return
            await self._restart_after_crash(child, code)
            if self.stopping.is_set():
                return

    async def _restart_after_crash(self, child: Child, code: int) -> None:
        ran_for = time.monotonic() - child.started_at
        child.consecutive_failures = 1 if ran_for >= self.stable_after else child.consecutive_failures + 1
        delay = backoff_delay(child.consecutive_failures, self.backoff_base, self.backoff_max)
        old_pid = child.pid or 0
        log.warning("%s (pid %s) exited unexpectedly with %s after %.1fs; restart in %.1fs",
                    child.spec.name, old_pid, _describe(code), ran_for, delay)
        await self.record("service.crashed", ServiceCrashed(
            service=child.spec.name, pid=old_pid, exit_code=code, restarts=child.restarts,
            restart_in_seconds=delay, reason=child.exit_reason))
        if self.bus is not None and "CADUCEUS_INSTANCE" not in child.spec.env:
            await forget_instance(self.bus, child.spec.name, default_instance(child.spec.name, old_pid))
        child.exit_reason = ""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)
        if self.stopping.is_set():
            return
        await self._spawn(child)
        child.restarts += 1
        if self.stopping.is_set():
            # stop() began while this child was being spawned and did not see it
            _signal(child, signal.SIGTERM)
        self._notify()
        await self.record("service.restarted", ServiceRestarted(
            service=child.spec.name, pid=child.pid or 0, restarts=child.restarts))

    async def record(self, type_: str, payload: ServiceCrashed | ServiceRestarted, retries: int = 2) -> None:
        if self.bus is None:
            return
        try:
            await self.bus.publish(make_event(type_, ACTOR, payload), retries=retries, timeout=5)
        except Exception as exc:  # noqa: BLE001 - the restart must not depend on the broker
            log.error("could not record %s for %s: %s", type_, payload.service, exc)

    def _notify(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:  # noqa: BLE001 - a state file problem must not stop supervision
                log.exception("state update failed")

    # ------------------------------------------------------------ stopping

    async def _terminate_all(self) -> None:
        running = [c for c in self.children.values() if c.running]
        for child in running:
            _signal(child, signal.SIGTERM)
        if not running:
            return
        waits = [asyncio.create_task(c.process.wait()) for c in running if c.process is not None]
        _, pending = await asyncio.wait(waits, timeout=self.grace)
        if pending:
            for child in running:
                if child.running:
                    log.warning("%s did not stop within %.0fs: SIGKILL", child.spec.name, self.grace)
                    _signal(child, signal.SIGKILL)
            await asyncio.gather(*pending, return_exceptions=True)


def _signal(child: Child, sig: int) -> None:
    """Signal a running child without reaping it.

    Not `Process.send_signal()` / `kill()`: they go through `Popen.send_signal`, which first polls
    (waitpid WNOHANG), and so reaps a child that has just exited; asyncio's child watcher then
    finds it gone and reports exit code 255 instead of the child's own. Until the watcher has
    reaped it (returncode still None) the pid is the child's, a zombie at worst, so os.kill is safe.
    """
    if child.running and child.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)


def _describe(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def service_argv(name: str) -> list[str]:
    return [sys.executable, "-m", f"services.{name}"]


def child_env(base: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update(overrides)
    # The services package must be importable by the children whatever the launcher's cwd.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
