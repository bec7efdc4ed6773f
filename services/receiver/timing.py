"""Per-image wall-clock breakdown of the C-STORE path, for performance work.

`CADUCEUS_RECEIVER_TIMING=1` gives each association a PhaseTimer; when the association ends the
receiver logs the mean milliseconds per image of each phase ("association timing"). "between" is
the time from one handler's return to the next handler's start: the response going out, the
sender's next request and pynetdicom receiving and assembling it. Off by default (it costs a few
perf_counter_ns calls per image, and a log line per association).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict


def enabled() -> bool:
    return os.environ.get("CADUCEUS_RECEIVER_TIMING", "0") == "1"


class PhaseTimer:
    def __init__(self) -> None:
        self.totals_ns: dict[str, int] = defaultdict(int)
        self.images = 0
        self.last_end: int | None = None

    def start_image(self) -> int:
        now = time.perf_counter_ns()
        if self.last_end is not None:
            self.totals_ns["between"] += now - self.last_end
        self.images += 1
        return now

    def mark(self, phase: str, since: int) -> int:
        """Add the time since `since` to `phase`; return now (the start of the next phase)."""
        now = time.perf_counter_ns()
        self.totals_ns[phase] += now - since
        return now

    def end_image(self) -> None:
        self.last_end = time.perf_counter_ns()

    def summary(self) -> dict[str, float]:
        images = max(self.images, 1)
        result = {phase: round(total / images / 1e6, 3) for phase, total in self.totals_ns.items()}
        result["images"] = self.images
        return result
