"""A misbehaving DICOM destination for chaos tests: a real pynetdicom storage SCP on loopback
whose behaviour the test controls while it runs.

- `delay`: seconds per C-STORE (a slow destination, so a send is surely in flight when a test
  kills the dispatcher);
- `fail_first`: answer 0xA700 (out of resources) to the first N C-STOREs of every SOP instance;
- `abort_after`: abort the association after this many C-STOREs (once per association);
- `refuse`: reject every association (A-ASSOCIATE-RJ, calling AE title not recognised) while set.

Every C-STORE is recorded in order (`receipts`: SOP Instance UID and the status answered); only
instances answered 0x0000 count as stored.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from shared.natsserver import free_port

ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
]


@dataclass
class FlakyScp:
    aet: str = "FLAKY"
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    fail_first: int = 0
    abort_after: int | None = None
    refuse: bool = False
    receipts: list[tuple[str, int]] = field(default_factory=list)
    associations: int = 0
    aborted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None
    _ae: Any = None

    def set_refuse(self, refuse: bool) -> None:
        """pynetdicom checks `require_calling_aet` for every new association request."""
        self.refuse = refuse
        if self._ae is not None:
            self._ae.require_calling_aet = ["NOBODY-CALLS"] if refuse else []

    def start(self) -> FlakyScp:
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = True
        self._ae = ae
        self.set_refuse(self.refuse)
        ae.maximum_associations = 20
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REQUESTED, self._on_requested)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_requested(self, event: Any) -> None:
        with self._lock:
            self.associations += 1
            event.assoc.caduceus_count = 0

    def __str__(self) -> str:
        return (f"{self.aet}: {self.associations} association(s), {self.aborted} aborted, "
                f"receipts {[(uid[-6:], hex(status)) for uid, status in self.receipts]}")

    def _on_store(self, event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        assoc = event.assoc
        assoc.caduceus_count = getattr(assoc, "caduceus_count", 0) + 1
        if self.abort_after is not None and assoc.caduceus_count > self.abort_after:
            with self._lock:
                self.aborted += 1
                self.abort_after = None  # once
            assoc.abort()
            return 0xA700
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            earlier = sum(1 for uid, _ in self.receipts if uid == sop_uid)
            status = 0xA700 if earlier < self.fail_first else 0x0000
            self.receipts.append((sop_uid, status))
        return status

    def stored(self) -> Counter[str]:
        """SOP Instance UID -> how many times it was answered with success."""
        with self._lock:
            return Counter(uid for uid, status in self.receipts if status == 0x0000)

    def wait_stored(self, uids: set[str], timeout: float = 60,
                    detail: Callable[[], str] | None = None) -> Counter[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stored = self.stored()
            if uids <= set(stored):
                return stored
            time.sleep(0.2)
        raise TimeoutError(f"{len(set(self.stored()) & uids)} of {len(uids)} stored; {self}\n"
                           f"{detail() if detail else ''}")
