"""Several receiver processes behind one DICOM port (CADUCEUS_RECEIVER_WORKERS=N; default 2 on 2+ cores).

Why: the per-image work is Python and holds the GIL, so one process uses about one core however
many senders there are. With N workers, the receiver service process (the "supervisor") keeps
listening on the DICOM port and serving associations itself, and starts N-1 worker processes
(`python -m services.receiver` with CADUCEUS_RECEIVER_CHANNEL_FD set). Each accepted connection
is first admitted by the supervisor for the whole receiver (admission.py: the connection bound,
the per-host limit and the ending of idle connections count every process's connections), then
goes to whoever has the fewest open connections: the supervisor keeps it, or hands the socket to
a worker over an AF_UNIX SOCK_SEQPACKET socketpair (SCM_RIGHTS), before any TLS handshake.
(SO_REUSEPORT would spread connections by a hash of the ports: 4 senders land 3+1 or 4+0 on two
processes half of the time.)

A worker is a small runtime of its own: its own NATS connection and configuration follower, the
same Ingest path (file stored and fsynced, image.received acknowledged, then 0x0000), no lifecycle
events or heartbeats (the supervisor is the service; its heartbeat reports the workers). Messages
on the channel: supervisor -> worker: a connection (fd + JSON {key, host, port}) or a request to
end idle connections (JSON {end: [key...]}, no fd); worker -> supervisor: b"R" (ready), b"A<key>"
(its A-ASSOCIATE-RQ arrived), b"E<key>" (it ended), b"S" + JSON every 2 s (its open associations
and journal counters, which the supervisor's heartbeat adds to its own), b"C<seq> <stream>" (before
b"R" and after each configuration change: the CONFIG sequence it applied and the CONFIG stream it
counts on, its creation time; the supervisor's heartbeat reports the oldest of every ready process's,
a sequence on another stream than the supervisor's counting as 0, and is published at once when it
changes). When the supervisor dies the channel reaches
EOF and the worker drains and exits; when a worker dies the supervisor starts another one and
forgets the dead one's connections.
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

from services.receiver.admission import TLS_HANDSHAKE_SECONDS, BoundedServer, end_idle, waiting_since

log = logging.getLogger(__name__)

WORKERS_ENV = "CADUCEUS_RECEIVER_WORKERS"
CHANNEL_FD_ENV = "CADUCEUS_RECEIVER_CHANNEL_FD"
PROCESSES_ENV = "CADUCEUS_RECEIVER_PROCESSES"
READY, REQUESTED, ENDED, STATUS, CONFIG = b"R", b"A", b"E", b"S", b"C"
RESTART_DELAY = 1.0
# A connection still in its TLS handshake (up to TLS_HANDSHAKE_SECONDS, on its own thread) has no
# association yet: reconcile must not take it for ended, or the supervisor would under-count it.
RECONCILE_AFTER_SECONDS = TLS_HANDSHAKE_SECONDS + 5.0
STATUS_SECONDS = 2.0


def worker_count(setting: str | None = None) -> int:
    """Processes serving associations, the supervisor included, for a CADUCEUS_RECEIVER_WORKERS
    value (`setting`; None: this process's environment).

    Default (unset or `auto`): 2 on a machine with 2 or more cores, else 1. Two processes took
    4 senders' images 15-40 % faster on 2 cores (docs/performance.md, sessions 8 and 9) and the
    receiver then stays under the 200 MB memory goal (~170 MB peak); more processes would not.
    """
    raw = (os.environ.get(WORKERS_ENV, "") if setting is None else setting).strip().lower()
    if raw in ("", "auto"):
        return min(2, os.cpu_count() or 1)
    return max(1, int(raw))


def process_count() -> int:
    """How many processes this receiver has, asked in the supervisor or in a worker (whose own
    CADUCEUS_RECEIVER_WORKERS is 1): they share the receiver's memory budgets."""
    raw = os.environ.get(PROCESSES_ENV, "").strip()
    return int(raw) if raw else worker_count()


def channel_fd() -> int | None:
    raw = os.environ.get(CHANNEL_FD_ENV, "").strip()
    return int(raw) if raw else None


# ---------------------------------------------------------------- servers


class RoutingServer(BoundedServer):
    """The supervisor's acceptor: admits each connection for the whole receiver (admission.py,
    counting the workers' connections), then serves it or hands the raw socket to a worker."""

    pool: WorkerPool | None = None

    def attach(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.others = pool

    def process_request(self, request: Any, client_address: Any) -> None:
        # (Before any TLS handshake: that happens on the connection's thread, in whichever process.)
        if self.pool is not None and self.pool.route(request, client_address, len(self._local_hosts())):
            # The worker has its own copy of the descriptor: close ours without shutdown(),
            # which would end the connection for the worker too.
            request.close()
            return
        super().process_request(request, client_address)


class HandedOverServer(BoundedServer):
    """A worker's acceptor: connections arrive over the channel instead of from accept(), already
    admitted by the supervisor; the worker reports when each is requested and when it ends."""

    channel: socket.socket
    on_channel_closed: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._peers: dict[tuple[str, int], tuple[int, float]] = {}  # peer -> (key, handed over at)
        self._peers_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        pass  # never listens: the supervisor owns the port

    def server_activate(self) -> None:
        pass

    def fileno(self) -> int:
        return self.channel.fileno()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return True  # the supervisor admitted it

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            message, fds, _flags, _address = socket.recv_fds(self.channel, 1024, 1)
        except OSError:
            message, fds = b"", []
        if not message:
            callback, self.on_channel_closed = self.on_channel_closed, None
            if callback is not None:
                callback()
            time.sleep(0.05)  # until the shutdown lands, the channel stays readable (EOF)
            raise OSError("supervisor channel closed")
        client = socket.socket(fileno=fds[0]) if fds else None
        try:
            order = json.loads(message)
            if client is None:
                self._end_idle({int(key) for key in order["end"]})
                raise OSError("not a connection")  # socketserver skips this request
            address, key = (str(order["host"]), int(order["port"])), int(order["key"])
        except (ValueError, KeyError, TypeError) as exc:  # an exception other than OSError would end the acceptor
            log.error("unreadable message from the supervisor: %r (%s)", message[:200], exc)
            if client is not None:
                client.close()
            raise OSError("unreadable message from the supervisor") from exc
        with self._peers_lock:
            self._peers[address] = (key, time.monotonic())
        return client, address  # (TLS: the handshake happens on the connection's thread)

    def handshake_failed(self, client_address: Any) -> None:
        self._report(ENDED, (str(client_address[0]), int(client_address[1])))

    def association_requested(self, assoc: Any) -> None:
        self._report(REQUESTED, _peer(assoc))

    def connection_closed(self, assoc: Any) -> None:
        self._report(ENDED, _peer(assoc))

    def _report(self, kind: bytes, peer: tuple[str, int]) -> None:
        with self._peers_lock:
            entry = self._peers.pop(peer, None) if kind == ENDED else self._peers.get(peer)
        if entry is not None:
            with contextlib.suppress(OSError):
                self.channel.send(kind + str(entry[0]).encode())

    def _end_idle(self, keys: set[int]) -> None:
        with self._peers_lock:
            peers = {peer for peer, (key, _at) in self._peers.items() if key in keys}
        for assoc in self.ae.active_associations:
            if _peer(assoc) in peers and waiting_since(assoc) is not None:
                end_idle(assoc)

    def reconcile(self, older_than: float = RECONCILE_AFTER_SECONDS) -> None:
        """Report as ended the connections whose association is gone without a close event (so
        that the supervisor's counts cannot drift), once they are past starting up."""
        alive = {_peer(assoc) for assoc in self.ae.active_associations}
        cutoff = time.monotonic() - older_than
        with self._peers_lock:
            gone = [peer for peer, (_key, at) in self._peers.items() if at < cutoff and peer not in alive]
        for peer in gone:
            self._report(ENDED, peer)


def _peer(assoc: Any) -> tuple[str, int]:
    return str(assoc.requestor.address), int(assoc.requestor.port)


# ---------------------------------------------------------------- supervisor side


@dataclass
class Worker:
    index: int
    channel: socket.socket
    process: subprocess.Popen[bytes]
    ready: bool = False
    status: dict[str, int] = field(default_factory=dict)  # its latest b"S" report
    config_seq: int = 0   # its latest b"C" report
    config_stream: str = ""
    reader: threading.Thread | None = field(default=None, repr=False)
    last_heard: float = field(default_factory=time.monotonic)   # its latest message of any kind
    killed_silent: bool = False


@dataclass
class HandedOver:
    """A connection a worker serves, as the supervisor counts it."""

    worker: int
    host: str
    since: float  # time.time(), as pynetdicom's ARTIM timer (admission.waiting_since)
    requested: bool = False
    ending: bool = False


class WorkerPool:
    """Starts, feeds and restarts the worker processes of one supervisor, and keeps the list of the
    connections they serve (admission.OtherConnections) from their reports."""

    def __init__(self, extra: int, instance: str, hung_after: float = 60.0) -> None:
        self.extra = extra
        self.instance = instance
        # A ready worker reports every STATUS_SECONDS from its event loop; one silent this long is
        # alive but stuck (its associations with it), so it is killed and replaced like a dead one.
        self.hung_after = hung_after
        self.silent_kills = 0
        self.workers: dict[int, Worker] = {}
        self.connections: dict[int, HandedOver] = {}
        self._next_key = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.restarts = 0
        # Called (on a reader thread) when a worker reports the configuration it applied.
        self.on_config_applied: Callable[[], object] = lambda: None

    def start(self) -> None:
        for index in range(1, self.extra + 1):
            self._spawn(index)
        threading.Thread(target=self._watch_silence, name="receiver-worker-watch", daemon=True).start()

    def _watch_silence(self) -> None:
        while not self.stopping:
            time.sleep(STATUS_SECONDS)
            now = time.monotonic()
            with self.lock:
                silent = [worker for worker in self.workers.values()
                          if worker.ready and not worker.killed_silent and now - worker.last_heard > self.hung_after]
            for worker in silent:
                log.error("receiver worker %d (pid %d) silent for %.0f s; killing it so that it is replaced",
                          worker.index, worker.process.pid, now - worker.last_heard)
                worker.killed_silent = True
                self.silent_kills += 1
                with contextlib.suppress(OSError):
                    worker.process.kill()

    def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**os.environ, CHANNEL_FD_ENV: str(theirs.fileno()), WORKERS_ENV: "1",
               PROCESSES_ENV: str(self.extra + 1),
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
                message = worker.channel.recv(4096)
            except OSError:
                message = b""
            if not message:
                break
            worker.last_heard = time.monotonic()
            if message == READY:
                worker.ready = True
            elif message[:1] == STATUS:
                worker.status = _status_counts(message[1:])
            elif message[:1] == CONFIG:
                self._config_reported(worker, message[1:])
            else:
                self._reported(message)
        worker.ready = False
        with self.lock:  # its connections died with it
            for key in [key for key, conn in self.connections.items() if conn.worker == worker.index]:
                del self.connections[key]
        worker.channel.close()
        code = worker.process.wait()
        if self.stopping:
            return
        log.error("receiver worker %d exited (code %s); starting another", worker.index, code)
        self.restarts += 1
        time.sleep(RESTART_DELAY)
        if not self.stopping:
            self._spawn(worker.index)

    def _config_reported(self, worker: Worker, raw: bytes) -> None:
        seq, _, stream = raw.decode(errors="replace").partition(" ")
        try:
            worker.config_seq, worker.config_stream = int(seq), stream
        except ValueError:
            log.error("unreadable configuration report from a receiver worker: %r", raw[:64])
            return
        self.on_config_applied()

    def applied_config_seq(self, stream: str) -> int | None:
        """The oldest CONFIG sequence of `stream` a ready worker applied (None: no worker is ready);
        a worker still on another CONFIG stream (one created anew since) has applied nothing of it.
        A worker that is not ready is given no connection; it reports before it says it is ready."""
        with self.lock:
            ready = [worker.config_seq if worker.config_stream == stream else 0
                     for worker in self.workers.values() if worker.ready]
        return min(ready, default=None)

    def _reported(self, message: bytes) -> None:
        try:
            kind, key = message[:1], int(message[1:])
        except ValueError:  # (the reader thread must survive it: it restarts the worker)
            log.error("unreadable message from a receiver worker: %r", message[:64])
            return
        with self.lock:
            if kind == ENDED:
                self.connections.pop(key, None)
            elif kind == REQUESTED and key in self.connections:
                self.connections[key].requested = True

    def route(self, client: socket.socket, address: Any, local_open: int) -> bool:
        """True when the connection went to a worker; False: the supervisor serves it (it has no
        more open connections than any ready worker)."""
        with self.lock:
            counts = {index: 0 for index, worker in self.workers.items() if worker.ready}
            for conn in self.connections.values():
                if conn.worker in counts:
                    counts[conn.worker] += 1
            best = min(counts, key=counts.__getitem__, default=None)
            if best is None or counts[best] >= local_open:
                return False
            key = self._next_key = self._next_key + 1
            order = json.dumps({"key": key, "host": address[0], "port": address[1]}).encode()
            try:
                socket.send_fds(self.workers[best].channel, [order], [client.fileno()])
            except OSError as exc:
                log.warning("could not hand a connection to worker %d: %s", best, exc)
                return False
            self.connections[key] = HandedOver(best, str(address[0]), time.time())
            return True

    # admission.OtherConnections, for the acceptor thread
    def hosts(self) -> list[str]:
        with self.lock:
            return [conn.host for conn in self.connections.values()]

    def idle(self) -> list[tuple[float, int]]:
        with self.lock:
            return [(conn.since, key) for key, conn in self.connections.items()
                    if not conn.requested and not conn.ending]

    def end(self, keys: list[int]) -> None:
        by_worker: dict[int, list[int]] = {}
        with self.lock:
            for key in keys:
                conn = self.connections.get(key)
                if conn is not None:
                    conn.ending = True
                    by_worker.setdefault(conn.worker, []).append(key)
            channels = {index: self.workers[index].channel for index in by_worker if index in self.workers}
        for index, channel in channels.items():
            with contextlib.suppress(OSError):
                channel.send(json.dumps({"end": by_worker[index]}).encode())

    def any_open(self, keys: list[int]) -> bool:
        with self.lock:
            return any(key in self.connections for key in keys)

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
            open_by_worker = {worker.index: 0 for worker in workers}
            for conn in self.connections.values():
                open_by_worker[conn.worker] = open_by_worker.get(conn.worker, 0) + 1
        return {"workers": 1 + len(workers), "workers_ready": 1 + sum(1 for w in workers if w.ready),
                "worker_restarts": self.restarts, "worker_silent_kills": self.silent_kills,
                "worker_open_connections": [open_by_worker[w.index] for w in workers]}

    def worker_counts(self) -> dict[str, int]:
        """The workers' latest status reports (open associations, journal counters), added up."""
        with self.lock:
            reports = [worker.status for worker in self.workers.values()]
        total: dict[str, int] = {}
        for report in reports:
            for name, value in report.items():
                total[name] = total.get(name, 0) + value
        return total


def _status_counts(raw: bytes) -> dict[str, int]:
    try:
        report = json.loads(raw)
    except ValueError:
        log.error("unreadable status from a receiver worker: %r", raw[:64])
        return {}
    if not isinstance(report, dict):
        return {}
    return {str(name): value for name, value in report.items() if isinstance(value, int) and not isinstance(value, bool)}


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
    reporting = asyncio.ensure_future(_report_until(scp, channel, stop))
    await stop.wait()
    await reporting
    await asyncio.to_thread(drain_associations, scp)
    await follower.stop()
    await bus.close()


async def _report_until(scp: Any, channel: socket.socket, stop: asyncio.Event) -> None:
    """Every STATUS_SECONDS: report connections gone without a close event, and this worker's
    counts for the supervisor's heartbeat."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), STATUS_SECONDS)
        server = scp.server
        if isinstance(server, HandedOverServer):
            server.reconcile()
        await asyncio.to_thread(scp.retry_tls)
        counts = {"open_associations": scp.active_associations(), **scp.memory_counts()}
        if scp.ingest.journal is not None:
            counts.update(scp.ingest.journal.details())
        with contextlib.suppress(OSError):
            channel.send(STATUS + json.dumps(counts).encode())


async def _start_worker(settings: Any, channel: socket.socket, loop: asyncio.AbstractEventLoop,
                        stop: asyncio.Event) -> tuple[Any, Any, Any]:
    from services.receiver.service import build_scp
    from shared.bus import Bus
    from shared.config.state import ConfigFollower

    bus = await Bus.connect(settings.nats_url, actor="receiver")
    scp_holder: list[Any] = []

    def applied() -> None:
        """Tell the supervisor which configuration this worker's connections get now."""
        with contextlib.suppress(OSError):
            channel.send(CONFIG + f"{follower.last_seq} {follower.stream}".encode())

    def on_config(config: Any) -> None:
        if scp_holder and scp_holder[0].server is not None:
            scp_holder[0].apply_settings(config.settings)
            applied()

    follower = ConfigFollower(bus, on_change=on_config)
    await follower.start()
    await follower.wait_ready()

    def configure(server: Any) -> None:
        server.channel = channel
        server.on_channel_closed = lambda: loop.call_soon_threadsafe(stop.set)

    scp = await build_scp(settings, bus, lambda: follower.config.settings, loop)
    scp_holder.append(scp)
    config_at = (follower.stream, follower.last_seq)
    await asyncio.to_thread(scp.start, HandedOverServer, configure)
    if (follower.stream, follower.last_seq) != config_at:
        # A change arrived while the server was being built (on_config above waits for the
        # server, start() may have read the settings before it): the server takes it now.
        scp.apply_settings(follower.config.settings)
    applied()   # (before "ready")
    return scp, follower, bus
