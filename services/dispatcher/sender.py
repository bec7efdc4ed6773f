"""The DICOM C-STORE SCU side: one association sending a list of files (synchronous; pynetdicom).

Files go out as stored: the data set bytes after the file meta, straight from disk (no decode, no
re-encode), and each file is proposed in its own transfer syntax, so nothing is transcoded. Files
in Explicit VR Little Endian (or deflated) are also proposed as Implicit VR Little Endian, which
every Storage SCP must accept, and re-encoded only for a peer that accepted nothing else
(`reencode`). A peer that refuses a file's SOP class/transfer syntax gets nothing for that file and
the attempt fails for it; when the peer said it does not support them (PS3.8 results 3 and 4) in
an association that proposed nothing else, the file is refused for good (`_context_refusal`).

Associations come from `fastpath.FastAE`: with pynetdicom 3.0 (and CADUCEUS_DISPATCH_FASTPATH not
0) they run event-driven loops and each C-STORE is written by `cstore.send_c_store`; otherwise
pynetdicom's own loops and `send_c_store` (with `STORE_SEND_CHUNKED_DATASET`) are used, with the
`_settle_reactor` workaround. docs/performance.md "Dispatch hop" has the measurements.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from shared.config.model import TlsConfig

from . import cstore, fastpath, reencode

log = logging.getLogger(__name__)

# Send file bytes as stored (pynetdicom reads the dataset from the file after its meta header).
_config.STORE_SEND_CHUNKED_DATASET = True
# pynetdicom's standard event handlers format every DIMSE message and PDU even when nothing is
# logged (pynetdicom logs at WARNING here); the dispatcher logs outcomes itself.
_config.LOG_HANDLER_LEVEL = "none"

SUCCESS = 0x0000
MAX_CONTEXTS = 128  # DICOM limit of presentation contexts per association (odd ids 1..255)
MAX_REASSOCIATIONS = 3  # fresh associations per attempt after the peer aborted one
# A peer that rejects an association as transient (PS3.8 9.3.4: result "rejected-transient", e.g.
# "local limit exceeded" when other senders hold its associations, or "temporary congestion") is
# asked again after these pauses (seconds) within the attempt, before the attempt fails for it.
BUSY_PAUSES = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0)
# Seconds to wait for a C-STORE response; with the fast path, once the peer has acknowledged the
# whole request (the end of a large one may still be draining from the send buffer, cstore._response).
DIMSE_TIMEOUT = 120
# Seconds without progress before the association is given up: nothing received from the peer,
# nothing written to it, and (with the fast path, on Linux) none of our queued bytes acknowledged.
NETWORK_TIMEOUT = 120


def is_warning(status: int) -> bool:
    """The peer stored the instance, with a remark worth a log line: the storage warnings (Bxxx:
    B000 coercion, B006 elements discarded, B007 data set does not match the SOP class) and the
    general ones of PS3.7 Annex C (0001, 0107 attribute list error, 0116 value out of range)."""
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


# Failure statuses whose meaning is a property of the instance (PS3.4 B.2.3 A9xx "data set does not
# match SOP class", PS3.7 C 0117 "invalid SOP instance") or of the peer's configuration for this
# caller (0122 "SOP class not supported", 0124 "not authorized"): the same bytes sent to the same peer
# get the same answer, so later attempts of the task do not resend them (docs/reliability.md).
# Every other failure counts as transient, 0xCxxx "cannot understand" included: it is the catch-all
# of SCP toolkits for anything that went wrong while storing (pynetdicom answers 0xC211 when its
# storage handler raises, DCMTK's DcmStorageSCP 0xC000 when receiving the data set failed, and PACS
# built on them report database or disk trouble that way).
FINAL_REFUSALS = frozenset({0x0117, 0x0122, 0x0124})


def is_final_refusal(status: int) -> bool:
    """A failure status that a resend of the same instance to the same peer cannot change."""
    return status in FINAL_REFUSALS or 0xA900 <= status <= 0xA9FF


# Presentation context results (PS3.8 9.3.3.2, table 9-18) that say what the peer supports: the SOP
# class (abstract syntax), or none of the proposed transfer syntaxes. The others (1 user rejection,
# 2 no reason given) say nothing about that.
ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03
TRANSFER_SYNTAXES_NOT_SUPPORTED = 0x04
NOT_SUPPORTED_RESULTS = frozenset({ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED})


@dataclass(frozen=True)
class Destination:
    host: str
    port: int
    called_aet: str
    calling_aet: str
    tls: TlsConfig | None = None

    def describe(self) -> str:
        return self.peer() + (" (TLS)" if self.tls else "")

    def peer(self) -> str:
        """Which peer this is, whatever the connection details: the identity delivered instances count for."""
        return f"{self.called_aet}@{self.host}:{self.port}"


FileId = tuple[int, int, int, int]


def file_id(stat: os.stat_result) -> FileId:
    """Which file this is: a re-send replaces a blob with a new file (temp file + rename), and the
    receiver stamps each with its own receipt time, so an inode number reused is told apart too."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass(frozen=True)
