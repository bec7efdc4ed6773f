"""Per-target association limits (`max_associations`) within one dispatcher process.

A peer that allows fewer associations than caduceus opens across its tasks rejects the extra ones
("local limit exceeded"); those tasks then failed an attempt and waited the retry back-off. With a
limit on the target, a task that would go over it waits here for its turn instead, in the order
the tasks came, and sends once another task to that target has finished.

While it waits, a task gives its handler slot (CADUCEUS_DISPATCH_CONCURRENCY) back, so tasks for
other targets go on; it takes one again, in line with everyone else, before it sends. The waiting
room is bounded: when `room_for` tasks wait, the dispatcher pulls no new work until one of them
goes on (their messages are kept in progress meanwhile: docs/reliability.md).

The count is per process: several dispatcher processes each open up to the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

RECHECK_SECONDS = 1.0  # a waiting task looks at the limit again this often (it may have been raised)

Limit = Callable[[], int | None]  # the target's max_associations as configured now; None = no limit


@dataclass
class _Line:
    in_use: int = 0  # associations granted to tasks that are sending
    waiting: deque[asyncio.Event] = field(default_factory=deque)  # one per waiting task, first in line first


class AssociationGate:
    def __init__(self, stopping: asyncio.Event, slots: asyncio.Semaphore | None = None) -> None:
        self.stopping = stopping
        self.slots = slots  # the dispatcher's handler slots (None: not given back while waiting)
        self._lines: dict[str, _Line] = {}
        self._left = asyncio.Event()  # set when a task leaves a waiting room

    def waiting(self) -> int:
        return sum(len(line.waiting) for line in self._lines.values())

    def in_use(self, key: str) -> int:
        line = self._lines.get(key)
        return line.in_use if line else 0

    async def room_for(self, count: int) -> None:
        """Return once fewer than `count` tasks wait (or the dispatcher stops)."""
        while self.waiting() >= count and not self.stopping.is_set():
            self._left.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._left.wait(), RECHECK_SECONDS)

    async def take(self, key: str, limit: Limit, wanted: int) -> int | None:
        """How many associations a task may open to the peer `key` now: up to `wanted`, at least one.

        None when the dispatcher stops while the task waits. Called holding a handler slot; returns
        holding one (except on None), and holds none while it waits.
        """
        line = self._lines.setdefault(key, _Line())
        if not line.waiting and self._free(line, limit) > 0:
            return self._grant(line, limit, wanted)
        turn = asyncio.Event()
        line.waiting.append(turn)
        if self.slots is not None:
            self.slots.release()
        try:
            return await self._wait_turn(line, turn, limit, wanted)
        finally:
            line.waiting.remove(turn)
            self._wake_first(line)
            self._left.set()
            self._forget_idle(key)

    def give_back(self, key: str, granted: int) -> None:
        line = self._lines.get(key)
        if line is None:
            return
        line.in_use -= granted
        self._wake_first(line)
        self._forget_idle(key)

    async def _wait_turn(self, line: _Line, turn: asyncio.Event, limit: Limit, wanted: int) -> int | None:
        while True:
            if line.waiting[0] is turn and self._free(line, limit) > 0:
                if self.slots is not None:
                    await self.slots.acquire()  # in line with the pull loop and the other tasks
                if self._free(line, limit) > 0:  # (the limit may have been lowered meanwhile)
                    return self._grant(line, limit, wanted)
                if self.slots is not None:
                    self.slots.release()
            turn.clear()
            stop = asyncio.ensure_future(self.stopping.wait())
            woken = asyncio.ensure_future(turn.wait())
            try:
                await asyncio.wait({stop, woken}, timeout=RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                woken.cancel()
            if self.stopping.is_set():
                return None

    @staticmethod
    def _free(line: _Line, limit: Limit) -> int:
        cap = limit()
        return 1 << 30 if cap is None else cap - line.in_use

    def _grant(self, line: _Line, limit: Limit, wanted: int) -> int:
        granted = max(1, min(wanted, self._free(line, limit)))
        line.in_use += granted
        return granted

    @staticmethod
    def _wake_first(line: _Line) -> None:
        if line.waiting:
            line.waiting[0].set()

    def _forget_idle(self, key: str) -> None:
        line = self._lines.get(key)
        if line is not None and not line.in_use and not line.waiting:
            del self._lines[key]
