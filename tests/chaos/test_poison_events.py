"""Poison messages on the bus: garbage and malformed events on every subject a service reads.

Anyone who can publish to NATS can put anything on the EVENTS, CONFIG and STATUS streams (a buggy
script, another caduceus version, a hand-written test message). Every reader must set such a
message aside with a clear log line and go on: no crash, no redelivery loop, no service kept from
starting, no series split or lost. Here, before and while a real series arrives, every consumed
subject gets (a) bytes that are not JSON, (b) JSON that is not an event, (c) an event whose
payload does not fit its type; the dispatcher and the router are killed and restarted with all
of that in their streams; then the series must arrive whole (one batch, one task) and exactly
once, `caduceus config apply` and `caduceus status` must work, and the audit log must hold every
message, the unreadable ones included.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import subjects
from shared.bus import Bus
from shared.events import Event
from tests.harness import (
    Caduceus,
    assert_ledger,
    route_all_config,
    storescp_deliveries,
    storescu,
    wait_for,
)
from tests.peers import StoreScp, make_series

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

# Every event type some service folds or pulls (router, dispatcher, processor), plus one nobody knows.
CONSUMED = ("image.received", "series.completed", "study.completed", "study.complete_requested",
            "route.requested", "route.decided", "dispatch.requested", "dispatch.retry_requested", "process.requested",
            "no.such.type")
POISON_SERIES = "1.2.826.0.1.3680043.8.498.999"


def _bodies(event_type: str) -> list[bytes]:
    wrong_payload = Event(type=event_type, actor="poison-test", study_uid="1.2.3", series_uid=POISON_SERIES,
                          sop_uid="1.2.3.4", task_id=str(uuid.uuid4()),
                          payload={"batch_id": 7, "blob_key": ["../../etc/passwd"], "tags": "not a dict",
                                   "last_seq": "x", "target": None})
    return [b"\x00\xff not json at all", json.dumps({"hello": "world", "type": 42}).encode(), wrong_payload.to_json()]


async def _publish_poison(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, actor="poison-test", declare=False)
    try:
        targets = [(subjects.event_subject(t), _bodies(t)) for t in CONSUMED]
        targets += [(subjects.config_subject("rules"), [b"{not a config event", b"[]"]),
                    (subjects.status_subject("router", "poison"), [b"\x00 not a heartbeat"])]
        for subject, bodies in targets:
            for body in bodies:
                await bus.js.publish(subject, body, headers={"Nats-Msg-Id": uuid.uuid4().hex})
    finally:
        await bus.close()


async def _last_seq(nats_url: str, stream: str) -> int:
    bus = await Bus.connect(nats_url, actor="poison-test", declare=False)
    try:
        return await bus.last_seq(stream)
    finally:
        await bus.close()


def test_poison_messages_are_set_aside_and_a_real_series_arrives_whole(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus],
        storescp_factory: Callable[..., StoreScp]) -> None:
    dest = storescp_factory(extra_args=["+uf"])
    config = route_all_config(dest.port, dest.aet)
    cad = caduceus_factory(config=config)
    files = make_series(tmp_path / "in", 20, size=64)

    asyncio.run(_publish_poison(cad.nats_url))
    # Restarted with poison in every stream they read at start (config, dispatch requests, events).
    cad.kill9("dispatcher")
    cad.kill9("router")
    result = storescu(cad.dicom_port, files)
    asyncio.run(_publish_poison(cad.nats_url))  # again, while the series is open
    assert len(result.accepted) == 20

    wait_for(lambda: set(storescp_deliveries(dest.files())) >= result.accepted, 90, "the series delivered", cad.logs)
    assert_ledger(result.accepted, storescp_deliveries(dest.files()))
    completed = wait_for(lambda: cad.events("dispatch.completed"), 30, "dispatch.completed", cad.logs)
    assert [e.payload["sent"] for e in completed] == [20], "the series went out in more than one task"
    crashed = sorted(e.payload["service"] for e in cad.events("service.crashed"))
    assert crashed == ["dispatcher", "router"], crashed  # the two kills, nothing else

    config["rules"]["all"]["description"] = "applied over a poisoned CONFIG stream"
    cad.apply_config(config)
    assert cad.status()["services"]  # `caduceus status` reads STATUS past its poison message
    cad.wait_healthy(60)  # and every service, the two restarted ones included, is healthy

    # Every message is in the audit log, the unreadable ones included.
    last = asyncio.run(_last_seq(cad.nats_url, subjects.EVENTS_STREAM))
    wait_for(lambda: cad.query("select count(*) from events where stream = 'EVENTS'")[0][0]
             + cad.query("select count(*) from event_duplicates where stream = 'EVENTS'")[0][0] >= last,
             60, "the bookkeeper stored every EVENTS message", cad.logs)