class SendItem:
    index: int  # position in the manifest
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    # The file found to hold the routed copy (handlers._check_routed) and that copy's sha256: another
    # file at `path` with other bytes when the instance's turn comes means a re-send replaced it
    # meanwhile: it is not sent.
    file_id: FileId | None = None
    sha256: str = ""


@dataclass
class SendResult:
    delivered: list[int] = field(default_factory=list)
    reencoded: int = 0  # delivered as Implicit VR Little Endian, the peer refusing their own syntax
    refused_by_peer: bool = False  # the peer accepted no context for some file: a retry alone fails again
    failed: dict[int, str] = field(default_factory=dict)  # manifest index -> reason
    errors: list[str] = field(default_factory=list)  # association-level problems
    changed: list[int] = field(default_factory=list)  # replaced by another file before their turn: not sent
    statuses: dict[int, int] = field(default_factory=dict)  # manifest index -> the peer's status, if not 0x0000
    warned: dict[int, str] = field(default_factory=dict)  # manifest index -> the warning, for delivered ones
    # Of `failed`: every context proposed for them was refused as not supported in an association
    # that proposed nothing else (`_context_refusal`): refused for good, like a final status.
    context_refused: set[int] = field(default_factory=set)

    @property
    def warnings(self) -> int:
        return len(self.warned)

    def merge(self, other: SendResult) -> None:
        self.delivered += other.delivered
        self.changed += other.changed
        self.statuses.update(other.statuses)
        self.warned.update(other.warned)
        self.reencoded += other.reencoded
        self.refused_by_peer |= other.refused_by_peer
        self.failed.update(other.failed)
        self.errors += other.errors
        self.context_refused |= other.context_refused


DeliveredCallback = Callable[[int, int], None]  # (manifest index, status)


def _context_pairs(item: SendItem) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) pairs proposed for an item: its own, and a fallback."""
    pairs = [(item.sop_class_uid, item.transfer_syntax_uid)]
    fallback = reencode.fallback_syntax(item.transfer_syntax_uid)
    if fallback is not None:
        pairs.append((item.sop_class_uid, fallback))
    return pairs


def context_groups(items: Sequence[SendItem]) -> list[list[SendItem]]:
    """Split items so that no association needs more than MAX_CONTEXTS presentation contexts."""
    groups: list[list[SendItem]] = []
    pairs: set[tuple[str, str]] = set()
    current: list[SendItem] = []
    for item in items:
        needed = set(_context_pairs(item)) - pairs
        if needed and len(pairs) + len(needed) > MAX_CONTEXTS:
            groups.append(current)
            current, pairs, needed = [], set(), set(_context_pairs(item))
        pairs |= needed
        current.append(item)
    if current:
        groups.append(current)
    return groups


def presentation_contexts(items: Sequence[SendItem]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) pair, each proposing a single syntax."""
    pairs = sorted({pair for item in items for pair in _context_pairs(item)})
    return [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client side of a target's TLS; OSError naming the file when one cannot be loaded."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"TLS ca {tls.ca}: {_file_reason(exc)}") from exc
    if tls.certificate:
        try:
            context.load_cert_chain(tls.certificate, tls.key or None)
        except (OSError, ssl.SSLError) as exc:
            key = f" with key {tls.key}" if tls.key else ""
            raise OSError(f"TLS certificate {tls.certificate}{key}: {_file_reason(exc)}") from exc
    return context


def _file_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _on_connection_open(event: evt.Event) -> None:
    # Without TCP_NODELAY small PDUs wait for delayed ACKs (tens of ms per instance).
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pynetdicom leaves the socket blocking without a timeout: a write to a peer that stopped
        # reading would block for good, holding the write lock the A-ABORT of the network timeout
        # waits for. A write that makes no progress for that long fails instead (the connection
        # counts as closed).
        seconds = int(event.assoc.network_timeout or NETWORK_TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))
    event.assoc.caduceus_connected = True  # type: ignore[attr-defined]  # tells "refused/unreachable" from "aborted by the peer"


