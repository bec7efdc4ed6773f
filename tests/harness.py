"""A reusable harness for end-to-end and chaos tests: a real `caduceus up` in a subprocess.

`Caduceus` starts `python -m cli.main up` with a temp data dir and free ports, waits until every
service reports healthy through `caduceus status --json`, applies configuration through the CLI,
kills services with SIGKILL (pids from the launcher's state file), reads every event stored on the
EVENTS/CONFIG streams, queries the bookkeeper database and stops everything cleanly.

`storescu(...)` runs DCMTK's /usr/bin/storescu and reports per file whether the C-STORE got a
success status: the ledger of the tests counts only instances the sender saw accepted.

Helpers are synchronous (they run their own asyncio loop), so tests using them are plain `def`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from pydicom import dcmread

from cli.up_cmd import _stop_orphaned_nats as stop_orphaned_nats
from shared.bus import Bus, replay
from shared.config.applied import wait_applied
from shared.events import Event
from shared.health import EXPECTED_SERVICES
from shared.natsserver import free_port, wait_port
from shared.settings import UP_STATE_FILE
from shared.subjects import CONFIG_PREFIX, EVENTS_PREFIX

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
HEALTHY_TIMEOUT = 90.0

# Settings that keep end-to-end tests short: series complete after 2 quiet seconds, retries fast,
# and no free-space floor (test machines' /tmp may be small; the disk-full test sets its own).
FAST_SETTINGS: dict[str, Any] = {
    "series_complete_seconds": 2,
    "study_complete_seconds": 4,
    "dispatch_retries": 2,
    "dispatch_retry_wait_seconds": 0.5,
    "dispatch_retry_max_wait_seconds": 1,
    "min_free_space_mb": 0,
}


def dicom_target(port: int, aet: str, **extra: Any) -> dict[str, Any]:
    return {"type": "dicom", "host": "127.0.0.1", "port": port, "called_aet": aet, **extra}


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process environment without CADUCEUS_* leaking in from outside, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CADUCEUS_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             detail: Callable[[], str] | None = None, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    extra = f"\n{detail()}" if detail is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}{extra}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---------------------------------------------------------------- DCMTK storescu with a ledger

@dataclass
class StoreResult:
    """What storescu reported per file: the SOP Instance UIDs it saw accepted, and the others."""

    returncode: int
    output: str
    accepted: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    statuses: dict[str, str] = field(default_factory=dict)

    @property
    def not_accepted(self) -> set[str]:
        return self.failed


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def sop_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)


def parse_storescu(output: str, files: list[Path]) -> tuple[set[str], set[str], dict[str, str]]:
    """Pair each 'Sending file' line with the next 'Received Store Response (...)' line.

    A file with no response (association aborted, peer died) counts as not accepted.
    """
    by_path = {str(p): sop_uid_of(p) for p in files}
    statuses: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        sending = _SENDING.search(line)
        if sending:
            current = sending.group(1).strip()
            continue
        response = _RESPONSE.search(line)
        if response and current is not None:
            statuses[current] = response.group(1) or "Success"
            current = None
    accepted = {by_path[p] for p, s in statuses.items() if p in by_path and s.startswith("Success")}
    failed = set(by_path.values()) - accepted
    return accepted, failed, statuses


def storescu(port: int, files: list[Path], *, aet: str = "CADUCEUS", calling: str = "MODALITY",
             timeout: float = 300, extra: list[str] | None = None) -> StoreResult:
    """Send `files` in one association with DCMTK storescu (-v so every response is logged)."""
    if not Path(STORESCU).is_file():
        raise FileNotFoundError(f"{STORESCU} missing: apt-get install dcmtk")
    args = [STORESCU, "-v", "-aet", calling, "-aec", aet, *(extra or []), "127.0.0.1", str(port),
            *map(str, files)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})
    output = done.stdout + done.stderr
    accepted, failed, statuses = parse_storescu(output, files)
    return StoreResult(done.returncode, output, accepted, failed, statuses)


@dataclass
class BackgroundStore:
    """A storescu running in the background (so a test can break things mid-association)."""

    process: subprocess.Popen[bytes]
    files: list[Path]
    log: Path

    def finish(self, timeout: float = 300) -> StoreResult:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        output = self.log.read_text(errors="replace")
        accepted, failed, statuses = parse_storescu(output, self.files)
        return StoreResult(self.process.returncode, output, accepted, failed, statuses)

    def successes_so_far(self) -> int:
        """Success responses storescu has logged so far (it logs each as it arrives). The sender's
        view is the one to wait on: a journaled instance's blob file and event come later."""
        return self.log.read_text(errors="replace").count("Received Store Response (Success)")


