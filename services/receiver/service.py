"""The receiver service: accepts DICOM associations, stores instances, publishes `image.received`.

pynetdicom runs each association on its own threads; `ThreadBridge` carries their publishes to
the service's asyncio loop (the one NATS connection) and waits for the JetStream ack.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import Future
from typing import Any

from services.receiver.ingest import BlobWriter, Ingest, LocalBlobWriter
from services.receiver.scp import StorageSCP
from shared.blobstore import BlobInfo, LocalBlobStore, NatsObjectBlobStore, open_blob_store
from shared.config.model import CaduceusConfig, SettingsItem
from shared.events import Event
from shared.runtime import Service

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


class ReceiverService(Service):
    name = "receiver"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scp: StorageSCP | None = None
        # How long a C-STORE waits for JetStream's ack before answering 0xA700.
        self.publish_timeout = float(os.environ.get("CADUCEUS_RECEIVER_PUBLISH_TIMEOUT", "5"))
        self.use_fastpath = os.environ.get("CADUCEUS_RECEIVER_FASTPATH", "1") != "0"

    async def setup(self) -> None:
        bridge = ThreadBridge(asyncio.get_running_loop())
        store = open_blob_store(self.settings.blob_store, self.settings.data_dir, self.bus.js)
        writer: BlobWriter
        if isinstance(store, LocalBlobStore):
            # Measurement switch only (docs/performance.md): without fsync an acknowledged image
            # can be lost in a power cut.
            store.fsync = os.environ.get("CADUCEUS_RECEIVER_FSYNC", "1") != "0"
            writer = LocalBlobWriter(store)
        else:
            assert isinstance(store, NatsObjectBlobStore)
            writer = AsyncBlobWriter(store, bridge)

        def publish(event: Event, timeout: float) -> int:
            # retries=0: the sender's own retry after 0xA700 is the retry; the C-STORE must not hang.
            return bridge.run(self.bus.publish(event, timeout=timeout, retries=0), timeout + 1)  # type: ignore[no-any-return]

        def publish_later(event: Event) -> None:
            future = bridge.submit(self.bus.publish(event, timeout=self.publish_timeout, retries=2))
            future.add_done_callback(_log_failure(event))

        ingest = Ingest(writer, publish, self._settings, publish_timeout=self.publish_timeout)
        self.scp = StorageSCP(ingest, self._settings, publish_later, self.settings.dicom_host,
                              self.settings.dicom_port, use_fastpath=self.use_fastpath)
        port = await asyncio.to_thread(self.scp.start)
        log.info("DICOM storage SCP listening", extra={"data": {
            "host": self.settings.dicom_host, "port": port, "ae_title": self._settings().ae_title}})

    def _settings(self) -> SettingsItem:
        return self.config.settings

    def on_config(self, config: CaduceusConfig) -> None:
        if self.scp is not None:
            self.scp.apply_settings(config.settings)

    async def teardown(self) -> None:
        if self.scp is not None:
            await asyncio.to_thread(self._drain_associations)

    def _drain_associations(self, grace: float = 15.0) -> None:
        """SIGTERM: stop accepting; give open associations a moment to finish, then abort them."""
        import time

        scp = self.scp
        assert scp is not None
        server = scp.server
        if server is None:
            return
        server.ae.maximum_associations = 0  # new requests are rejected (local limit exceeded)
        deadline = time.monotonic() + grace
        while scp.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        scp.stop()

    def health_details(self) -> dict[str, Any]:
        details = dict(self.counters)
        if self.scp is not None:
            details["open_associations"] = self.scp.active_associations()
        return details


def _log_failure(event: Event) -> Any:
    def done(future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("could not publish %s: %s", event.type, exc)
    return done