def _associate(dest: Destination, items: Sequence[SendItem]) -> Association:
    ae = fastpath.FastAE(ae_title=dest.calling_aet)
    ae.requested_contexts = presentation_contexts(items)
    ae.maximum_pdu_size = 0
    ae.connection_timeout = 10
    ae.acse_timeout = 30
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.network_timeout = NETWORK_TIMEOUT
    tls_args = (tls_context(dest.tls), dest.host) if dest.tls else None
    return ae.associate(dest.host, dest.port, ae_title=dest.called_aet, tls_args=tls_args,
                        evt_handlers=[(evt.EVT_CONN_OPEN, _on_connection_open),
                                      (evt.EVT_ACSE_RECV, _on_acse_received)])


def _on_acse_received(event: evt.Event) -> None:
    # pynetdicom only logs why a peer rejected the association; the task's error should say it.
    primitive = event.primitive  # type: ignore[attr-defined]
    if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
        event.assoc.caduceus_busy = primitive.result == 0x02  # type: ignore[attr-defined]
        event.assoc.caduceus_rejection = (  # type: ignore[attr-defined]
            f"{primitive.reason_str.lower()} ({primitive.result_str.lower()}, by the {primitive.source_str.lower()})")


def _association_error(assoc: Association, dest: Destination) -> str:
    if not getattr(assoc, "caduceus_connected", False):
        return f"could not connect to {dest.describe()}{_connect_problem(dest)}"
    if assoc.is_rejected:
        why = getattr(assoc, "caduceus_rejection", "")
        return f"association rejected by {dest.describe()}" + (f": {why}" if why else "")
    if _refused_every_context(assoc):
        return f"{dest.describe()} accepted none of the proposed presentation contexts ({_refusals(assoc)})"
    ours = getattr(assoc, "caduceus_aborted_because", "")
    if ours:
        return f"association with {dest.describe()} aborted by caduceus: {ours}"
    if assoc.is_aborted:
        return f"association aborted by {dest.describe()}{_tls_problem(dest)}"
    return f"association with {dest.describe()} ended unexpectedly"


def _refused_every_context(assoc: Association) -> bool:
    return bool(assoc.rejected_contexts) and not assoc.accepted_contexts


def _note_context_refusal(assoc: Association, item: SendItem, dest: Destination, result: SendResult,
                          unsure: list[SendItem]) -> bool:
    """Record that the peer refused every context proposed for `item` as not supported: for good
    (failed, `context_refused`), or, proposed among other contexts, to be proposed alone (`unsure`).
    False when it refused them otherwise (no reason given, user rejection), or accepted one."""
    refusal = _context_refusal(assoc, item, dest)
    if refusal is None:
        return False
    reason, alone = refusal
    if alone:
        result.failed[item.index] = reason
        result.context_refused.add(item.index)
    else:
        unsure.append(item)
    return True


def _context_refusal(assoc: Association, item: SendItem, dest: Destination) -> tuple[str, bool] | None:
    """Why the peer refused every context proposed for `item` as not supported (results 3, 4), and
    whether the association proposed nothing else, None if it refused any of them otherwise.

    The rule for "refused for good": a peer that supports the SOP class in one of the syntaxes
    accepts a context for it when it is offered nothing else; some peers take only so many contexts
    per association and answer the others "not supported" too, so a refusal among other contexts
    is not taken as the peer's last word (`_send_group` proposes those alone once).
    """
    pairs = _context_pairs(item)
    proposed = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.requestor.requested_contexts}
    said = {proposed[cx.context_id]: cx.result for cx in assoc.rejected_contexts if cx.context_id in proposed}
    if not all(said.get(pair) in NOT_SUPPORTED_RESULTS for pair in pairs):
        return None
    alone = set(proposed.values()) <= set(pairs)
    sop_class = UID(item.sop_class_uid).name
    if all(said[pair] == ABSTRACT_SYNTAX_NOT_SUPPORTED for pair in pairs):
        return f"SOP class '{sop_class}' not accepted by {dest.describe()} (abstract syntax not supported)", alone
    syntaxes = " nor ".join(f"'{UID(syntax).name}'" for _, syntax in pairs)
    return f"'{sop_class}' in {syntaxes} not accepted by {dest.describe()} (transfer syntax not supported)", alone


