from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import Peer, make_series, start_receiver


@pytest.fixture
def receiver(nats_url: str, data_dir: Path, tmp_path: Path) -> Iterator[Peer]:
    peer = start_receiver(nats_url, data_dir, env={"CADUCEUS_RECEIVER_PUBLISH_TIMEOUT": "1.5"},
                          log_path=tmp_path / "receiver.log")
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def series5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_series(tmp_path_factory.mktemp("series") / "s", 5, size=64)
