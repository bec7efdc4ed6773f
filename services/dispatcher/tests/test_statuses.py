"""C-STORE statuses: warnings count as delivered, failures fail the attempt, and the retry sends
only what the peer has not confirmed. The peer is a pynetdicom Storage SCP answering per instance."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from bench.common import stage_files
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.natsserver import free_port
from tests.peers import make_series

from .conftest import (
    FAST_RETRIES,
    apply_config,
    dicom_target,
    events_of,
    request_dispatch,
    running_dispatcher,
    wait_events,
)


class ScriptedScp:
    """Answers each SOP Instance UID with the next status of its script, 0x0000 when none is left."""

    def __init__(self) -> None:
        self.port = free_port()
        self.script: dict[str, list[int]] = {}
        self.received: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="SCRIPTED")
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        assert server is not None
        self.server = server

    def _on_store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)  # type: ignore[union-attr]
        with self.lock:
            self.received.append(uid)
            statuses = self.script.get(uid)
            return statuses.pop(0) if statuses else 0x0000


@pytest.fixture
def scripted_scp() -> Iterator[ScriptedScp]:
    scp = ScriptedScp()
    yield scp
    scp.server.shutdown()


async def test_warning_is_delivered_failure_is_retried_alone(tmp_path: Path, bus: Bus, nats_url: str,
                                                             data_dir: Path, blob_store: LocalBlobStore,
                                                             scripted_scp: ScriptedScp) -> None:
    files = make_series(tmp_path / "series", 4)
    manifest, key = await stage_files(blob_store, files)
    warned, refused = manifest.instances[0].sop_uid, manifest.instances[2].sop_uid
    scripted_scp.script = {warned: [0xB000], refused: [0xA700]}  # out of resources, then fine
    await apply_config(bus, {"settings": FAST_RETRIES,
                             "targets": {"scripted": dicom_target(scripted_scp.port, "SCRIPTED")}})
    async with running_dispatcher(nats_url, data_dir):
        request = await request_dispatch(bus, manifest, key, "scripted")
        completed = (await wait_events(bus, "dispatch.completed", request.task_id))[0]
    attempts = await events_of(bus, "dispatch.attempt_failed", request.task_id)
    assert len(attempts) == 1
    assert attempts[0].payload["sent"] == 3 and attempts[0].payload["failed"] == 1
    assert "0xA700" in attempts[0].payload["error"]
    assert completed.payload == {**completed.payload, "sent": 1, "skipped_already_sent": 3, "warnings": 1,
                                 "attempt": 2}
    # The peer got every instance once, and the refused one a second time.
    assert sorted(scripted_scp.received) == sorted([i.sop_uid for i in manifest.instances] + [refused])
