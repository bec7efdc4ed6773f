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
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

HEADROOM = 32          # connections above maximum_associations that still reach pynetdicom
WARN_EVERY_SECONDS = 10.0


class BoundedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer that refuses connections beyond maximum_associations + HEADROOM.

    Open = associations alive (pynetdicom runs each in its own thread, from before negotiation
    until it ends) + connections accepted whose association is still being created.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._starting = 0
        self.refused_connections = 0
        self._refused_since_warning = 0
        self._last_warning = 0.0
        super().__init__(*args, **kwargs)

    def connection_limit(self) -> int:
        return int(self.ae.maximum_associations) + HEADROOM

    def open_connections(self) -> int:
        return self._starting + len(self.ae.active_associations)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        open_now = self.open_connections()  # the acceptor thread is the only one adding connections
        if open_now < self.connection_limit():
            return True
        with self._lock:
            self.refused_connections += 1
            self._refused_since_warning += 1
            now = time.monotonic()
            if now - self._last_warning < WARN_EVERY_SECONDS:
                return False
            refused, self._refused_since_warning, self._last_warning = self._refused_since_warning, 0, now
        log.warning("connection limit reached: %d open, %d connection(s) closed without an association "
                    "(latest from %s)", open_now, refused, client_address[0])
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._starting += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._started()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # pynetdicom's handler creates the Association and starts its thread, then returns.
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._started()

    def _started(self) -> None:
        with self._lock:
            self._starting -= 1
