"""When work may run: the off-peak window and the retry back-off."""

from __future__ import annotations

from datetime import datetime, time, timedelta

from shared.runtime import retry_delay


def _parse(hhmm: str) -> time:
    hours, minutes = hhmm.split(":")
    return time(int(hours), int(minutes))


def seconds_until_offpeak(now: datetime, start: str, end: str) -> float:
    """0 inside the window [start, end) (local wall clock; may wrap midnight), else the wait until start."""
    begin, finish = _parse(start), _parse(end)
    current = now.time()
    if begin == finish:
        return 0.0  # a window of zero length would never open: read it as "always"
    inside = begin <= current < finish if begin < finish else (current >= begin or current < finish)
    if inside:
        return 0.0
    opening = datetime.combine(now.date(), begin, tzinfo=now.tzinfo)
    if opening <= now:
        opening += timedelta(days=1)
    return (opening - now).total_seconds()


def attempt_delay(attempt: int, wait_seconds: float, max_wait_seconds: float) -> float:
    """Back-off after failed attempt n: wait * 2^(n-1), capped."""
    return retry_delay(attempt, base=wait_seconds, cap=max_wait_seconds)