def _connect_problem(dest: Destination, timeout: float = 3.0) -> str:
    """Why a connection fails (refused, timed out, unknown host), found by trying once more.

    pynetdicom only logs the socket error; the task's error should tell an admin which it was.
    """
    try:
        with socket.create_connection((dest.host, dest.port), timeout=timeout):
            pass
    except TimeoutError:
        return f": no answer within {timeout:g} s"
    except socket.gaierror as exc:
        return f": cannot resolve host {dest.host!r} ({exc.strerror})"
    except OSError as exc:
        return f": {exc.strerror or exc}"
    return _tls_problem(dest, timeout) or " (it accepted a connection on a second try)"


def _tls_problem(dest: Destination, timeout: float = 3.0) -> str:
    """Why TLS with the peer fails (certificate not trusted, name mismatch, a plain DICOM peer, a
    client certificate it requires), found by one handshake and a short read; "" if nothing shows.

    pynetdicom logs these as tracebacks; the task's error should name the cause.
    """
    if dest.tls is None:
        return ""
    try:
        context = tls_context(dest.tls)
        raw = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except OSError:
        return ""  # the connection itself (or a TLS file) is the problem: said elsewhere
    with raw:
        try:
            secured = context.wrap_socket(raw, server_hostname=dest.host)
        except ssl.SSLCertVerificationError as exc:
            return f": TLS: the peer's certificate is not accepted ({exc.verify_message})"
        except ssl.SSLError as exc:
            plain_peer = isinstance(exc, ssl.SSLEOFError) or "WRONG_VERSION_NUMBER" in str(exc)
            return f": TLS handshake failed: {exc.reason or exc}" + (" (is the peer using TLS?)" if plain_peer else "")
        except OSError as exc:  # a timeout or a closed connection: no TLS server answered
            return f": TLS handshake failed: {exc.strerror or exc or 'no answer'} (is the peer using TLS?)"
        with secured:
            try:
                secured.settimeout(0.5)  # a peer that wants a client certificate says so right away
                secured.recv(1)
            except ssl.SSLError as exc:
                return f": TLS: the peer ended the connection: {exc.reason or exc}"
            except OSError:
                pass  # (a timeout: the peer waits for our request, as it should)
    return ""


def _refusals(assoc: Association) -> str:
    """What the peer said to each proposed (SOP class, transfer syntax), the first few."""
    # A rejected context comes back with a placeholder syntax; what was proposed is in the request.
    proposed = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.requestor.requested_contexts}
    said = [f"{UID(str(cx.abstract_syntax)).name} in {proposed.get(cx.context_id, cx.transfer_syntax[0]).name}: "
            f"{cx.status.lower()}" for cx in assoc.rejected_contexts]
    return "; ".join(said[:3]) + (f"; and {len(said) - 3} more" if len(said) > 3 else "")


def _status_of(response: Dataset) -> int | None:
    return int(response.Status) if "Status" in response else None


def send_items(dest: Destination, items: Sequence[SendItem], on_delivered: DeliveredCallback,
               abort: threading.Event, wait_if_busy: bool = True) -> SendResult:
    """Send `items` over as few associations as the context limit allows; never raises for peers.

    `wait_if_busy`: ask a peer that rejects an association as transient again (BUSY_PAUSES); off for
    one of several parallel associations of a task, whose share goes over another one instead.
    """
    result = SendResult()
    for group in context_groups(items):
        if abort.is_set():
            break
        result.merge(_send_group(dest, group, on_delivered, abort, BUSY_PAUSES if wait_if_busy else ()))
    return result


