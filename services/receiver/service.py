"""The receiver service: accepts DICOM associations, stores instances, publishes `image.received`.

pynetdicom runs each association on its own threads; `ThreadBridge` carries their publishes to
the service's asyncio loop (the one NATS connection) and waits for the JetStream ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from services.receiver.applier import DecideAgain, JournalApplier, Placing, PublishBatch, PutFile
from services.receiver.ingest import BlobWriter, Ingest, LocalBlobWriter
from services.receiver.journal import MEMORY_BYTES, Journal, JournalError, slot_directory
from services.receiver.receipt import Duplicate, Receipt, decide_again, duplicate_of
from services.receiver.scp import TLS_RETRY_SECONDS, StorageSCP
from services.receiver.workers import RoutingServer, WorkerPool, process_count, worker_count
from shared.blobstore import BlobInfo, LocalBlobStore, NatsObjectBlobStore, open_blob_store
from shared.bus import Bus, ThreadPublisher
from shared.config.model import CaduceusConfig, SettingsItem
from shared.events import AlertRaised, Event, make_event
from shared.runtime import Service
from shared.settings import Settings

log = logging.getLogger(__name__)

# How often the receiver removes temp files older than an hour from a local blob store (sweep_stale_temp).
TEMP_SWEEP_SECONDS = 600.0


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
                    loop: asyncio.AbstractEventLoop) -> StorageSCP:
    """The storage SCP with its Ingest, publishing through `bus` on `loop` (supervisor and workers)."""
    bridge = ThreadBridge(loop)
    publisher = ThreadPublisher(bus, loop)
    await publisher.start()
    publish_timeout = settings.receiver_publish_timeout
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

    applier = None
    if settings.receiver_journal_max_kb > 0:
        slot = settings.receiver_journal_slot
        decide = replay_decider(settings_item, writer)
        applier = open_journal(settings, slot, writer, publisher.publish_batch, publish_timeout, decide)
        if slot == "main":  # the supervisor (workers have w1, w2, ...)
            used = {slot, *(f"w{index}" for index in range(1, worker_count()))}
            await asyncio.to_thread(adopt_orphan_journals, settings, used, writer, publisher.publish_batch,
                                    publish_timeout, decide)
    # No retries: the sender's own retry after 0xA700 is the retry; the C-STORE must not hang.
    ingest = Ingest(writer, publisher.publish, settings_item, publish_timeout=publish_timeout,
                    journal=applier, journal_max_bytes=settings.receiver_journal_max_kb * 1024)
    return StorageSCP(ingest, settings_item, publish_later, settings.dicom_host, settings.dicom_port,
                      use_fastpath=use_fastpath)


def open_journal(settings: Settings, slot: str, writer: BlobWriter, publish: PublishBatch,
                 publish_timeout: float, decider: DecideAgain) -> JournalApplier:
    """The write-ahead journal of this process and its applier thread, started; records a previous
    process left unapplied are queued first (services/receiver/journal.py)."""
    journal = Journal(slot_directory(settings.data_dir, slot),
                      segment_bytes=settings.receiver_journal_segment_mb * 1024 * 1024,
                      max_bytes=settings.receiver_journal_mb * 1024 * 1024,
                      memory_bytes=MEMORY_BYTES // process_count())
    replayed = journal.open()
    store = writer.store if isinstance(writer, LocalBlobWriter) else None
    applier = JournalApplier(journal, _file_putter(writer), publish, store, decider, publish_timeout)
    applier.adopt(replayed)
    applier.start()
    return applier


def replay_decider(settings_item: Callable[[], SettingsItem], writer: BlobWriter) -> DecideAgain:
    """How the applier builds the event of an instance a previous process journaled (receipt.py)."""
    def compare(key: str, data: bytes) -> Duplicate:
        if isinstance(writer, LocalBlobWriter):  # (sizes first: the stored copy may be GBs)
            return writer.duplicate_of(writer.store.path(key), data)
        return duplicate_of(writer.read(key), data)

    def decide(receipt: Receipt, data: bytes, sha256: str, verdict: Duplicate | None) -> tuple[Event, bool] | None:
        return decide_again(receipt, data, sha256, verdict, settings_item().extract_tags, compare)

    return decide


def _file_putter(writer: BlobWriter) -> PutFile:
    """How the applier writes a journaled instance's blob: on a local store without the fsyncs
    (its syncfs before each checkpoint covers them), only over an older copy (services/receiver/
    placing.py: what a replay finds there, or another process's copy); elsewhere not again if it is
    already there (replay)."""
    def put_local(key: str, data: bytes, replayed: bool, placing: Placing | None) -> Duplicate:
        assert isinstance(writer, LocalBlobWriter)
        path = writer.store.path(key)
        if placing is None:
            writer.put(key, data)
            return "new"
        duplicate, write = writer.place_bytes(path, data, placing.stamp, lambda: placing.sha256,
                                              first=placing.first)
        if write is not None:
            write.close()
        return duplicate

    def put_other(key: str, data: bytes, replayed: bool, placing: Placing | None) -> Duplicate:
        if replayed and writer.read(key) == data:
            return "identical"
        writer.put(key, data)
        return "new"

    return put_local if isinstance(writer, LocalBlobWriter) else put_other


def adopt_orphan_journals(settings: Settings, used_slots: set[str], writer: BlobWriter, publish: PublishBatch,
                          publish_timeout: float, decider: DecideAgain, timeout: float = 60.0) -> None:
    """Apply the journals of receiver processes that no longer exist (fewer workers than before)."""
    root = slot_directory(settings.data_dir, "main").parent
    if not root.is_dir():
        return
    for directory in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in used_slots):
        try:
            applier = open_journal(settings, directory.name, writer, publish, publish_timeout, decider)
        except JournalError as exc:
            log.warning("journal %s not adopted: %s", directory, exc)
            continue
        done = applier.wait_idle(timeout)
        stopped = applier.stop()
        if stopped:
            applier.journal.close()
        if done and stopped:
            shutil.rmtree(directory, ignore_errors=True)
            log.info("applied and removed the journal of a former receiver process: %s", directory)
        else:
            log.warning("the journal of a former receiver process is not fully applied yet: %s", directory)


async def sweep_stale_temp(store: LocalBlobStore, stopping: asyncio.Event,
                           interval: float = TEMP_SWEEP_SECONDS) -> None:
    """Every `interval`, remove the blob store's temp files older than an hour, as at start.

    Why not only at start: a receiver process killed mid-write (an instance staged in a temp file,
    a spool that was not given an unnamed file, services/receiver/spool.py) is restarted at once,
    when its temp file is seconds old, and the next start may be weeks away; its space would be
    held until then.
    """
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), interval)
        if stopping.is_set():
            return
        try:
            removed = await asyncio.to_thread(store.remove_stale_temp)
        except OSError as exc:
            log.warning("could not clean the blob store's temp directory: %s", exc)
            continue
        if removed:
            log.info("removed %d unfinished temp file(s) older than an hour from the blob store", removed)


def drain_associations(scp: StorageSCP, grace: float = 15.0) -> None:
    """SIGTERM: stop accepting; give open associations a moment to finish, then abort them; then
    let the journal applier catch up (what it cannot publish stays in the journal)."""
    server = scp.server
    if server is not None:
        server.ae.maximum_associations = 0  # new requests are rejected (local limit exceeded)
        deadline = time.monotonic() + grace
        while scp.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        scp.stop()
    applier = scp.ingest.journal
    if applier is not None and applier.stop():
        applier.journal.close()  # (a thread still running keeps it open; the process exits anyway)


class ReceiverService(Service):
    name = "receiver"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scp: StorageSCP | None = None
        self.pool: WorkerPool | None = None

    async def setup(self) -> None:
        workers = worker_count()
        if workers > 1:
            self.pool = WorkerPool(workers - 1, self.instance, self.settings.receiver_worker_hung_seconds)
        pool = self.pool
        self.scp = await build_scp(self.settings, self.bus, self._settings, asyncio.get_running_loop())
        config_at = (self.config_follower.stream, self.config_follower.last_seq)
        if pool is not None:
            loop = asyncio.get_running_loop()
            # A worker that applied a configuration change: its sequence counts in our heartbeat.
            pool.on_config_applied = lambda: loop.call_soon_threadsafe(self.beat_soon)
            port = await asyncio.to_thread(self.scp.start, RoutingServer, lambda server: server.attach(pool))
            pool.start()
        else:
            port = await asyncio.to_thread(self.scp.start)
        if (self.config_follower.stream, self.config_follower.last_seq) != config_at:
            # A change arrived while the server was being built (on_config found no server to apply
            # it to, start() may have read the settings before it): the server takes it now.
            self.scp.apply_settings(self.config.settings)
        log.info("DICOM storage SCP listening", extra={"data": {
            "host": self.settings.dicom_host, "port": port, "ae_title": self._settings().ae_title,
            "processes": workers}})
        self.spawn(self._watch_tls(port))
        writer = self.scp.ingest.writer
        if isinstance(writer, LocalBlobWriter):  # (the workers share the store: the supervisor sweeps it)
            self.spawn(sweep_stale_temp(writer.store, self.stopping))

    async def _watch_tls(self, port: int) -> None:
        """Retry TLS files that failed to load, and raise an alert each time the reason changes."""
        reported = ""
        while not self.stopping.is_set():
            scp = self.scp
            if scp is not None:
                await asyncio.to_thread(scp.retry_tls)
                if scp.tls_error and scp.tls_error != reported:
                    await self._publish_quietly(make_event("alert.raised", self.name, AlertRaised(
                        severity="error", source=self.name,
                        message=f"DICOM port {port}: TLS is configured but not in force: {scp.tls_error}. "
                                "Fix the file or settings.tls_*; it is tried again every "
                                f"{TLS_RETRY_SECONDS:.0f} s")))
                reported = scp.tls_error
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), TLS_RETRY_SECONDS)

    async def _publish_quietly(self, event: Event) -> None:
        try:
            await self.bus.publish(event)
        except Exception as exc:  # noqa: BLE001 - the log line and the heartbeat still say it
            log.warning("could not publish %s: %s", event.type, exc)

    def _settings(self) -> SettingsItem:
        return self.config.settings

    def on_config(self, config: CaduceusConfig) -> None:
        # The association threads read the settings live (self._settings) or from the server's
        # attributes set here, for the next association: in use once this returns.
        if self.scp is not None:
            self.scp.apply_settings(config.settings)

    def applied_config_seq(self) -> int:
        """Ours, or the oldest a ready worker process reports: connections go to either."""
        workers = self.pool.applied_config_seq(self.config_stream) if self.pool is not None else None
        return self.config_seq if workers is None else min(self.config_seq, workers)

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
            if self.scp.tls_error:
                details["tls_error"] = self.scp.tls_error
            details.update(self.scp.admission_counts())
            details.update(self.scp.memory_counts())
        if self.scp is not None and self.scp.ingest.journal is not None:
            details.update(self.scp.ingest.journal.details())
        if self.pool is not None:
            details.update(self.pool.details())
            # The whole receiver: the workers' associations and journals count with ours.
            for name, value in self.pool.worker_counts().items():
                if isinstance(details.get(name, 0), int):
                    details[name] = details.get(name, 0) + value
        return details


def _log_failure(event: Event) -> Any:
    def done(future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("could not publish %s: %s", event.type, exc)
    return done
