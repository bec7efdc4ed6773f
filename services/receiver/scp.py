"""The DICOM side: a pynetdicom Storage + Verification SCP wired to `Ingest`.

Association policy (calling/called AE, allowed hosts) is checked on EVT_REQUESTED against the live
configuration, so a change applies to the next association; rejections use the DICOM reasons
(calling AE title not recognised = 3, called AE title not recognised = 7, otherwise "no reason").
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event as DicomEvent
from pynetdicom.presentation import PresentationContext, VerificationPresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from services.receiver import direct, fastpath, part10, timing
from services.receiver.admission import BoundedServer
from services.receiver.ingest import STATUS_OUT_OF_RESOURCES, AssociationInfo, Ingest, LocalBlobWriter
from services.receiver.memory import IdleTrim
from services.receiver.spool import Claim, DimseSink, HeldData, Spool, Spooler, watch_dimse
from services.receiver.timing import PhaseTimer
from shared.config.model import SettingsItem
from shared.events import (
    AssociationAccepted,
    AssociationEnded,
    AssociationRejected,
    Event,
    make_event,
)

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 512
TLS_RETRY_SECONDS = 10.0  # how often TLS files that failed to load are tried again

# Storage: pynetdicom's unrestricted storage negotiation (build_ae) accepts every storage-like
# context (a storage SOP class, a private or an unknown one) with the first transfer syntax the
# sender proposes (after prefer_explicit_little_endian), never transcoded, without consulting the
# supported contexts. This list is what the Verification context accepts.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",          # implicit VR little endian
    "1.2.840.10008.1.2.1",        # explicit VR little endian
    "1.2.840.10008.1.2.2",        # explicit VR big endian (retired, still sent)
    "1.2.840.10008.1.2.1.99",     # deflated explicit VR little endian
    "1.2.840.10008.1.2.4.50",     # JPEG baseline
    "1.2.840.10008.1.2.4.51",     # JPEG extended
    "1.2.840.10008.1.2.4.57",     # JPEG lossless
    "1.2.840.10008.1.2.4.70",     # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",     # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",     # JPEG-LS near lossless
    "1.2.840.10008.1.2.4.90",     # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",     # JPEG 2000
    "1.2.840.10008.1.2.4.201",    # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",    # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",    # HTJ2K
    "1.2.840.10008.1.2.5",        # RLE lossless
    "1.2.840.10008.1.2.4.100",    # MPEG2
    "1.2.840.10008.1.2.4.102",    # MPEG-4
    "1.2.840.10008.1.2.4.106",    # MPEG-4 stereo
    "1.2.840.10008.1.2.4.107",    # HEVC
]

REJECT_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
DIAG_NO_REASON = 0x01
DIAG_CALLING_AE = 0x03
DIAG_CALLED_AE = 0x07


@dataclass(frozen=True)
class Refusal:
    diagnostic: int
    reason: str


def check_association(settings: SettingsItem, calling_aet: str, called_aet: str, peer_host: str) -> Refusal | None:
    """The association policy; None means accept."""
    if settings.allowed_hosts and not _host_allowed(peer_host, settings.allowed_hosts):
        return Refusal(DIAG_NO_REASON, f"host {peer_host} is not in allowed_hosts")
    allowed = {a.strip() for a in settings.allowed_calling_aets}
    if allowed and calling_aet.strip() not in allowed:
        return Refusal(DIAG_CALLING_AE, f"calling AE title {calling_aet!r} is not in allowed_calling_aets")
    if settings.require_called_aet and called_aet.strip() != settings.ae_title.strip():
        return Refusal(DIAG_CALLED_AE, f"called AE title {called_aet!r} is not {settings.ae_title!r}")
    return None


def _host_allowed(host: str, allowed: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry.strip(), strict=False):
                return True
        except ValueError:
            log.warning("ignoring invalid allowed_hosts entry %r", entry)
    return False


def direct_enabled() -> bool:
    """`CADUCEUS_RECEIVER_DIRECT=0` keeps C-STORE on pynetdicom's own path (measurements, comparisons)."""
    return os.environ.get("CADUCEUS_RECEIVER_DIRECT", "1") != "0"


