"""The progress record's refusals: kept per retry generation and peer, bounded in size."""

from __future__ import annotations

from services.dispatcher.progress import MAX_REFUSAL_REASONS, ProgressStore
from shared.bus import Bus
from shared.events import DispatchRequested, make_event


async def _store_with_task(bus: Bus, task_id: str, peer: str) -> ProgressStore:
    progress = await ProgressStore.open(bus.js)
    await progress.ensure(make_event("dispatch.requested", "router", DispatchRequested(
        task_id=task_id, rule="r", target="t", manifest_key="m", instance_count=100), task_id=task_id))
    await progress.deliver_to(task_id, peer)
    return progress


async def test_refusals_count_for_their_generation_and_peer_only(bus: Bus) -> None:
    progress = await _store_with_task(bus, "refusals", "PACS@a:104")
    await progress.add_refused("refusals", 0, "PACS@a:104", {3: (0xA900, "mismatch"), 5: (0x0122, "no class")})
    record = await progress.get("refusals")
    assert record is not None and record.refusals() == {3: (0xA900, "mismatch"), 5: (0x0122, "no class")}
    # From an attempt that a manual retry overtook (generation 0 is gone): the operator wants them resent.
    await progress.mutate("refusals", lambda r: r and r.model_copy(update={"generation": 1, "refused": []}))
    await progress.add_refused("refusals", 0, "PACS@a:104", {7: (0xA900, "mismatch")})
    assert (await progress.get("refusals")).refusals() == {}  # type: ignore[union-attr]
    await progress.add_refused("refusals", 1, "PACS@a:104", {7: (0xA900, "mismatch")})
    # Another peer behind the target may take them.
    await progress.deliver_to("refusals", "PACS@b:104")
    assert (await progress.get("refusals")).refusals() == {}  # type: ignore[union-attr]


async def test_a_comment_per_instance_does_not_grow_the_record_without_bound(bus: Bus) -> None:
    progress = await _store_with_task(bus, "chatty", "PACS@a:104")
    await progress.add_refused("chatty", 0, "PACS@a:104",
                               {i: (0xA900, f"instance {i} lacks Patient ID") for i in range(60)})
    record = await progress.get("chatty")
    assert record is not None
    assert len(record.refused) == MAX_REFUSAL_REASONS + 1
    refusals = record.refusals()
    assert sorted(refusals) == list(range(60))
    assert refusals[59] == (0xA900, "C-STORE status 0xA900 (Data Set Does Not Match SOP Class)")
    assert refusals[0] == (0xA900, "instance 0 lacks Patient ID")