def _send_group(dest: Destination, items: Sequence[SendItem], on_delivered: DeliveredCallback,
                abort: threading.Event, busy_pauses: Sequence[float]) -> SendResult:
    """Send the items, then propose alone, once, what the peer said it does not support while other
    contexts were proposed too (some peers take only so many contexts per association and refuse
    the rest that way): accepted now, they are sent; refused again, they are refused for good."""
    result = SendResult()
    unsure = _send_reassociating(dest, items, result, on_delivered, abort, busy_pauses)
    for alone in _by_context_pairs(unsure):
        if abort.is_set():
            break
        log.info("%s refused the presentation context(s) of %d instance(s) (%s) among others; proposing "
                 "them alone", dest.describe(), len(alone), UID(alone[0].sop_class_uid).name)
        _send_reassociating(dest, alone, result, on_delivered, abort, busy_pauses)  # (alone: none unsure)
    return result


def _by_context_pairs(items: Sequence[SendItem]) -> list[list[SendItem]]:
    """The items grouped by the presentation contexts proposed for them, in order of first appearance."""
    groups: dict[tuple[tuple[str, str], ...], list[SendItem]] = {}
    for item in items:
        groups.setdefault(tuple(_context_pairs(item)), []).append(item)
    return list(groups.values())


def _send_reassociating(dest: Destination, items: Sequence[SendItem], result: SendResult,
                        on_delivered: DeliveredCallback, abort: threading.Event,
                        busy_pauses: Sequence[float]) -> list[SendItem]:
    """Send on one association; if the peer aborts it, go on with the rest on a fresh one. Returns
    the items whose contexts the peer refused as not supported among other contexts (not sent).

    The instance in flight when the association dropped counts as failed for this attempt, so one
    instance the peer cannot take does not keep every instance after it from being delivered.
    """
    unsure: list[SendItem] = []
    remaining: list[SendItem] | None = list(items)
    for _ in range(1 + MAX_REASSOCIATIONS):
        if not remaining or abort.is_set():
            break
        remaining = _send_on_association(dest, remaining, result, on_delivered, abort, busy_pauses, unsure)
    return unsure


def _send_on_association(dest: Destination, items: list[SendItem], result: SendResult,
                         on_delivered: DeliveredCallback, abort: threading.Event,
                         busy_pauses: Sequence[float], unsure: list[SendItem]) -> list[SendItem] | None:
    """Returns the items still to send after the association ended early, None if none could start.
    Items whose contexts the peer refused as not supported among others are added to `unsure`."""
    try:
        assoc = _associate_when_free(dest, items, abort, busy_pauses)
    except Exception as exc:  # noqa: BLE001 - TLS setup or socket errors become a failed attempt
        result.errors.append(f"could not associate with {dest.describe()}: {exc}")
        return None
    if not assoc.is_established:
        # (pynetdicom aborts an association in which the peer accepted no context.)
        if not _refused_every_context(assoc) or \
                not all([_note_context_refusal(assoc, item, dest, result, unsure) for item in items]):
            result.errors.append(_association_error(assoc, dest))
            result.refused_by_peer |= _refused_every_context(assoc)
        return None
    left = list(items)
    try:
        while left and not abort.is_set() and assoc.is_established:
            item = left.pop(0)
            if not _send_one(assoc, item, result, on_delivered, dest, unsure):
                left.insert(0, item)  # never went out: try it on the next association
        if not assoc.is_established:
            result.errors.append(_association_error(assoc, dest))
    finally:
        if assoc.is_established:
            assoc.release()
    return left


def _associate_when_free(dest: Destination, items: list[SendItem], abort: threading.Event,
                         busy_pauses: Sequence[float]) -> Association:
    """An association; one the peer rejected as transient is asked for again after `busy_pauses`.

    A busy peer is not a reason to fail the attempt and wait the retry back-off (a minute, then
    doubling): its associations usually free up within seconds. The pauses vary a little, so that
    senders turned away together do not all come back at the same moment.
    """
    assoc = _associate(dest, items)
    for pause in (p * random.uniform(0.8, 1.2) for p in busy_pauses):
        if not (assoc.is_rejected and getattr(assoc, "caduceus_busy", False)):
            break
        log.info("%s is busy (%s); asking again in %.1f s", dest.describe(),
                 getattr(assoc, "caduceus_rejection", ""), pause)
        if abort.wait(pause):
            break
        assoc = _associate(dest, items)
    return assoc


