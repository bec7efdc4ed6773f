"""The association gate on its own: grants, order, handler slots, a changed limit, stopping."""

from __future__ import annotations

import asyncio

import pytest

from services.dispatcher import gate as gate_module
from services.dispatcher.gate import AssociationGate


async def _task(slots: asyncio.Semaphore, gate: AssociationGate, wanted: int, limit: int) -> int | None:
    await slots.acquire()  # as the pull loop does before a task starts
    return await gate.take("pacs", lambda: limit, wanted)


async def test_tasks_get_what_is_free_in_the_order_they_came_and_wait_without_their_slot() -> None:
    slots = asyncio.Semaphore(2)
    gate = AssociationGate(asyncio.Event(), slots)
    assert await _task(slots, gate, 2, 3) == 2
    assert await _task(slots, gate, 4, 3) == 1  # what is left, rather than waiting for 4
    gate.give_back("pacs", 1)
    slots.release()  # that task ended
    first = asyncio.create_task(_task(slots, gate, 1, 2))  # the limit is 2 now: 2 in use
    await asyncio.sleep(0.05)
    second = asyncio.create_task(_task(slots, gate, 1, 2))  # gets a slot only because `first` gave its back
    await asyncio.sleep(0.05)
    assert gate.waiting() == 2 and not first.done() and not second.done()
    gate.give_back("pacs", 2)
    slots.release()
    assert await asyncio.wait_for(first, 1) == 1
    assert await asyncio.wait_for(second, 1) == 1
    assert gate.in_use("pacs") == 2 and gate.waiting() == 0 and slots.locked()


async def test_a_raised_limit_lets_waiting_tasks_go_and_stopping_sends_the_rest_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_module, "RECHECK_SECONDS", 0.05)
    stopping = asyncio.Event()
    gate = AssociationGate(stopping)
    limit = 1
    assert await gate.take("pacs", lambda: limit, 1) == 1
    waiting = [asyncio.create_task(gate.take("pacs", lambda: limit, 1)) for _ in range(2)]
    await asyncio.sleep(0.1)
    limit = 2  # a config change: nobody gave anything back, the first waiting task notices by itself
    assert await asyncio.wait_for(waiting[0], 1) == 1 and not waiting[1].done()
    stopping.set()
    assert await asyncio.wait_for(waiting[1], 1) is None
    await asyncio.wait_for(gate.room_for(1), 1)


async def test_the_waiting_room_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gate_module, "RECHECK_SECONDS", 5.0)  # leaving must wake the pull loop by itself
    gate = AssociationGate(asyncio.Event())
    assert await gate.take("pacs", lambda: 1, 1) == 1
    waiting = [asyncio.create_task(gate.take("pacs", lambda: 1, 1)) for _ in range(2)]
    await asyncio.sleep(0.05)
    pull = asyncio.create_task(gate.room_for(2))
    await asyncio.sleep(0.1)
    assert not pull.done(), "two tasks wait: no room for a third"
    gate.give_back("pacs", 1)
    await asyncio.wait_for(pull, 1)
    assert await waiting[0] == 1 and not waiting[1].done()
    waiting[1].cancel()
