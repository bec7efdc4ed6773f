"""Connection admission: a bound on open connections, enforced before pynetdicom sees them.

Why: pynetdicom's server starts a thread and builds an Association (with a deep copy of every
supported presentation context, ~25 ms and ~0.4 MB with all storage classes) for each accepted TCP
connection, and counts it against `maximum_associations` until it ends. Connections that never send
an A-ASSOCIATE-RQ (a port scanner, a hung or hostile peer) live until the ACSE timeout. A flood of
1000 such connections measured 27 s of accepting, ~470 MB of RSS and 900 threads, and a real sender's
C-ECHO in the middle of it timed out. Here a connection beyond the bound is closed right after
accept, without a thread: memory and threads stay bounded and the receiver keeps serving the
associations it has. A little room above `maximum_associations` is kept so that a peer over the
association limit still gets pynetdicom's proper A-ASSOCIATE-RJ (local limit exceeded) while the
server is not flooded.

Held-open idle connections (slow-loris style: connect, never send an A-ASSOCIATE-RQ, never close)
would otherwise lock real senders out until the ACSE timeout ends each of them. A real sender sends
its A-ASSOCIATE-RQ within milliseconds of connecting, so once the open connections reach
`maximum_associations`, each new connection makes room by ending the connection that has waited
longest for its A-ASSOCIATE-RQ, if that is more than IDLE_GRACE_SECONDS: pynetdicom's own ARTIM
expiry (Evt18, close the transport) ends it within one DUL loop, and the acceptor waits for that
before admitting the new connection, so that its A-ASSOCIATE-RQ finds room under pynetdicom's own
association limit.

With several receiver processes (services/receiver/workers.py) the supervisor accepts every
connection and decides here, before handing it over, counting the connections the workers hold
(`OtherConnections`): the bounds and the per-host limit hold for the whole receiver, and idle
connections held by a worker are ended by that worker when the supervisor asks.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Protocol

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

HEADROOM = 32          # connections above maximum_associations that still reach pynetdicom
WARN_EVERY_SECONDS = 10.0
IDLE_GRACE_SECONDS = 2.0  # a connection waiting longer for its A-ASSOCIATE-RQ may be ended for a new one
EVICTION_WAIT_SECONDS = 0.5
TLS_HANDSHAKE_SECONDS = 10.0  # a real peer needs milliseconds; the connection counts as open meanwhile


def waiting_since(assoc: Any) -> float | None:
    """When an accepted connection started waiting for its A-ASSOCIATE-RQ (time.time()); None when
    it is past that (or already being ended)."""
    dul = assoc.dul
    if not assoc.is_acceptor or getattr(dul, "caduceus_evicted", False):
        return None
    # Sta2: transport open, ARTIM running until the A-ASSOCIATE-RQ arrives (PS3.8 9.2).
    since = getattr(dul.artim_timer, "_start_time", None)  # pynetdicom 3.0's Timer
    return since if dul.state_machine.current_state == "Sta2" else None


def end_idle(assoc: Any) -> None:
    """End a connection that is still waiting for its A-ASSOCIATE-RQ."""
    assoc.dul.caduceus_evicted = True
    assoc.dul.artim_timer.timeout = 0  # expired: the DUL loop raises Evt18, closes the transport


class OtherConnections(Protocol):
    """Connections of this receiver that other processes serve (services/receiver/workers.py)."""

    def hosts(self) -> list[str]:
        """The peer address of each."""

    def idle(self) -> list[tuple[float, int]]:
        """(connected since, key) of those still waiting for their A-ASSOCIATE-RQ, not being ended."""

    def end(self, keys: list[int]) -> None:
        """Ask their processes to end these idle connections."""

    def any_open(self, keys: list[int]) -> bool:
        """Whether any of these is still open."""


class BoundedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer that refuses connections beyond maximum_associations + HEADROOM
    (and, when set, beyond `per_host_limit` from one peer address).

    Open = associations alive (pynetdicom runs each in its own thread, from before negotiation
    until it ends) + accepted connections whose association is not running yet, each counted once.
    """

    # Open connections one peer address may hold (0: no such limit); set from the live settings.
    per_host_limit = 0
    # Connections that worker processes hold, counted with ours (the supervisor of workers.py).
    others: OtherConnections | None = None
    # Set when TLS is configured but its files could not be loaded: every connection is closed
    # (never served without the TLS the settings ask for) until the settings or files are fixed.
    tls_broken = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._starting: dict[int, str] = {}  # id(socket) -> peer address, until its thread returned
        self.refused_connections = 0
        self.evicted_connections = 0
        self._refused_since_warning = 0
        self._last_warning = 0.0
        super().__init__(*args, **kwargs)

    def connection_limit(self) -> int:
        return int(self.ae.maximum_associations) + HEADROOM

    def _local_hosts(self) -> list[str]:
        """The peer address of every connection this process holds."""
        with self._lock:
            starting = dict(self._starting)
        hosts = []
        for assoc in self.ae.active_associations:
            if not assoc.is_acceptor:
                continue
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            starting.pop(id(sock), None)  # already running: count it once
            hosts.append(str(assoc.requestor.address))
        return hosts + list(starting.values())

    def _open_by_host(self) -> list[str]:
        """The peer address of every open connection of the receiver."""
        others = self.others.hosts() if self.others is not None else []
        return self._local_hosts() + others

    def _make_room(self, open_now: int) -> bool:
        """End idle connections (waiting > IDLE_GRACE_SECONDS, longest waiting first, ours or the
        workers') until one more connection fits under maximum_associations, and wait (briefly)
        until they are gone; True if any was ended."""
        excess = open_now + 1 - int(self.ae.maximum_associations)
        if excess <= 0:
            return False
        idle: list[tuple[float, Any, int]] = []
        for assoc in self.ae.active_associations:
            since = waiting_since(assoc)
            if since is not None:
                idle.append((since, assoc, 0))
        if self.others is not None:
            idle.extend((since, None, key) for since, key in self.others.idle())
        cutoff = time.time() - IDLE_GRACE_SECONDS
        chosen = [item for item in sorted(idle, key=lambda item: item[0])[:excess] if item[0] <= cutoff]
        if not chosen:
            return False
        ours = [assoc for _since, assoc, _key in chosen if assoc is not None]
        theirs = [key for _since, assoc, key in chosen if assoc is None]
        for assoc in ours:
            end_idle(assoc)
        if theirs and self.others is not None:
            self.others.end(theirs)
        with self._lock:
            self.evicted_connections += len(chosen)
        # Until their threads end they count against pynetdicom's association limit, which the new
        # connection's A-ASSOCIATE-RQ is checked against. (This pauses the acceptor for one DUL loop,
        # ~50 ms, which also slows a flood down.)
        deadline = time.monotonic() + EVICTION_WAIT_SECONDS
        while time.monotonic() < deadline and (
                any(assoc.is_alive() for assoc in ours) or (self.others is not None and self.others.any_open(theirs))):
            time.sleep(0.005)
        return True

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        hosts = self._open_by_host()  # the acceptor thread is the only one adding connections
        if not (self.per_host_limit and hosts.count(host) >= self.per_host_limit):
            if self._make_room(len(hosts)):
                hosts = self._open_by_host()
            if len(hosts) < self.connection_limit():
                return True
        with self._lock:
            self.refused_connections += 1
            self._refused_since_warning += 1
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY_SECONDS:
                return False
            refused, self._refused_since_warning, self._last_warning = self._refused_since_warning, 0, now
        log.warning("connection limit reached: %d open (at most %d, %s per host), %d connection(s) closed "
                    "without an association (latest from %s)", len(hosts), self.connection_limit(),
                    self.per_host_limit or "no limit", refused, host)
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._starting[id(request)] = str(client_address[0])
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._started(request)
            raise

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept only. (pynetdicom's get_request also does the TLS handshake, on the acceptor
        thread and without a timeout: one peer that connects and sends nothing stopped the
        receiver from accepting anyone else. It happens on the connection's thread instead.)"""
        assert self.socket is not None
        return self.socket.accept()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # pynetdicom's handler creates the Association and starts its thread, then returns.
        try:
            connection = self._secured(request, client_address)
            if connection is not None:
                super().process_request_thread(connection, client_address)
        finally:
            self._started(request)

    def _secured(self, request: socket.socket, client_address: Any) -> socket.socket | None:
        """The connection, after the TLS handshake if TLS is on; None if the handshake failed."""
        if self.tls_broken:
            log.warning("connection from %s closed: TLS is configured but not usable (%s)", client_address[0],
                        self.tls_broken)
            self.shutdown_request(request)
            self.handshake_failed(client_address)
            return None
        context = self.ssl_context
        if not context:
            return request
        try:
            request.settimeout(TLS_HANDSHAKE_SECONDS)
            secured = context.wrap_socket(request, server_side=True)
            secured.settimeout(None)  # as accept() returned it: pynetdicom waits with select()
            return secured
        except (OSError, ValueError) as exc:
            hint = " (is the peer using TLS?)" if "WRONG_VERSION_NUMBER" in str(exc) or "HTTP_REQUEST" in str(exc) else ""
            log.warning("TLS handshake with %s failed: %s%s", client_address[0], exc, hint)
            self.shutdown_request(request)
            self.handshake_failed(client_address)
            return None

    def handshake_failed(self, client_address: Any) -> None:
        """A connection ended in its TLS handshake, before it became an association."""

    # Called by the StorageSCP's handlers (association threads); a worker's server reports them.
    def association_requested(self, assoc: Any) -> None:
        """The connection's A-ASSOCIATE-RQ arrived: it is no longer idle."""

    def connection_closed(self, assoc: Any) -> None:
        """The connection ended."""

    def _started(self, request: Any) -> None:
        with self._lock:
            self._starting.pop(id(request), None)