def _settle_reactor(assoc: Association, timeout: float = 0.2) -> None:
    """Wait until the association's reactor thread has resumed after the previous C-STORE.

    pynetdicom race (3.0.x): send_c_store() pauses the reactor by clearing a checkpoint and waiting
    for `_is_paused`; right after the previous send set the checkpoint again, `_is_paused` is still
    True from before while the reactor is already waking up, so the next send goes ahead and the
    reactor then takes its C-STORE response off the queue ("Received unexpected C-STORE service
    message"), leaving the send waiting for the DIMSE timeout. With a fast peer and TCP_NODELAY this
    happened every few hundred instances. Seeing `_is_paused` False once means the reactor is
    past its wait, so the next pause handshake is real.
    """
    deadline = time.monotonic() + timeout
    while getattr(assoc, "_is_paused", False) and time.monotonic() < deadline:
        time.sleep(0.00005)


def _c_store(assoc: Association, path: Path) -> cstore.Stored:
    """The C-STORE status of one file, None without a response (see cstore/fastpath for why two paths)."""
    if fastpath.installed(assoc):
        # Its reactor never takes responses (no race to settle), but it notices an abort a few
        # milliseconds late: do not send into an association that just ended.
        if fastpath.ended(assoc):
            raise cstore.NotSent()
        return cstore.send_c_store(assoc, path)
    _settle_reactor(assoc)
    try:
        return _stored(assoc.send_c_store(path), False)
    except ValueError:
        meta = cstore.read_file_meta(path)
        if reencode.fallback_syntax(meta.transfer_syntax_uid) is None:
            raise
    # The data set re-encoded as Implicit VR Little Endian in memory (reencode.decoded), which pynetdicom sends as is.
    return _stored(assoc.send_c_store(reencode.decoded(path, meta.transfer_syntax_uid)), True)


def _stored(response: Dataset, reencoded: bool) -> cstore.Stored:
    return cstore.Stored(_status_of(response), reencoded, str(response.get("ErrorComment", "")))


def _replaced(item: SendItem) -> bool:
    try:
        if file_id(os.stat(item.path)) == item.file_id:
            return False
        # Another file: the same bytes written again (a receiver's journal replay) still go out.
        return not item.sha256 or file_sha256(item.path) != item.sha256
    except OSError:
        return False  # gone or unreadable: the send fails and says why


def file_sha256(path: Path) -> str:
    with open(path, "rb") as source:
        return hashlib.file_digest(source, "sha256").hexdigest()


def _send_one(assoc: Association, item: SendItem, result: SendResult, on_delivered: DeliveredCallback,
              dest: Destination, unsure: list[SendItem]) -> bool:
    """Send one instance and record its outcome; False if it never went out (association gone)."""
    if item.file_id is not None and _replaced(item):
        result.changed.append(item.index)
        return True
    try:
        stored = _c_store(assoc, item.path)
    except cstore.NotSent:
        if assoc.is_established:
            assoc.abort()  # established but out of data transfer: do not keep trying on it
        return False
    except ValueError as exc:  # no accepted context fits this file
        if not _note_context_refusal(assoc, item, dest, result, unsure):
            result.failed[item.index] = str(exc)
            result.refused_by_peer = True
        return True
    except reencode.ReencodeError as exc:
        result.failed[item.index] = str(exc)
        return True
    except RuntimeError:
        if not assoc.is_established:
            return False  # the association ended just before this send
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable file, socket trouble: this instance failed
        result.failed[item.index] = f"{type(exc).__name__}: {exc}"
        return True
    status = stored.status
    if status is None:
        result.failed[item.index] = getattr(assoc, "caduceus_aborted_because", "") \
            or "no C-STORE response (association aborted while sending)"
        return True
    if status != SUCCESS:
        result.statuses[item.index] = status
    if status == SUCCESS or is_warning(status):
        if status != SUCCESS:
            result.warned[item.index] = describe_status(status, stored.comment)
            log.warning("C-STORE warning for %s: %s", item.sop_uid, result.warned[item.index],
                        extra={"sop_uid": item.sop_uid})
        result.delivered.append(item.index)
        result.reencoded += stored.reencoded
        on_delivered(item.index, status)
        return True
    result.failed[item.index] = describe_status(status, stored.comment)
    return True


def describe_status(status: int, comment: str) -> str:
    """A warning or failure status with its meaning (PS3.4 B.2.3, PS3.7 C) and the peer's own words."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1]
    return f"C-STORE status 0x{status:04X}" + (f" ({meaning})" if meaning else "") + (f": {comment}" if comment else "")
