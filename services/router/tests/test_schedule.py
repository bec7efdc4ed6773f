"""When the router checks for completion: at the earliest due moment, not only on the 1 s tick."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from services.router import service
from services.router.service import TICK_SECONDS, RouterService
from services.router.state import RouterState
from shared.bus import Bus
from shared.config.model import CaduceusConfig
from shared.config.state import ConfigFollower
from shared.events import Event, ImageReceived, make_event
from shared.settings import Settings


def image(seq: int, series: str, arrived: datetime) -> Event:
    event = make_event("image.received", "receiver", ImageReceived(
        sop_class_uid="1.2", transfer_syntax_uid="1.2.840.10008.1.2.1", blob_key=f"instances/{seq}", size=1,
        sha256="0", calling_aet="A", called_aet="B", peer_host="127.0.0.1", peer_port=1, association_id="x",
        tags={"Modality": "CT"}), study_uid="1", series_uid=series, sop_uid=f"{series}.{seq}")
    event.stream_seq = seq
    event.recorded_at = arrived
    return event


def router_with(config: dict[str, object], data_dir: Path) -> RouterService:
    router = RouterService(Settings(data_dir=data_dir))
    # _tick only reads the configuration and, for due batches, publishes; nothing is due here.
    router.config_follower = ConfigFollower(cast(Bus, None))
    router.config_follower.config = CaduceusConfig.parse(config)
    return router


async def test_next_check_is_the_earliest_due_series(data_dir: Path) -> None:
    router = router_with({"settings": {"series_complete_seconds": 0.5}, "rules": {
        "fast-lane": {"filter": "@Modality@ == 'CT'", "targets": [], "action": "discard",
                      "series_complete_seconds": 0.3}}}, data_dir)
    now = datetime.now(UTC)
    router.state.apply(image(1, "1.1", now - timedelta(seconds=0.1)))
    router.state.apply(image(2, "1.2", now))
    await router._tick()
    # Series 1.1 is due first: last arrival + the rule's 0.3 s override.
    assert router._next_tick == pytest.approx((now + timedelta(seconds=0.2)).timestamp(), abs=1e-3)
    assert set(router.state.series) == {"1.1", "1.2"}


async def test_without_open_series_the_next_check_is_one_tick_away(data_dir: Path) -> None:
    router = router_with({"settings": {"series_complete_seconds": 60}}, data_dir)
    router.state.apply(image(1, "1.1", datetime.now(UTC)))
    before = time.time()
    await router._tick()
    assert before + TICK_SECONDS <= router._next_tick <= time.time() + TICK_SECONDS


async def test_series_falling_due_together_are_checked_together(data_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # A long minimum spacing, so the series is certainly not due yet when _tick runs.
    monkeypatch.setattr(service, "MIN_TICK_SECONDS", 5.0)
    router = router_with({"settings": {"series_complete_seconds": 2}}, data_dir)
    router.state.apply(image(1, "1.1", datetime.now(UTC) - timedelta(seconds=1)))
    before = time.time()
    await router._tick()
    # Due in about 1 s, but a crowd of series falling due one after another must not make the
    # router spin: the next check waits for the minimum spacing.
    assert router._next_tick >= before + 5.0


def test_last_arrival_follows_added_instances() -> None:
    state = RouterState()
    start = datetime.now(UTC)
    state.apply(image(1, "1.1", start))
    batch = state.series["1.1"]
    assert batch.last_arrival == start
    state.apply(image(2, "1.1", start + timedelta(seconds=3)))
    state.apply(image(3, "1.1", start + timedelta(seconds=2)))
    assert batch.last_arrival == start + timedelta(seconds=3)
    follower = batch.split_after(2)
    assert follower is not None and follower.last_arrival == start + timedelta(seconds=2)
