"""The receiver service: accepts DICOM associations, stores instances, publishes `image.received`.

pynetdicom runs each association on its own threads; `ThreadBridge` carries their publishes to
the service's asyncio loop (the one NATS connection) and waits for the JetStream ack.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from services.receiver.ingest import BlobWriter, Ingest, LocalBlobWriter
from services.receiver.scp import StorageSCP
from services.receiver.workers import RoutingServer, WorkerPool, worker_count
from shared.blobstore import BlobInfo, LocalBlobStore, NatsObjectBlobStore, open_blob_store
from shared.bus import Bus, ThreadPublisher
from shared.config.model import CaduceusConfig, SettingsItem
from shared.events import Event
from shared.runtime import Service
from shared.settings import Settings

log = logging.getLogger(__name__)


class ThreadBridge:
    """Run coroutines on the service loop from pynetdicom's threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class AsyncBlobWriter:
    """Blob writes for stores that are async only (the NATS object store)."""

    def __init__(self, store: NatsObjectBlobStore, bridge: ThreadBridge, timeout: float = 60.0) -> None:
        self.store = store
        self.bridge = bridge
        self.timeout = timeout

    def put(self, key: str, data: bytes) -> BlobInfo:
        return self.bridge.run(self.store.put(key, data), self.timeout)  # type: ignore[no-any-return]

    def read(self, key: str) -> bytes | None:
        if not self.bridge.run(self.store.exists(key), self.timeout):
            return None
        return self.bridge.run(self.store.get(key), self.timeout)  # type: ignore[no-any-return]

    def free_bytes(self) -> int | None:
        return None


async def build_scp(settings: Settings, bus: Bus, settings_item: Callable[[], SettingsItem],
                    loop: asyncio.AbstractEventLoop, on_conn_close: Callable[[], None] | None = None) -> StorageSCP:
    """The storage SCP with its Ingest, publishing through `bus` on `loop` (supervisor and workers)."""
    bridge = ThreadBridge(loop)
    publisher = ThreadPublisher(bus, loop)
    await publisher.start()
    publish_timeout = float(os.environ.get("CADUCEUS_RECEIVER_PUBLISH_TIMEOUT", "5"))
    use_fastpath = os.environ.get("CADUCEUS_RECEIVER_FASTPATH", "1") != "0"
    store = open_blob_store(settings.blob_store, settings.data_dir, bus.js)
    writer: BlobWriter
    if isinstance(store, LocalBlobStore):
        # Measurement switch only (docs/performance.md): without fsync an acknowledged image
        # can be lost in a power cut.
        store.fsync = os.environ.get("CADUCEUS_RECEIVER_FSYNC", "1") != "0"
        removed = store.remove_stale_temp()
        if removed:
            log.info("removed %d unfinished temp file(s) older than an hour from the blob store", removed)
        writer = LocalBlobWriter(store)
    else:
        assert isinstance(store, NatsObjectBlobStore)
        writer = AsyncBlobWriter(store, bridge)

    def publish_later(event: Event) -> None:
        future = bridge.submit(bus.publish(event, timeout=publish_timeout, retries=2))
        future.add_done_callback(_log_failure(event))

    # No retries: the sender's own retry after 0xA700 is the retry; the C-STORE must not hang.
    ingest = Ingest(writer, publisher.publish, settings_item, publish_timeout=publish_timeout)
    return StorageSCP(ingest, settings_item, publish_later, settings.dicom_host, settings.dicom_port,
                      use_fastpath=use_fastpath, on_conn_close=on_conn_close)


def drain_associations(scp: StorageSCP, grace: float = 15.0) -> None:
    """SIGTERM: stop accepting; give open associations a moment to finish, then abort them."""
    server = scp.server
    if server is None:
        return
    server.ae.maximum_associations = 0  # new requests are rejected (local limit exceeded)
    deadline = time.monotonic() + grace
    while scp.active_associations() and time.monotonic() < deadline:
        time.sleep(0.1)
    scp.stop()


class ReceiverService(Service):
    name = "receiver"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scp: StorageSCP | None = None
        self.pool: WorkerPool | None = None

    async def setup(self) -> None:
        workers = worker_count()
        if workers > 1:
            self.pool = WorkerPool(workers - 1, self.instance)
        pool = self.pool
        self.scp = await build_scp(self.settings, self.bus, self._settings, asyncio.get_running_loop(),
                             on_conn_close=pool.local_closed if pool else None)
        if pool is not None:
            port = await asyncio.to_thread(self.scp.start, RoutingServer,
                                           lambda server: setattr(server, "router", pool.route))
            pool.start()
        else:
            port = await asyncio.to_thread(self.scp.start)
        log.info("DICOM storage SCP listening", extra={"data": {
            "host": self.settings.dicom_host, "port": port, "ae_title": self._settings().ae_title,
            "processes": workers}})

    def _settings(self) -> SettingsItem:
        return self.config.settings

    def on_config(self, config: CaduceusConfig) -> None:
        if self.scp is not None:
            self.scp.apply_settings(config.settings)

    async def teardown(self) -> None:
        jobs = []
        if self.pool is not None:
            jobs.append(asyncio.to_thread(self.pool.stop))
        if self.scp is not None:
            jobs.append(asyncio.to_thread(drain_associations, self.scp))
        await asyncio.gather(*jobs)

    def health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = dict(self.counters)
        if self.scp is not None:
            details["open_associations"] = self.scp.active_associations()
            details.update(self.scp.admission_counts())
        if self.pool is not None:
            details.update(self.pool.details())
        return details


def _log_failure(event: Event) -> Any:
    def done(future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("could not publish %s: %s", event.type, exc)
    return done
