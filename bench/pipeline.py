"""Helpers for the whole-pipeline benchmarks (e2e, growth, memory): `caduceus up` as a subprocess.

`start_caduceus()` runs `python -m cli.main up` on free ports with its own data dir and a
configuration written from a dict, waits until every service sends heartbeats and the router has
caught up, and returns a handle with the service pids (from `<data dir>/caduceus-up.json`).
`read_events()` reads the timing-relevant events back from the EVENTS stream. Peers and senders
come from bench/common.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.common import REPO, storescu
from shared import subjects
from shared.bus import Bus, replay
from shared.events import Event
from shared.health import EXPECTED_SERVICES, collect_health
from shared.natsserver import free_port, terminate, wait_port
from shared.settings import UP_STATE_FILE

DEST_AET = "STORESCP"
# The services an image passes through: enough for smoke runs (starting all seven costs seconds).
DATA_PATH = ("receiver", "router", "dispatcher")
# Closing the benchmark's own NATS connections logs "disconnected" warnings: not news here.
logging.getLogger("shared.bus").setLevel(logging.ERROR)


def route_all_config(dest_port: int, quiet_seconds: float, extra_rules: int = 0) -> dict[str, Any]:
    """One DICOM target (a storescp) and a rule that routes every series to it.

    `extra_rules` adds enabled series rules that never match (evaluated on every decision), to
    measure how the decision cost grows with the rule count.
    """
    rules: dict[str, Any] = {"route-all": {"filter": "True", "targets": ["dest"]}}
    for i in range(extra_rules):
        rules[f"nomatch-{i:04d}"] = {"filter": f"@SeriesDescription@ == 'NO SUCH SERIES {i}' "
                                               f"and @Modality@ in ('MR', 'PT')", "targets": ["dest"]}
    return {
        "settings": {"series_complete_seconds": quiet_seconds},
        "targets": {"dest": {"host": "127.0.0.1", "port": dest_port, "called_aet": DEST_AET}},
        "rules": rules,
    }


@dataclass
class Caduceus:
    workdir: Path
    data_dir: Path
    process: subprocess.Popen[bytes]
    dicom_port: int
    nats_url: str
    log_path: Path

    def state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.data_dir / UP_STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def service_pids(self) -> dict[str, int]:
        services = self.state().get("services") or {}
        return {name: int(pid) for name, pid in services.items() if pid}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def service_log(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def send(self, paths: list[Path] | Path) -> float:
        result = storescu(self.dicom_port, paths, called_aet="CADUCEUS")
        if result.returncode != 0:
            raise RuntimeError(f"storescu -> caduceus failed: {result.output[-2000:]}")
        return result.seconds

    def apply_config(self, config: dict[str, Any]) -> None:
        """What `caduceus config apply` does, in process; the services fold it from the CONFIG stream."""
        from cli.config_cmd import apply_config
        from shared.config.model import CaduceusConfig

        desired = CaduceusConfig.parse(config)

        async def run() -> None:
            bus = await Bus.connect(self.nats_url, actor="bench", declare=False)
            try:
                await apply_config(bus, desired, "user:bench", comment="benchmark")
            finally:
                await bus.close()

        asyncio.run(run())
        time.sleep(1.0)  # the router folds CONFIG live; route.decided shows which rules it evaluated

    def stop(self, timeout: float = 60) -> None:
        terminate(self.process, timeout)


def start_caduceus(workdir: Path, config: dict[str, Any], *, env: dict[str, str] | None = None,
                   services: tuple[str, ...] = EXPECTED_SERVICES, timeout: float = 120) -> Caduceus:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "caduceus.yaml"
    config_path.write_text(yaml.safe_dump(config))
    data_dir = workdir / "data"
    dicom_port, ui_port, nats_port = free_port(), free_port(), free_port()
    log_path = workdir / "caduceus-up.log"
    full_env = {**os.environ, "CADUCEUS_DICOM_HOST": "127.0.0.1", **(env or {})}
    full_env.pop("CADUCEUS_NATS_URL", None)  # always the embedded NATS of this run
    args = [sys.executable, "-m", "cli.main", "up", "--data-dir", str(data_dir), "--config", str(config_path),
            "--dicom-port", str(dicom_port), "--ui-port", str(ui_port), "--nats-port", str(nats_port),
            "--heartbeat-seconds", "1", "--services", ",".join(services)]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
    run = Caduceus(workdir, data_dir, proc, dicom_port, f"nats://127.0.0.1:{nats_port}", log_path)
    try:
        wait_port("127.0.0.1", dicom_port, timeout=timeout)
        asyncio.run(_wait_healthy(run.nats_url, services, timeout))
    except Exception:
        run.stop()
        raise RuntimeError(f"caduceus up did not become healthy:\n{run.log_text()[-3000:]}") from None
    return run


async def _wait_healthy(nats_url: str, services: tuple[str, ...], timeout: float) -> None:
    """Every service heartbeats and the router reports it has caught up with EVENTS."""
    deadline = time.monotonic() + timeout
    bus = await Bus.connect(nats_url, actor="bench", declare=False)
    try:
        while time.monotonic() < deadline:
            report = await collect_health(bus, services)
            router = [i for s in report.services if s.service == "router" for i in s.instances]
            if report.healthy and router and router[0].details.get("caught_up"):
                return
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
    raise TimeoutError("services not healthy")


# ------------------------------------------------------------------ events

TIMING_TYPES = ("image.received", "series.completed", "route.decided", "dispatch.requested",
                "dispatch.completed", "dispatch.attempt_failed", "dispatch.failed")


def read_events(nats_url: str, types: tuple[str, ...] = TIMING_TYPES, since_seq: int = 0) -> list[Event]:
    """The stored events of these types with stream_seq > since_seq, in stream order."""
    async def run() -> list[Event]:
        bus = await Bus.connect(nats_url, actor="bench", declare=False)
        found: list[Event] = []
        try:
            for event_type in types:
                subject = subjects.event_subject(event_type)
                if event_type in subjects.PRIORITISED_TYPES:
                    subject = subject.rsplit(".", 1)[0] + ".>"
                found += [e async for e in replay(bus, subject, idle_timeout=5.0)
                          if (e.stream_seq or 0) > since_seq]
        finally:
            await bus.close()
        return sorted(found, key=lambda e: e.stream_seq or 0)

    return asyncio.run(run())


def last_seq(nats_url: str) -> int:
    async def run() -> int:
        bus = await Bus.connect(nats_url, actor="bench", declare=False)
        try:
            return await bus.last_seq(subjects.EVENTS_STREAM)
        finally:
            await bus.close()

    return asyncio.run(run())


def ts(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else float("nan")


def wait_for_files(directory: Path, expected: int, timeout: float, poll: float = 0.005) -> float:
    """Wall-clock time (time.time()) at which `directory` first holds `expected` files."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with os.scandir(directory) as entries:
            if sum(1 for e in entries if e.is_file()) >= expected:
                return time.time()
        time.sleep(poll)
    with os.scandir(directory) as entries:
        have = sum(1 for e in entries if e.is_file())
    raise TimeoutError(f"{directory}: {have} of {expected} files after {timeout:.0f} s")
