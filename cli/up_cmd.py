"""`caduceus up`: run the whole system on one machine.

1. Starts an embedded nats-server with JetStream (store under `<data dir>/nats`, port --nats-port)
   unless CADUCEUS_NATS_URL points at an existing NATS.
2. Uses SQLite under the data dir for the bookkeeper unless CADUCEUS_DATABASE_URL is set.
3. Applies --config FILE like `caduceus config apply` (actor user:<OS user>).
4. Runs every service as its own process (`python -m services.NAME`), supervised by
   cli/supervisor.py: crashed services are restarted with backoff, recorded as service.crashed /
   service.restarted events; the embedded nats-server is kept running the same way, and restarted
   when its store failed a write (cli/natskeeper.py); a service that stops heartbeating is killed and
   restarted (cli/watchdog.py).
5. Writes `<data dir>/caduceus-up.json` (NATS URL, pids) so CLI commands from another shell find
   this NATS (shared.settings.nats_url_for_cli), and removes it on a clean stop.
SIGTERM or Ctrl-C: stop the services (SIGTERM, wait, SIGKILL stragglers), then NATS; exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from pydantic import ValidationError

from cli.config_cmd import (
    EXIT_INVALID,
    FileError,
    apply_config,
    describe_change,
    load_config_file,
    print_warnings,
)
from cli.connection import default_actor
from cli.natskeeper import NatsKeeper
from cli.supervisor import ChildSpec, Supervisor, child_env, service_argv
from cli.watchdog import HeartbeatWatchdog
from shared.bus import Bus
from shared.config.model import CaduceusConfig, ConfigError
from shared.config.state import fold, read_all
from shared.health import EXPECTED_SERVICES
from shared.natsserver import EmbeddedNats, free_port
from shared.settings import UP_STATE_FILE, Settings, cli_data_dir, up_state

log = logging.getLogger("caduceus.up")

EXIT_START_FAILED = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("up", help="start NATS (embedded) and every service, supervised")
    parser.add_argument("--data-dir", default=str(cli_data_dir()),
                        help="blobs, NATS store, SQLite, logs (default $CADUCEUS_DATA_DIR or ./caduceus-data)")
    parser.add_argument("--config", type=Path, default=None, help="apply this YAML/JSON configuration first")
    # String defaults: argparse converts them as it would a command-line value (and says so if bad).
    parser.add_argument("--dicom-port", type=int, default=os.environ.get("CADUCEUS_DICOM_PORT", "11112"),
                        help="DICOM port of the receiver (default $CADUCEUS_DICOM_PORT or 11112)")
    parser.add_argument("--ui-port", type=int, default=os.environ.get("CADUCEUS_UI_PORT", "8080"),
                        help="port of the web UI (default $CADUCEUS_UI_PORT or 8080)")
    parser.add_argument("--ui-host", default=os.environ.get("CADUCEUS_UI_HOST", "127.0.0.1"),
                        help="address the web UI listens on (default $CADUCEUS_UI_HOST or 127.0.0.1; "
                             "0.0.0.0 for every interface)")
    parser.add_argument("--nats-port", type=int, default=4223,
                        help="port of the embedded NATS (4223: leaves a system NATS on 4222 alone)")
    parser.add_argument("--services", default=",".join(EXPECTED_SERVICES),
                        help="comma separated services to run (default: all seven)")
    parser.add_argument("--heartbeat-seconds", type=float, default=None,
                        help="heartbeat interval of the services (default $CADUCEUS_HEARTBEAT_SECONDS or 5)")
    parser.add_argument("--backoff-max", type=float, default=30.0,
                        help="longest wait before restarting a crashed service")
    parser.add_argument("--stable-after", type=float, default=30.0,
                        help="a service that ran this long is considered stable again (backoff resets)")
    parser.add_argument("--hung-after", type=float, default=None,
                        help="restart a running service that sent no heartbeat for this long (default: 12 "
                             "heartbeat intervals, at least 60 s; 0 turns the watchdog off)")
    parser.set_defaults(func=run)


class StartError(RuntimeError):
    pass


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s caduceus up: %(message)s", stream=sys.stderr)
    logging.getLogger("shared.bus").setLevel(logging.ERROR)
    desired: CaduceusConfig | None = None
    if args.config is not None:
        try:
            desired = load_config_file(args.config)
        except (FileError, ConfigError) as exc:
            print(f"caduceus up: invalid configuration {args.config}, nothing started: {exc}", file=sys.stderr)
            return EXIT_INVALID
        print_warnings(desired, "caduceus up")
    try:
        return asyncio.run(_up(args, desired))
    except StartError as exc:
        print(f"caduceus up: {exc}", file=sys.stderr)
        return EXIT_START_FAILED


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_not_running(state_file: Path) -> None:
    pid = up_state(state_file.parent).get("supervisor_pid")
    if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
        raise StartError(f"another `caduceus up` (pid {pid}) is running on this data dir ({state_file})")
    _stop_orphaned_nats(state_file.parent)


def _stop_orphaned_nats(data_dir: Path) -> None:
    """A launcher that was killed (-9) leaves its embedded NATS running: stop it before starting anew.

    The services die with the launcher (PR_SET_PDEATHSIG); NATS is not our child in that sense.
    Every nats-server using this data dir's store is one (no launcher runs here, see above),
    whatever pid the state file recorded: a launcher killed while it was restarting NATS
    (cli/natskeeper.py) had not recorded the new one yet.
    """
    store = (data_dir / "nats").resolve()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if not cmdline or "nats-server" not in Path(cmdline[0]).name:
            continue
        # The store dir is on its command line itself (-sd) or as the folder of its config file (-c).
        if not any(arg == str(store) or Path(arg).parent == store for arg in cmdline[1:]):
            continue
        log.warning("stopping NATS (pid %d) left behind by a previous caduceus up", process.pid)
        try:
            process.terminate()
            process.wait(10)
        except psutil.TimeoutExpired:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _check_ports(args: argparse.Namespace, services: list[str], embedded: bool) -> None:
    wanted = []
    if embedded:
        wanted.append(("NATS", "127.0.0.1", args.nats_port, "--nats-port or set CADUCEUS_NATS_URL"))
    if "receiver" in services:
        wanted.append(("DICOM", os.environ.get("CADUCEUS_DICOM_HOST", "0.0.0.0"), args.dicom_port, "--dicom-port"))
    if "ui" in services:
        wanted.append(("UI", args.ui_host, args.ui_port, "--ui-port"))
    for label, host, port, hint in wanted:
        if not _port_free(host, port):
            raise StartError(f"{label} port {host}:{port} is already in use (choose another with {hint})")


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


async def _up(args: argparse.Namespace, desired: CaduceusConfig | None) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs_dir = data_dir / "logs"
    logs_dir.mkdir(exist_ok=True)
    state_file = data_dir / UP_STATE_FILE
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    unknown = set(services) - set(EXPECTED_SERVICES)
    if unknown:
        raise StartError(f"unknown service(s): {', '.join(sorted(unknown))}")
    _check_not_running(state_file)
    try:
        settings = Settings()
    except ValidationError as exc:
        raise StartError(f"invalid CADUCEUS_* environment setting:\n{exc}") from None
    external_url = os.environ.get("CADUCEUS_NATS_URL", "")
    _check_ports(args, services, embedded=not external_url)

    nats: EmbeddedNats | None = None
    if external_url:
        nats_url = external_url
    else:
        nats = EmbeddedNats(data_dir / "nats", port=args.nats_port, log_file=logs_dir / "nats.log",
                            new_session=True, log_max_bytes=settings.log_max_bytes,
                            log_files_kept=settings.log_files_kept, monitor_port=_monitor_port(args))
        await asyncio.to_thread(nats.start)
        nats_url = nats.url
    bus: Bus | None = None
    try:
        try:
            # Reconnect forever once connected (the launcher outlives NATS restarts), but give up
            # on a first connection that does not succeed within 30 s.
            bus = await asyncio.wait_for(Bus.connect(nats_url, actor="supervisor", connect_timeout=5), 30)
        except Exception as exc:  # noqa: BLE001
            raise StartError(f"cannot connect to NATS at {nats_url}: {exc!r}") from exc
        if desired is not None:
            await _apply_initial_config(bus, desired, args.config)
        return await _supervise(args, services, data_dir, logs_dir, state_file, nats, nats_url, bus, settings)
    finally:
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()
        if nats is not None:
            await asyncio.to_thread(nats.stop)
            print("caduceus up: NATS stopped", file=sys.stderr, flush=True)
        with contextlib.suppress(FileNotFoundError):
            state_file.unlink()


async def _apply_initial_config(bus: Bus, desired: CaduceusConfig, path: Path) -> None:
    actor = default_actor()
    changes = await apply_config(bus, desired, actor, comment=f"caduceus up --config {path}")
    if changes:
        print(f"applied {len(changes)} configuration change(s) from {path} as {actor}:")
        for event in changes:
            print(f"  {describe_change(event)}")
    else:
        print(f"configuration {path}: no changes")


def _service_env(args: argparse.Namespace, data_dir: Path, nats_url: str) -> dict[str, str]:
    overrides = {
        "CADUCEUS_NATS_URL": nats_url,
        "CADUCEUS_DATA_DIR": str(data_dir),
        "CADUCEUS_DICOM_PORT": str(args.dicom_port),
        "CADUCEUS_UI_PORT": str(args.ui_port),
        "CADUCEUS_UI_HOST": args.ui_host,
    }
    if not os.environ.get("CADUCEUS_DATABASE_URL"):
        overrides["CADUCEUS_DATABASE_URL"] = f"sqlite:///{data_dir / 'bookkeeper.sqlite'}"
    if args.heartbeat_seconds is not None:
        overrides["CADUCEUS_HEARTBEAT_SECONDS"] = str(args.heartbeat_seconds)
    return child_env(dict(os.environ), overrides)


async def _supervise(args: argparse.Namespace, services: list[str], data_dir: Path, logs_dir: Path,
                     state_file: Path, nats: EmbeddedNats | None, nats_url: str, bus: Bus,
                     settings: Settings) -> int:
    env = _service_env(args, data_dir, nats_url)
    specs = [ChildSpec(name, service_argv(name), env, logs_dir / f"{name}.log") for name in services]
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    def save_state(sup: Supervisor) -> None:
        _write_state(state_file, {
            "supervisor_pid": os.getpid(),
            "started_at": started_at,
            "nats_url": nats_url,
            "nats_embedded": nats is not None,
            "nats_pid": nats.process.pid if nats is not None and nats.process is not None else None,
            "nats_monitor_url": nats.monitor_url if nats is not None else None,
            "data_dir": str(data_dir),
            "ui_url": f"http://{args.ui_host}:{args.ui_port}/",
            "dicom_port": args.dicom_port,
            "services": sup.pids(),
        })

    supervisor = Supervisor(specs, bus, backoff_max=args.backoff_max, stable_after=args.stable_after,
                            on_change=save_state, log_max_bytes=settings.log_max_bytes,
                            log_files_kept=settings.log_files_kept)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, supervisor.request_stop)
    await supervisor.start()
    helpers: list[asyncio.Task[None]] = []   # each returns once stopping is set
    if nats is not None:
        keeper = NatsKeeper(nats, lambda type_, payload: supervisor.record(type_, payload, retries=10),
                            supervisor.stopping, on_restart=lambda: save_state(supervisor))
        helpers.append(asyncio.create_task(keeper.run()))
    hung_after = _hung_after(args, settings)
    if hung_after > 0:
        helpers.append(asyncio.create_task(HeartbeatWatchdog(supervisor, bus, hung_after).run()))
    _print_banner(args, services, data_dir, logs_dir, nats_url, nats is not None, await _ae_title(bus))
    await supervisor.wait()
    await asyncio.gather(*helpers, return_exceptions=True)
    print("caduceus up: services stopped; stopping NATS" if nats is not None else "caduceus up: services stopped",
          file=sys.stderr, flush=True)
    return 0


def _monitor_port(args: argparse.Namespace) -> int:
    """A free loopback port for nats-server's monitoring, none of the ports the services will bind
    (they are free too until the services start, so the kernel may offer one of them)."""
    taken = {args.dicom_port, args.ui_port, args.nats_port}
    port = free_port()
    while port in taken:
        port = free_port()
    return port


def _hung_after(args: argparse.Namespace, settings: Settings) -> float:
    if args.hung_after is not None:
        return float(args.hung_after)
    interval = args.heartbeat_seconds if args.heartbeat_seconds is not None else settings.heartbeat_seconds
    return max(60.0, 12 * interval)


async def _ae_title(bus: Bus) -> str:
    """The receiver's AE title in the configuration in force (for the banner)."""
    try:
        return CaduceusConfig.from_items(fold(await read_all(bus))).settings.ae_title
    except Exception:  # noqa: BLE001 - a banner detail: never a reason not to start
        return "see settings.ae_title"


def _print_banner(args: argparse.Namespace, services: list[str], data_dir: Path, logs_dir: Path,
                  nats_url: str, embedded: bool, ae_title: str) -> None:
    lines = ["caduceus is up"]
    if "ui" in services:
        lines.append(f"  web UI      http://{args.ui_host}:{args.ui_port}/")
    if "receiver" in services:
        lines.append(f"  DICOM       port {args.dicom_port}, AE title {ae_title} (settings.ae_title)")
    lines.append(f"  NATS        {nats_url}{' (embedded)' if embedded else ''}")
    lines.append(f"  data dir    {data_dir}")
    lines.append(f"  logs        {logs_dir}/<service>.log (rotated: CADUCEUS_LOG_MAX_MB, CADUCEUS_LOG_FILES_KEPT)")
    lines.append(f"  services    {', '.join(services)}")
    lines.append("  status      caduceus status" + (f" --data-dir {data_dir}" if embedded else ""))
    lines.append("Ctrl-C stops everything.")
    print("\n".join(lines), flush=True)