class TlsSetupError(Exception):
    """The TLS files of the settings cannot be loaded; the message names the file and the reason."""


def prefer_explicit_little_endian(contexts: list[PresentationContext]) -> None:
    """Put Explicit VR Little Endian first in each proposed context that offers it.

    pynetdicom accepts a storage context with the first syntax it lists. A sender that lists
    several in one context can send any of them; DCMTK's storescp and Orthanc then take Explicit VR
    Little Endian, which keeps private elements' VRs (Implicit VR loses them for every later hop)
    and does not ask the sender to compress what it may be unable to (storescu -xs failed so). A
    context without it keeps the sender's order: a compressed file offered alone stays as it is.
    """
    for context in contexts:
        syntaxes = list(context.transfer_syntax)
        if len(syntaxes) > 1 and syntaxes[0] != ExplicitVRLittleEndian and ExplicitVRLittleEndian in syntaxes:
            syntaxes.remove(ExplicitVRLittleEndian)
            context.transfer_syntax = [ExplicitVRLittleEndian, *syntaxes]


def ssl_context_for(settings: SettingsItem) -> ssl.SSLContext | None:
    if not settings.tls_certificate:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    key_note = f" with key {settings.tls_key}" if settings.tls_key else ""
    try:
        context.load_cert_chain(settings.tls_certificate, settings.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"settings.tls_certificate {settings.tls_certificate}{key_note}: "
                            f"{_reason(exc)}") from exc
    if settings.tls_ca:
        # A CA configured means: only peers with a certificate it signed may connect.
        try:
            context.load_verify_locations(settings.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"settings.tls_ca {settings.tls_ca}: {_reason(exc)}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


class StorageSCP:
    def __init__(self, ingest: Ingest, settings: Callable[[], SettingsItem],
                 publish_later: Callable[[Event], None], host: str, port: int,
                 use_fastpath: bool = True) -> None:
        self.ingest = ingest
        self.settings = settings
        self.publish_later = publish_later
        self.host = host
        self.port = port
        self.use_fastpath = use_fastpath
        self.server: ThreadedAssociationServer | None = None
        self._tls_key: tuple[str, str, str] = ("", "", "")
        self._lock = threading.Lock()
        self.open_associations = 0
        self.associations_accepted = 0   # ever, in this process
        self.idle_trim: IdleTrim | None = None
        self.tls_error = ""  # why the configured TLS is not in force (connections closed, or old TLS kept)
        self._tls_tried = 0.0
        # Data sets that outgrow memory go to spool files of a local store (services/receiver/spool.py).
        self.spooler = Spooler(ingest.writer.store if isinstance(ingest.writer, LocalBlobWriter) else None,
                               settings)

    # ------------------------------------------------------------ lifecycle

    def build_ae(self, settings: SettingsItem) -> AE:
        # Any storage-like SOP class (including private and unknown ones) is accepted as storage.
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        # pynetdicom's own event logging formats every DIMSE message (~0.2 ms per image) even when
        # nothing is logged; the receiver logs associations and failures itself.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = 200
        ae.maximum_pdu_size = settings.max_pdu
        ae.network_timeout = 120
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        # Only Verification is listed: storage contexts are negotiated without the list (see
        # TRANSFER_SYNTAXES), and pynetdicom deep-copies the supported contexts for every
        # connection (with all ~150 storage classes: ~25 ms and ~0.9 MB each, which made a burst
        # of connections queue for seconds behind the acceptor).
        for context in VerificationPresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        return ae

    def start(self, server_class: type[ThreadedAssociationServer] = BoundedServer,
              configure: Callable[[Any], None] | None = None) -> int:
        """Start accepting (on a thread). `server_class`/`configure`: see services/receiver/workers.py."""
        settings = self.settings()
        ae = self.build_ae(settings)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self._tls_key = (settings.tls_certificate, settings.tls_key, settings.tls_ca)
        try:
            context = ssl_context_for(settings)
        except TlsSetupError as exc:
            if not issubclass(server_class, BoundedServer):
                raise
            # Listening and refusing keeps the process up (no restart loop) and its heartbeat
            # saying why; a corrected file or setting takes effect without a restart.
            context = None
            self.tls_error = str(exc)
            log.error("TLS is configured but cannot be set up; every connection is closed until it is "
                      "fixed: %s", exc)
        server = ae.make_server((self.host, self.port), evt_handlers=handlers,  # type: ignore[arg-type]
                                ssl_context=context, server_class=server_class)
        if isinstance(server, BoundedServer):
            server.tls_broken = self.tls_error
        # socketserver listens with a backlog of 5: a burst of senders (a PACS pushing a worklist's
        # studies at once) would see connect timeouts; re-listening on Linux raises it in place.
        assert server.socket is not None
        server.socket.listen(LISTEN_BACKLOG)
        if isinstance(server, BoundedServer):
            server.per_host_limit = settings.max_connections_per_host
        if configure is not None:
            configure(server)
        # As AE.start_server(block=False) does, with our server class.
        threading.Thread(target=server.serve_forever, name="dicom-acceptor", daemon=True).start()
        ae._servers.append(server)
        self.server = server
        self.port = int(server.server_address[1])
        self.idle_trim = IdleTrim(lambda: self.associations_accepted, self._busy).start()
        return self.port

    def _busy(self) -> bool:
        """An association is open, or the journal has instances still to apply."""
        applier = self.ingest.journal
        return self.open_associations > 0 or (
            applier is not None and applier.journal.stats()["journal_unapplied"] > 0)

    def retry_tls(self) -> None:
        """Load the TLS files again while they fail, so that a fixed file takes effect without a restart."""
        now = time.monotonic()
        if self.tls_error and now - self._tls_tried >= TLS_RETRY_SECONDS:
            self._tls_tried = now
            self.apply_settings(self.settings())

    def apply_settings(self, settings: SettingsItem) -> None:
        """Live configuration: AE title, max PDU and TLS apply to the next association."""
        server = self.server
        if server is None:
            return
        server.ae_title = settings.ae_title
        server.ae.maximum_pdu_size = settings.max_pdu
        if isinstance(server, BoundedServer):
            server.per_host_limit = settings.max_connections_per_host
        tls_key = (settings.tls_certificate, settings.tls_key, settings.tls_ca)
        if tls_key != self._tls_key or self.tls_error:
            try:
                server.ssl_context = ssl_context_for(settings)
            except TlsSetupError as exc:
                kept = "every connection is still closed" if isinstance(server, BoundedServer) \
                    and server.tls_broken else "keeping the previous ones"
                error = f"{exc} ({kept})"
                if error != self.tls_error:  # retried every few seconds: say it once
                    log.error("TLS settings not applied, %s: %s", kept, exc)
                self.tls_error = error
                return
            self._tls_key = tls_key
            self.tls_error = ""
            if isinstance(server, BoundedServer):
                server.tls_broken = ""
            log.info("TLS settings changed: %s", "enabled" if settings.tls_certificate else "disabled")

    def stop(self) -> None:
        """Stop accepting, then abort what is still open (senders retry unacknowledged instances)."""
        server = self.server
        if server is None:
            return
        self.server = None
        if self.idle_trim is not None:
            self.idle_trim.stop()
        server.shutdown()
        for assoc in list(server.ae.active_associations):
            assoc.abort()

    def admission_counts(self) -> dict[str, int]:
        """Connections closed at accept because the connection limit was reached, and idle ones
        (no A-ASSOCIATE-RQ after 2 s) ended to make room for new ones (admission.py)."""
        server = self.server
        return {"connections_refused": int(getattr(server, "refused_connections", 0)),
                "connections_evicted": int(getattr(server, "evicted_connections", 0))}

    def memory_counts(self) -> dict[str, int]:
        """How often this process gave free memory back after a burst (memory.py)."""
        return {"memory_releases": self.idle_trim.releases if self.idle_trim is not None else 0}

    def active_associations(self) -> int:
        server = self.server
        if server is None:
            return 0
        # Connections still negotiating (or port probes) do not hold instances; only count the rest.
        return sum(1 for assoc in server.ae.active_associations if assoc.is_established)

    # ------------------------------------------------------------ handlers (association threads)

    def _on_conn_open(self, event: DicomEvent) -> None:
        assoc: Any = event.assoc
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        if sock is not None:
            # Without it, the last segment of each response waits for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc.acceptor.maximum_length = self.settings().max_pdu
        assoc.caduceus_claims = set()  # its data sets' shares of the memory budget (spool.Claim)
        watch_dimse(assoc, self.spooler, assoc.caduceus_claims, lambda spool: self._receiving(assoc, spool))
        if self.use_fastpath:
            fastpath.install(assoc)
            if direct_enabled():
                direct.install(assoc, self._direct_accept, self._direct_store, large=self)

    def _on_requested(self, event: DicomEvent) -> None:
        assoc: Any = event.assoc
        server = self.server
        if isinstance(server, BoundedServer):
            server.association_requested(assoc)  # a worker tells the supervisor (workers.py)
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        peer_host = str(assoc.requestor.address)
        refusal = check_association(self.settings(), calling, called, peer_host)
        if refusal is None:
            prefer_explicit_little_endian(request.presentation_context_definition_list)
            return
        log.warning("association rejected: %s (from %s, %s)", refusal.reason, peer_host, calling)
        assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, refusal.diagnostic)
        # As pynetdicom does for its own rejections: wait until the A-ASSOCIATE-RJ is out and the
        # peer closed, otherwise the server shuts the socket first and the peer sees an abort.
        assoc.kill()
        self.publish_later(make_event("association.rejected", "receiver", AssociationRejected(
            calling_aet=calling, called_aet=called, peer_host=peer_host, reason=refusal.reason)))

    def _on_accepted(self, event: DicomEvent) -> None:
        assoc: Any = event.assoc
        info = AssociationInfo(
            association_id=uuid.uuid4().hex, calling_aet=str(assoc.requestor.ae_title).strip(),
            called_aet=str(assoc.requestor.primitive.called_ae_title).strip(),
            peer_host=str(assoc.requestor.address), peer_port=int(assoc.requestor.port),
            timer=PhaseTimer() if timing.enabled() else None)
        assoc.caduceus_info = info
        with self._lock:
            self.open_associations += 1
            self.associations_accepted += 1
        self.publish_later(make_event("association.accepted", "receiver", AssociationAccepted(
            association_id=info.association_id, calling_aet=info.calling_aet, called_aet=info.called_aet,
            peer_host=info.peer_host, peer_port=info.peer_port)))

    def _on_echo(self, event: DicomEvent) -> int:
        return 0x0000

    def _on_store(self, event: DicomEvent) -> int | Dataset:
        info: AssociationInfo = event.assoc.caduceus_info  # type: ignore[attr-defined]
        timer = info.timer
        mark = timer.start_image() if timer else 0
        try:
            status = self._store(event, info, mark)
        finally:
            if timer:
                timer.end_image()
        comment = info.take_error_comment(status)
        if not comment:
            return status
        response = Dataset()  # pynetdicom sends the Error Comment with the failure status
        response.Status = status
        response.ErrorComment = direct.error_comment_text(comment)
        return response

    # The direct path (services/receiver/direct.py, on the DUL thread) for plain C-STORE requests.
    def _direct_accept(self, assoc: Any, request: direct.StoreRequest) -> bool:
        if getattr(assoc, "caduceus_info", None) is None:
            return False  # EVT_ACCEPTED not handled yet: pynetdicom's path queues it until then
        # store_request() checked the SOP UIDs the way part10.file_meta() does; odd UIDs go to
        # pynetdicom's path, which builds the File Meta through pydicom.
        return part10.plain_uid(request.transfer_syntax_uid)

    def _direct_store(self, assoc: Any, request: direct.StoreRequest,
                      fragments: list[memoryview] | direct.Sink) -> tuple[int, str]:
        info: AssociationInfo = assoc.caduceus_info
        timer = info.timer
        mark = timer.start_image() if timer else 0
        try:
            if not isinstance(fragments, list):  # a large data set, in its spool (watch_at, outgrown)
                assert isinstance(fragments, Spool)
                status = self._store_spooled(assoc, info, fragments, request.transfer_syntax_uid,
                                             request.sop_instance_uid, mark)
            else:
                data = b"".join((part10.PREAMBLE, part10.file_meta(
                    request.sop_class_uid, request.sop_instance_uid, request.transfer_syntax_uid), *fragments))
                fragments.clear()  # (the last references to the received PDUs: the data set is held once)
                if timer:
                    mark = timer.mark("encode", mark)
                status = self.ingest.store(info, data, request.transfer_syntax_uid, request.sop_instance_uid,
                                           mark=mark)
        except Exception:  # a bug here must not turn into a success, nor lose the sender's copy
            log.exception("unexpected error while storing an instance",
                          extra={"sop_uid": request.sop_instance_uid, "association_id": info.association_id})
            info.failed += 1
            status = STATUS_OUT_OF_RESOURCES
        finally:
            if timer:
                timer.end_image()
        return status, info.take_error_comment(status)

    # Large data sets, on either path (services/receiver/spool.py).
    def claim(self, assoc: Any) -> Claim:
        """direct.LargeData: a growing data set's share of the memory budget (none yet)."""
        return self.spooler.claim(assoc.caduceus_claims)

    def in_memory_until(self, claim: direct.Claim, size: int) -> int:
        """direct.LargeData: how far the data set may grow in memory; 0: it goes to a spool now."""
        assert isinstance(claim, Claim)
        return self.spooler.in_memory_until(claim, size)

    def outgrown(self, assoc: Any, request: direct.StoreRequest, fragments: list[memoryview], size: int) -> Spool:
        """direct.LargeData: a data set passed `watch_at()`; it continues in a spool file."""
        meta = part10.PREAMBLE + part10.file_meta(request.sop_class_uid, request.sop_instance_uid,
                                                  request.transfer_syntax_uid)  # plain UIDs: _direct_accept
        info: AssociationInfo = assoc.caduceus_info
        spool = self.spooler.open(meta, fragments, size, request.transfer_syntax_uid, {
            "sop_uid": request.sop_instance_uid, "association_id": info.association_id})
        self._receiving(assoc, spool)
        return spool

    @staticmethod
    def _receiving(assoc: Any, spool: Spool) -> None:
        """Remember a spool of `assoc` not yet taken by a store: removed if the association ends
        first. A set: on pynetdicom's path a sender that does not wait for responses can have a
        complete one queued for the handler while the next one arrives."""
        assoc.__dict__.setdefault("caduceus_receiving", set()).add(spool)

    @staticmethod
    def _abandon_receiving(assoc: Any) -> None:
        spools: set[Spool] = assoc.__dict__.get("caduceus_receiving", set())
        for spool in list(spools):
            spools.discard(spool)
            spool.discard()
        for claim in list(assoc.__dict__.get("caduceus_claims", ())):
            claim.release()  # data sets cut off, or never stored: the budget gets their share back

    def _store_spooled(self, assoc: Any, info: AssociationInfo, spool: Spool, context_ts: str, sop_uid: str,
                       mark: int) -> int:
        assoc.__dict__.get("caduceus_receiving", set()).discard(spool)  # complete: the store owns it now
        return self.ingest.store_spooled(info, spool, context_ts, sop_uid, mark=mark)

    def _store(self, event: DicomEvent, info: AssociationInfo, mark: int) -> int:
        request_sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        sink = getattr(event.request, "_dataset_file", None)
        if isinstance(sink, DimseSink):
            try:
                return self._store_spooled(event.assoc, info, sink.spool, str(event.context.transfer_syntax),
                                           request_sop_uid, mark)
            except Exception:  # a bug here must not turn into a success, nor lose the sender's copy
                log.exception("unexpected error while storing an instance",
                              extra={"sop_uid": request_sop_uid, "association_id": info.association_id})
                info.failed += 1
                return STATUS_OUT_OF_RESOURCES
        held = getattr(event.request, "DataSet", None)
        try:
            return self._store_in_memory(event, info, request_sop_uid, mark)
        finally:
            if isinstance(held, HeldData):
                held.claim.release()

    def _store_in_memory(self, event: DicomEvent, info: AssociationInfo, request_sop_uid: str, mark: int) -> int:
        try:
            data = part10.encoded_dataset(event)
        except Exception as exc:  # noqa: BLE001 - file meta could not be built: keep the raw dataset
            raw = _raw_dataset(event)
            return self.ingest.quarantine(info, raw, f"no file meta could be built: {exc}", request_sop_uid)
        if info.timer:
            mark = info.timer.mark("encode", mark)
        try:
            return self.ingest.store(info, data, str(event.context.transfer_syntax), request_sop_uid, mark=mark)
        except Exception:  # a bug here must not turn into a success, nor lose the sender's copy
            log.exception("unexpected error while storing an instance",
                          extra={"sop_uid": request_sop_uid, "association_id": info.association_id})
            info.failed += 1
            return STATUS_OUT_OF_RESOURCES

    def _on_released(self, event: DicomEvent) -> None:
        self._ended(event.assoc, "released")

    def _on_aborted(self, event: DicomEvent) -> None:
        self._abandon_receiving(event.assoc)
        self._ended(event.assoc, "aborted")

    def _on_conn_close(self, event: DicomEvent) -> None:
        self._abandon_receiving(event.assoc)  # an instance cut off mid-way: its spool file goes
        server = self.server
        if isinstance(server, BoundedServer):
            server.connection_closed(event.assoc)  # a worker tells the supervisor (workers.py)
        # The close can come (from the DUL thread) just before EVT_RELEASED/EVT_ABORTED; give those
        # a moment to report the better reason, whoever pops the info first publishes.
        timer = threading.Timer(1.0, self._ended, (event.assoc, "closed"))
        timer.daemon = True
        timer.start()

    def _ended(self, assoc: Any, how: Literal["released", "aborted", "closed"]) -> None:
        info: AssociationInfo | None = assoc.__dict__.pop("caduceus_info", None)
        if info is None:
            return  # rejected, never negotiated, or already reported
        with self._lock:
            self.open_associations -= 1
        if info.timer:
            log.info("association timing (ms per image)", extra={"data": {**info.timer.summary(), "pid": os.getpid()}})
        self.publish_later(make_event("association.ended", "receiver", AssociationEnded(
            association_id=info.association_id, calling_aet=info.calling_aet, peer_host=info.peer_host,
            instances_stored=info.stored, instances_failed=info.failed, how=how)))


def _raw_dataset(event: DicomEvent) -> bytes:
    dataset: Any = getattr(event.request, "DataSet", None)
    try:
        return bytes(dataset.getvalue()) if dataset is not None else b""
    except Exception:  # noqa: BLE001
        return b""
