"""Ingest's direct path (no journal) on a real file system that runs out of space."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from bench.common import make_series
from conftest import tmpfs
from services.receiver.ingest import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    AssociationInfo,
    Ingest,
    LocalBlobWriter,
)
from shared.blobstore import LocalBlobStore
from shared.config.model import SettingsItem
from shared.events import Event


@pytest.fixture
def small_store(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs: room for one 530 KB CT image, not two."""
    with tmpfs(tmp_path / "blobs", "1m") as root:
        yield root


def test_direct_path_refuses_when_the_disk_is_full_and_leaves_no_temp_file(
        small_store: Path, tmp_path: Path) -> None:
    published: list[Event] = []

    def publish(event: Event, timeout: float) -> Future[int]:
        published.append(event)
        done: Future[int] = Future()
        done.set_result(len(published))
        return done

    settings = SettingsItem(min_free_space_mb=0)
    ingest = Ingest(LocalBlobWriter(LocalBlobStore(small_store)), publish, lambda: settings)
    assoc = AssociationInfo("a1", "MODALITY", "CADUCEUS", "127.0.0.1", 1234)
    first, second = (path.read_bytes() for path in sorted(make_series(tmp_path / "ct", 2, size=512).iterdir()))
    assert len(first) > 512 * 1024

    assert ingest.store(assoc, first, "1.2.840.10008.1.2.1", "") == STATUS_SUCCESS
    assert ingest.store(assoc, second, "1.2.840.10008.1.2.1", "") == STATUS_OUT_OF_RESOURCES
    assert [e.type for e in published] == ["image.received", "image.rejected"]
    assert "write failed" in published[1].payload["reason"]
    assert list((small_store / ".tmp").iterdir()) == []  # the partial temp file went

    (small_store / published[0].payload["blob_key"]).unlink()  # space returns
    assert ingest.store(assoc, second, "1.2.840.10008.1.2.1", "") == STATUS_SUCCESS
    assert published[-1].type == "image.received"
    assert (small_store / published[-1].payload["blob_key"]).read_bytes() == second
    assert list((small_store / ".tmp").iterdir()) == []
