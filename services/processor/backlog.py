"""How much work waits in a durable consumer (read from JetStream, reported in the heartbeat)."""

from __future__ import annotations

from typing import Any

from shared.bus import Bus
from shared.subjects import Durable


async def read_backlog(bus: Bus, durable: Durable) -> dict[str, Any]:
    info = await bus.js.consumer_info(durable.stream, durable.name)
    return {"work_pending": int(info.num_pending or 0), "work_ack_pending": int(info.num_ack_pending or 0)}