def storescu_background(port: int, files: list[Path], log: Path, *, aet: str = "CADUCEUS",
                        calling: str = "MODALITY", extra: list[str] | None = None) -> BackgroundStore:
    args = [STORESCU, "-v", "-aet", calling, "-aec", aet, *(extra or []), "127.0.0.1", str(port),
            *map(str, files)]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TCP_NODELAY": "1"})
    return BackgroundStore(process, files, log)


def echoscu(port: int, aet: str = "CADUCEUS") -> bool:
    done = subprocess.run([ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True, timeout=30)
    return done.returncode == 0


class PeakRss:
    """Samples the RSS of a process and its children (the receiver's workers) every 5 ms: the peak
    of their sum while `sampling()`."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self._sample()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for process in [self.process, *self.process.children()]:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.005)

    @contextmanager
    def sampling(self) -> Iterator[PeakRss]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    def report(self) -> str:
        mb = 1024 * 1024
        return f"receiver RSS {self.baseline / mb:.0f} MB before, peak {self.peak / mb:.0f} MB " \
               f"(+{(self.peak - self.baseline) / mb:.0f} MB)"


def open_temp_files(pid: int) -> list[tuple[int, int]]:
    """(pid, size) of each file in a blob store's temp directory (`blobs/.tmp`) that process `pid`
    or one of its children (the receiver's workers) has open, named or not (a spool file has no
    name there until it is placed: services/receiver/spool.py)."""
    found = []
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []
    for process in processes:
        fds = f"/proc/{process.pid}/fd"
        try:
            names = os.listdir(fds)
        except OSError:
            continue
        for fd in names:
            try:
                if "/blobs/.tmp/" in os.readlink(f"{fds}/{fd}"):
                    found.append((process.pid, os.stat(f"{fds}/{fd}").st_size))
            except OSError:
                continue
    return found


async def config_in_use(bus: Bus, seq: int, services: list[str], timeout: float = 15.0) -> None:
    """Until every running instance of each of `services` (each must be running) reports, in its
    heartbeat, that it uses CONFIG sequence `seq` or later: what a test changing the configuration
    of a running service waits for (they publish a heartbeat right after applying a change)."""
    report = await wait_applied(bus, seq, timeout=timeout, services=services)
    assert report.confirmed and not report.not_running, f"configuration {seq} not in use: {report}"


# ---------------------------------------------------------------- reading the streams

async def _read_events(nats_url: str, filter_subject: str) -> list[Event]:
    bus = await Bus.connect(nats_url, actor="test-harness", declare=False, max_reconnect_attempts=3)
    try:
        return [event async for event in replay(bus, filter_subject, idle_timeout=5)]
    finally:
        await bus.close()


def read_events(nats_url: str, filter_subject: str = f"{EVENTS_PREFIX}.>") -> list[Event]:
    return asyncio.run(_read_events(nats_url, filter_subject))


# ---------------------------------------------------------------- caduceus up

@dataclass
class Caduceus:
    """One `caduceus up` under `root` (data dir `root/data`), on free ports."""

    root: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    data_dir: Path | None = None
    dicom_port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    nats_port: int = field(default_factory=free_port)
    services: str | None = None  # `--services` (comma-separated); None: all seven
    up_args: list[str] = field(default_factory=list)   # more `caduceus up` options
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # free_port() releases its port at once, so two calls can return the same one (seen: the
        # UI could not bind the port NATS had taken); pick again until the three differ.
        while len({self.dicom_port, self.ui_port, self.nats_port}) < 3:
            self.ui_port, self.nats_port = free_port(), free_port()
        if self.data_dir is None:
            self.data_dir = self.root / "data"
        self.env = cli_env(self.env_extra)

    # -- lifecycle

    @property
    def data(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir

    def start(self, wait: bool = True) -> Caduceus:
        argv = [sys.executable, "-m", "cli.main", "up", "--data-dir", str(self.data),
                "--nats-port", str(self.nats_port), "--ui-port", str(self.ui_port),
                "--dicom-port", str(self.dicom_port), "--heartbeat-seconds", "1", "--backoff-max", "1",
                "--stable-after", "5"]
        if self.services is not None:
            argv += ["--services", self.services]
        argv += self.up_args
        if self.config is not None:
            config_file = self.root / "initial-config.yaml"
            config_file.write_text(yaml.safe_dump(self.config))
            argv += ["--config", str(config_file)]
        out = open(self.root / "up.out", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(argv, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        out.close()
        if wait:
            self.wait_healthy()
        return self

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        return self.process.returncode

    def kill_all(self) -> None:
        """Test teardown: SIGKILL the launcher, every service and the embedded NATS at once.

        (A clean stop takes ~20 s, mostly the receiver's pynetdicom shutdown; tests that are about
        stopping call `stop()`.)
        """
        pids: list[int] = []
        try:
            state = self.state()
            pids = [int(p) for p in state.get("services", {}).values() if p]
            if state.get("nats_pid"):
                pids.append(int(state["nats_pid"]))
        except (OSError, ValueError):
            pass
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # One the launcher was just restarting (cli/natskeeper.py) is not in the state file yet.
        stop_orphaned_nats(self.data)

    def wait_healthy(self, timeout: float = HEALTHY_TIMEOUT) -> dict[str, Any]:
        report: dict[str, Any] = wait_for(self._healthy_report, timeout, "all seven services healthy",
                                          self.logs, interval=0.5)
        wait_port("127.0.0.1", self.dicom_port, timeout=30)
        return report

    def _healthy_report(self) -> dict[str, Any] | None:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"caduceus up exited with {self.process.returncode}\n{self.logs()}")
        if not self.state_file.exists():
            return None
        result = self.cli("status", "--json")
        if result.returncode not in (0, 1) or not result.stdout.strip():
            return None
        report: dict[str, Any] = json.loads(result.stdout)
        states = {s["service"]: s["state"] for s in report["services"]}
        healthy = report["healthy"] and all(states.get(name) == "healthy" for name in EXPECTED_SERVICES)
        return report if healthy else None

    # -- CLI

    def cli(self, *argv: str, timeout: float = 60, data_dir_flag: bool = True) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "cli.main", *argv]
        env = dict(self.env)
        if data_dir_flag:
            env["CADUCEUS_DATA_DIR"] = str(self.data)
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode in (0, 1), result.stderr
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def apply_config(self, document: dict[str, Any], comment: str = "test") -> None:
        """`caduceus config apply`: returns once every running service reports the change in use."""
        path = self.root / f"config-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(document))
        result = self.cli("config", "apply", str(path), "--comment", comment)
        assert result.returncode == 0, f"config apply failed: {result.stdout}\n{result.stderr}"

    # -- processes

    @property
    def state_file(self) -> Path:
        return self.data / UP_STATE_FILE

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    @property
    def nats_url(self) -> str:
        return str(self.env_extra.get("CADUCEUS_NATS_URL") or self.state()["nats_url"])

    def pid(self, service: str) -> int:
        return int(self.state()["services"][service])

    def kill9(self, service: str, wait_restart: bool = True, timeout: float = 60) -> int:
        """SIGKILL a service; by default wait until the supervisor has started a new process.

        Returns the new pid (or the killed one when not waiting).
        """
        old = self.pid(service)
        os.kill(old, signal.SIGKILL)
        if not wait_restart:
            return old
        wait_for(lambda: not pid_alive(old) or _is_zombie(old), 10, f"{service} pid {old} gone")

        def restarted() -> int | None:
            try:
                new = self.pid(service)
            except (KeyError, ValueError, OSError):
                return None
            return new if new != old and pid_alive(new) else None

        new_pid: int = wait_for(restarted, timeout, f"supervisor restarts {service}", self.logs)
        return new_pid

    def wait_service_healthy(self, service: str, pid: int, timeout: float = 60) -> None:
        """Until the heartbeat of `service` comes from process `pid` (i.e. the restarted one)."""
        def fresh() -> bool:
            report = self.cli("status", "--json")
            if not report.stdout.strip():
                return False
            for entry in json.loads(report.stdout)["services"]:
                if entry["service"] == service:
                    return any(i["pid"] == pid and i["state"] == "healthy" for i in entry["instances"])
            return False

        wait_for(fresh, timeout, f"{service} (pid {pid}) healthy", self.logs, interval=0.5)

    # -- data

    def events(self, event_type: str | None = None) -> list[Event]:
        subject = f"{EVENTS_PREFIX}.>"
        if event_type is not None:
            subject = f"{EVENTS_PREFIX}.{event_type}" + (".>" if event_type in ("dispatch.requested",
                                                                               "process.requested") else "")
        return read_events(self.nats_url, subject)

    def config_events(self) -> list[Event]:
        return read_events(self.nats_url, f"{CONFIG_PREFIX}.>")

    def wait_events(self, event_type: str, predicate: Callable[[list[Event]], bool], timeout: float = 60,
                    what: str = "") -> list[Event]:
        def check() -> list[Event] | None:
            found = self.events(event_type)
            return found if predicate(found) else None

        result: list[Event] = wait_for(check, timeout, what or f"{event_type} events", self.logs, interval=0.5)
        return result

    @property
    def blob_root(self) -> Path:
        return self.data / "blobs"

    def database_url(self) -> str:
        return self.env_extra.get("CADUCEUS_DATABASE_URL") or f"sqlite:///{self.data / 'bookkeeper.sqlite'}"

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Run SQL against the bookkeeper's database."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url())
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(sql), params)]
        finally:
            engine.dispose()

    def logs(self, lines: int = 20) -> str:
        parts = []
        out = self.root / "up.out"
        if out.exists():
            parts.append("----- up.out\n" + "\n".join(out.read_text(errors="replace").splitlines()[-lines:]))
        for log in sorted((self.data / "logs").glob("*.log")) if (self.data / "logs").exists() else []:
            parts.append(f"----- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


# ---------------------------------------------------------------- ledger

def delivered_ids(events: list[Event]) -> dict[str, list[str]]:
    """task_id -> the dispatch.* event types seen for it, in stream order."""
    seen: dict[str, list[str]] = {}
    for event in events:
        if event.type.startswith("dispatch.") and event.task_id:
            seen.setdefault(event.task_id, []).append(event.type)
    return seen


def assert_ledger(accepted: set[str], delivered: Counter[str], *, resent: set[str] | frozenset[str] = frozenset(),
                  exactly_once: bool = False) -> None:
    """Every instance the sender saw accepted is at the destination; nothing that was not sent
    arrives (no new identities); an instance arrives more than once only when it was sent more
    than once (or, unless `exactly_once`, when at-least-once delivery re-sent it)."""
    missing = accepted - set(delivered)
    assert not missing, f"{len(missing)} accepted instance(s) never delivered: {sorted(missing)[:5]}"
    foreign = set(delivered) - accepted - resent
    assert not foreign, f"destination got instances nobody sent: {sorted(foreign)[:5]}"
    if exactly_once:
        repeated = {uid: n for uid, n in delivered.items() if n > 1 and uid not in resent}
        assert not repeated, f"delivered more than once: {repeated}"


def storescp_deliveries(files: list[Path]) -> Counter[str]:
    """SOP Instance UID -> number of files storescp (+uf: unique file names) wrote for it.

    storescp writes under the final name, so a file still being written has no SOP Instance UID
    yet: it is left out here and counted on the next look.
    """
    found: Counter[str] = Counter()
    for path in files:
        try:
            found[sop_uid_of(path)] += 1
        except (AttributeError, OSError, EOFError):
            continue
    return found


Row = tuple[str, int, str]  # stream, stream sequence, event id


def stream_rows(cad: Caduceus) -> list[Row]:
    """(stream, sequence, event id) of every event stored on EVENTS and CONFIG."""
    events = [*cad.events(), *cad.config_events()]
    return [(str(e.stream), int(e.stream_seq or 0), e.event_id) for e in events]


def audit_rows(cad: Caduceus) -> tuple[list[Row], list[Row]]:
    """The bookkeeper's events table and its event_duplicates table, as rows."""
    stored = [(str(s), int(q), str(i)) for s, q, i in cad.query("select stream, stream_seq, event_id from events")]
    duplicates = [(str(s), int(q), str(i)) for s, q, i in
                  cad.query("select stream, stream_seq, event_id from event_duplicates")]
    return stored, duplicates


def wait_audit_complete(cad: Caduceus, timeout: float = 60) -> tuple[list[Row], list[Row], list[Row]]:
    """Wait until every stream message is accounted for in the audit log, then check "exactly
    once": each event id stored once, at the place (stream, sequence) where the stream first has
    it; a later copy of the same id (re-published after the de-duplication window) is recorded as
    a duplicate, never as a second event. Returns (stream rows, stored rows, duplicate rows)."""
    def caught_up() -> tuple[list[Row], list[Row], list[Row]] | None:
        stream = stream_rows(cad)
        stored, duplicates = audit_rows(cad)
        accounted = {(s, q) for s, q, _ in stored} | {(s, q) for s, q, _ in duplicates}
        return (stream, stored, duplicates) if {(s, q) for s, q, _ in stream} <= accounted else None

    stream, stored, duplicates = wait_for(caught_up, timeout, "bookkeeper caught up with EVENTS and CONFIG",
                                          cad.logs, interval=1.0)
    stored_ids = Counter(event_id for _, _, event_id in stored)
    assert max(stored_ids.values()) == 1, "an event stored twice"
    assert set(stored_ids) == {event_id for _, _, event_id in stream}, "audit log and streams differ"
    first_place: dict[str, tuple[str, int]] = {}
    for s, q, event_id in sorted(stream, key=lambda row: (row[0], row[1])):
        first_place.setdefault(event_id, (s, q))
    assert {event_id: (s, q) for s, q, event_id in stored} == first_place, "an event stored at the wrong place"
    assert len(stream) == len(stored) + len([row for row in duplicates if row in stream])
    return stream, stored, duplicates


def settings_doc(**overrides: Any) -> dict[str, Any]:
    return {**FAST_SETTINGS, **overrides}


def route_all_config(port: int, aet: str, **settings: Any) -> dict[str, Any]:
    """One DICOM target `dest` on 127.0.0.1 and one rule sending every series to it."""
    return {"settings": settings_doc(**settings), "targets": {"dest": dicom_target(port, aet)},
            "rules": {"all": {"filter": "True", "targets": ["dest"]}}}


@pytest.fixture
def caduceus_factory(tmp_path: Path) -> Iterator[Callable[..., Caduceus]]:
    """Make (and at the end stop) `caduceus up` instances: `make(config=..., env_extra=..., start=True)`."""
    made: list[Caduceus] = []

    def make(*, config: dict[str, Any] | None = None, env_extra: dict[str, str] | None = None,
             start: bool = True, data_dir: Path | None = None, up_args: list[str] | None = None) -> Caduceus:
        instance = Caduceus(tmp_path / f"caduceus-{len(made)}", env_extra=env_extra or {}, config=config,
                            data_dir=data_dir, up_args=up_args or [])
        made.append(instance)
        return instance.start() if start else instance

    yield make
    for instance in made:
        instance.kill_all()
