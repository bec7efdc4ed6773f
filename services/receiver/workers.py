"""Several receiver processes behind one DICOM port (CADUCEUS_RECEIVER_WORKERS=N or auto; default 1).

Why: the per-image work is Python and holds the GIL, so one process uses about one core however
many senders there are. With N workers, the receiver service process (the "supervisor") keeps
listening on the DICOM port and serving associations itself, and starts N-1 worker processes
(`python -m services.receiver` with CADUCEUS_RECEIVER_CHANNEL_FD set). Each accepted connection
goes to whoever has the fewest open connections: the supervisor keeps it, or hands the socket to
a worker over an AF_UNIX SOCK_SEQPACKET socketpair (SCM_RIGHTS), before any TLS handshake.
(SO_REUSEPORT would spread connections by a hash of the ports: 4 senders land 3+1 or 4+0 on two
processes half of the time.)

A worker is a small runtime of its own: its own NATS connection and configuration follower, the
same Ingest path (file stored and fsynced, image.received acknowledged, then 0x0000), no lifecycle
events or heartbeats (the supervisor is the service; its heartbeat reports the workers). Messages
on the channel: supervisor -> worker: a connection (fd + peer address as JSON); worker ->
supervisor: b"R" (ready), b"E" (a connection ended). When the supervisor dies the channel reaches
EOF and the worker drains and exits; when a worker dies the supervisor starts another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.receiver.admission import BoundedServer

log = logging.getLogger(__name__)

WORKERS_ENV = "CADUCEUS_RECEIVER_WORKERS"
CHANNEL_FD_ENV = "CADUCEUS_RECEIVER_CHANNEL_FD"
READY, ENDED = b"R", b"E"
RESTART_DELAY = 1.0


def worker_count(setting: str | None = None) -> int:
    """Processes serving associations, the supervisor included, for a CADUCEUS_RECEIVER_WORKERS
    value (`setting`; None: this process's environment).

    `auto` = cores, at most 4. Default 1: two processes are faster with several senders (session 8,
    docs/performance.md), but the connection limits (admission.py) are kept by each process, so
    N processes admit N times as many connections (docs/reliability.md).
    """
    raw = (os.environ.get(WORKERS_ENV, "") if setting is None else setting).strip().lower()
    if raw == "auto":
        return max(1, min(4, os.cpu_count() or 1))
    return max(1, int(raw)) if raw else 1


def channel_fd() -> int | None:
    raw = os.environ.get(CHANNEL_FD_ENV, "").strip()
    return int(raw) if raw else None


# ---------------------------------------------------------------- servers


class RoutingServer(BoundedServer):
    """The supervisor's acceptor: `router(sock, address)` may hand the raw socket to a worker."""

    router: Callable[[socket.socket, Any], bool] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.router is not None and self.router(client, address):
            # The worker has its own copy of the descriptor: close ours without shutdown(),
            # which would end the connection for the worker too.
            client.close()
            raise OSError("connection handed to a worker")  # socketserver skips this request
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


class HandedOverServer(BoundedServer):
    """A worker's acceptor: connections arrive over the channel instead of from accept()."""

    channel: socket.socket
    on_channel_closed: Callable[[], None] | None = None

    def server_bind(self) -> None:
        pass  # never listens: the supervisor owns the port

    def server_activate(self) -> None:
        pass

    def fileno(self) -> int:
        return self.channel.fileno()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            message, fds, _flags, _address = socket.recv_fds(self.channel, 1024, 1)
        except OSError:
            message, fds = b"", []
        if not fds:
            callback, self.on_channel_closed = self.on_channel_closed, None
            if callback is not None:
                callback()
            time.sleep(0.05)  # until the shutdown lands, the channel stays readable (EOF)
            raise OSError("supervisor channel closed")
        client = socket.socket(fileno=fds[0])
        peer = json.loads(message)
        address = (str(peer["host"]), int(peer["port"]))
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address


# ---------------------------------------------------------------- supervisor side


@dataclass
class Worker:
    index: int
    channel: socket.socket
    process: subprocess.Popen[bytes]
    ready: bool = False
    open: int = 0
    reader: threading.Thread | None = field(default=None, repr=False)


class WorkerPool:
    """Starts, feeds and restarts the worker processes of one supervisor."""

    def __init__(self, extra: int, instance: str) -> None:
        self.extra = extra
        self.instance = instance
        self.workers: dict[int, Worker] = {}
        self.local_open = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.restarts = 0

    def start(self) -> None:
        for index in range(1, self.extra + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, CHANNEL_FD_ENV: str(theirs.fileno()), WORKERS_ENV: "1",
               "CADUCEUS_INSTANCE": f"{self.instance}-w{index}",
               # each process its own journal, the same one after a restart (services/receiver/journal.py)
               "CADUCEUS_RECEIVER_JOURNAL_SLOT": f"w{index}"}
        try:
            process = subprocess.Popen([sys.executable, "-m", "services.receiver"], env=env,
                                       pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        worker = Worker(index, ours, process)
        worker.reader = threading.Thread(target=self._read, args=(worker,), name=f"receiver-worker-{index}",
                                         daemon=True)
        with self.lock:
            self.workers[index] = worker
        worker.reader.start()
        log.info("receiver worker %d started (pid %d)", index, process.pid)

    def _read(self, worker: Worker) -> None:
        while True:
            try:
                message = worker.channel.recv(16)
            except OSError:
                message = b""
            if message == READY:
                worker.ready = True
            elif message == ENDED:
                with self.lock:
                    worker.open = max(0, worker.open - 1)
            elif not message:
                break
        worker.ready = False
        worker.channel.close()
        code = worker.process.wait()
        if self.stopping:
            return
        log.error("receiver worker %d exited (code %s); starting another", worker.index, code)
        self.restarts += 1
        time.sleep(RESTART_DELAY)
        if not self.stopping:
            self._spawn(worker.index)

    def route(self, client: socket.socket, address: Any) -> bool:
        """True when the connection went to a worker; False: the supervisor serves it."""
        with self.lock:
            ready = [w for w in self.workers.values() if w.ready]
            best = min(ready, key=lambda w: w.open, default=None)
            if best is None or best.open >= self.local_open:
                self.local_open += 1
                return False
            payload = json.dumps({"host": address[0], "port": address[1]}).encode()
            try:
                socket.send_fds(best.channel, [payload], [client.fileno()])
            except OSError as exc:
                log.warning("could not hand a connection to worker %d: %s", best.index, exc)
                self.local_open += 1
                return False
            best.open += 1
            return True

    def local_closed(self) -> None:
        with self.lock:
            self.local_open = max(0, self.local_open - 1)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every worker (each drains its associations), then wait; kill what is left."""
        self.stopping = True
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.process.terminate()
        deadline = time.monotonic() + grace
        for worker in workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()

    def details(self) -> dict[str, Any]:
        with self.lock:
            workers = list(self.workers.values())
        return {"workers": 1 + len(workers), "workers_ready": 1 + sum(1 for w in workers if w.ready),
                "worker_restarts": self.restarts,
                "worker_open_connections": [w.open for w in workers], "local_open_connections": self.local_open}


# ---------------------------------------------------------------- worker side


def run_worker(fd: int) -> None:
    """Main of a worker process (`python -m services.receiver` with CADUCEUS_RECEIVER_CHANNEL_FD)."""
    from shared.logging import setup_logging
    from shared.settings import load_settings

    settings = load_settings()
    setup_logging("receiver", settings.log_level)
    channel = socket.socket(fileno=fd)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_worker_main(settings, channel))


async def _worker_main(settings: Any, channel: socket.socket) -> None:
    from services.receiver.service import drain_associations

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Until this worker says it is ready the supervisor sends nothing: the channel becoming
    # readable means it closed (supervisor gone). Startup (NATS may be down) must not outlive it.
    loop.add_reader(channel.fileno(), stop.set)
    startup = asyncio.ensure_future(_start_worker(settings, channel, loop, stop))
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({startup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    loop.remove_reader(channel.fileno())
    if not startup.done():
        startup.cancel()
        with contextlib.suppress(BaseException):
            await startup
        return
    stopped.cancel()
    scp, follower, bus = startup.result()
    channel.send(READY)
    log.info("receiver worker ready", extra={"data": {"pid": os.getpid()}})
    await stop.wait()
    await asyncio.to_thread(drain_associations, scp)
    await follower.stop()
    await bus.close()


async def _start_worker(settings: Any, channel: socket.socket, loop: asyncio.AbstractEventLoop,
                        stop: asyncio.Event) -> tuple[Any, Any, Any]:
    from services.receiver.service import build_scp
    from shared.bus import Bus
    from shared.config.state import ConfigFollower

    bus = await Bus.connect(settings.nats_url, actor="receiver")
    scp_holder: list[Any] = []

    def on_config(config: Any) -> None:
        if scp_holder:
            scp_holder[0].apply_settings(config.settings)

    follower = ConfigFollower(bus, on_change=on_config)
    await follower.start()
    await follower.wait_ready()

    def ended() -> None:
        with contextlib.suppress(OSError):
            channel.send(ENDED)

    def configure(server: Any) -> None:
        server.channel = channel
        server.on_channel_closed = lambda: loop.call_soon_threadsafe(stop.set)

    scp = await build_scp(settings, bus, lambda: follower.config.settings, loop, on_conn_close=ended)
    scp_holder.append(scp)
    await asyncio.to_thread(scp.start, HandedOverServer, configure)
    return scp, follower, bus
