"""How long the EVENTS stream keeps events: the bookkeeper owns that, its database being the permanent log.

Every process declares the streams (shared/bus.py), but only the bookkeeper changes the EVENTS
stream's max age: to `settings.events_retention_days`, and never below the longest wait the
configuration allows plus a margin (`CaduceusConfig.longest_stream_wait_seconds`), even if an
unvalidated configuration asks for less. Lengthening is applied at once. Shortening deletes the
events older than the new limit, so it goes only as far as no reader still needs them: the oldest
event some durable consumer has not acknowledged (the bookkeeper's own, the dispatchers', the
processor's) or the router's checkpoint (the first event of its oldest open series or study) must
stay at least a day inside the limit; the rest of the way follows day by day as those move on.

The same reading shows an operator what is at risk: the bookkeeper's heartbeat names the reader
that holds the oldest event and its age, and once that age passes half the retention it raises a
warning alert (once a day): a reader stopped that long loses events when they reach the limit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError

from shared import subjects
from shared.config.model import DAY_SECONDS, RETENTION_MARGIN_SECONDS, CaduceusConfig

log = logging.getLogger(__name__)

ROUTER = "router checkpoint"


@dataclass(frozen=True)
class OldestNeeded:
    """The oldest event on the stream that a reader still needs."""

    reader: str          # a durable consumer's name, or ROUTER
    stream_seq: int
    occurred_at: datetime

    def age_seconds(self, now: datetime) -> float:
        return max(0.0, (now - self.occurred_at).total_seconds())


def wanted_max_age(config: CaduceusConfig) -> float:
    """The configured retention in seconds, raised to what the configured waits need."""
    wait, _ = config.longest_stream_wait_seconds()
    return max(config.settings.events_retention_days * DAY_SECONDS, wait + RETENTION_MARGIN_SECONDS)


def next_max_age(current: float, wanted: float, oldest: OldestNeeded | None, now: datetime) -> float:
    """The max age to set now (`current` means no change).

    Shortening stops a day short of the oldest needed event, rounded up to whole days so that the
    stream is updated at most once a day while that event ages.
    """
    if wanted >= current:
        return wanted
    if oldest is None:
        return wanted
    keep = math.ceil((oldest.age_seconds(now) + DAY_SECONDS) / DAY_SECONDS) * DAY_SECONDS
    target = max(wanted, float(keep))
    return target if target < current else current


async def oldest_needed(js: JetStreamContext) -> OldestNeeded | None:
    """The oldest EVENTS event that a durable consumer has not acknowledged or the router still needs."""
    info = await js.stream_info(subjects.EVENTS_STREAM)
    first, last = info.state.first_seq, info.state.last_seq
    candidates: list[tuple[int, str]] = []
    for consumer in await js.consumers_info(subjects.EVENTS_STREAM):
        if not consumer.config.durable_name:
            continue   # ordered readers (replays, config followers) hold nothing back
        if not (consumer.num_pending or 0) and not (consumer.num_ack_pending or 0):
            continue
        floor = (consumer.ack_floor.stream_seq or 0) if consumer.ack_floor else 0
        candidates.append((floor + 1, consumer.name))
    router_seq = await _router_checkpoint(js)
    if router_seq is not None:
        candidates.append((router_seq, ROUTER))
    candidates = [(max(seq, first), reader) for seq, reader in candidates if seq <= last]
    if not candidates:
        return None
    seq, reader = min(candidates)
    msg = await js.get_msg(subjects.EVENTS_STREAM, seq)
    occurred_at = msg.time or datetime.now(UTC)
    return OldestNeeded(reader=reader, stream_seq=seq, occurred_at=occurred_at)


async def _router_checkpoint(js: JetStreamContext) -> int | None:
    try:
        kv = await js.key_value(subjects.ROUTER_STATE_BUCKET)
        entry = await kv.get(subjects.ROUTER_CHECKPOINT_KEY)
    except (BucketNotFoundError, NotFoundError, KeyError):
        return None
    try:
        return int((entry.value or b"").decode())
    except ValueError:
        return None


async def set_max_age(js: JetStreamContext, max_age: float) -> None:
    """Update the EVENTS stream to our declaration with this max age."""
    await js.update_stream(subjects.events_stream_config(max_age / DAY_SECONDS))
