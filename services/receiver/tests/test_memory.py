"""Releasing free memory after a burst (services/receiver/memory.py): when, and how often."""

from __future__ import annotations

import sys
import time

import pytest

from services.receiver.memory import IdleTrim, release_free_memory


class Receiver:
    """What IdleTrim looks at: associations so far, and whether anything is going on."""

    def __init__(self) -> None:
        self.seen = 0
        self.busy = False
        self.released = 0

    def release(self) -> bool:
        self.released += 1
        return True


def trim_for(receiver: Receiver, interval: float = 60) -> IdleTrim:
    return IdleTrim(lambda: receiver.seen, lambda: receiver.busy, receiver.release, interval)


def test_nothing_is_released_before_the_first_association() -> None:
    receiver = Receiver()
    trim = trim_for(receiver)
    assert not trim.check() and receiver.released == 0


def test_released_once_per_burst_and_only_when_idle() -> None:
    receiver = Receiver()
    trim = trim_for(receiver)
    receiver.seen, receiver.busy = 3, True          # associations open, or journal not applied
    assert not trim.check() and receiver.released == 0
    receiver.busy = False
    assert trim.check() and receiver.released == 1
    assert not trim.check() and receiver.released == 1   # still the same burst
    receiver.seen = 4                                 # another association came and went
    assert trim.check() and receiver.released == 2 and trim.releases == 2


def test_a_platform_without_malloc_trim_counts_nothing() -> None:
    receiver = Receiver()
    trim = IdleTrim(lambda: receiver.seen, lambda: False, lambda: False, 60)
    receiver.seen = 1
    assert not trim.check() and trim.releases == 0


def test_the_thread_checks_on_its_own_and_stops() -> None:
    receiver = Receiver()
    receiver.seen = 1
    trim = trim_for(receiver, interval=0.05).start()
    deadline = time.monotonic() + 5
    while receiver.released == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    trim.stop()
    assert receiver.released == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_is_called_for_real() -> None:
    blocks = [bytes(40_000) for _ in range(2000)]   # ~80 MB through malloc, then freed
    del blocks
    assert release_free_memory() is True


def test_arenas_are_shared_unless_the_environment_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.receiver.memory import share_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not share_arenas()
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert share_arenas() == sys.platform.startswith("linux")  # (glibc here)
