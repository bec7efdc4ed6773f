"""Fixtures for every test: a real nats-server from the wheel, real databases, temp data dirs.

Nothing here mocks NATS or the database. A missing component fails the test (CI installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from shared import subjects
from shared.bus import Bus
from shared.natsserver import EmbeddedNats

# Real DICOM peers (DCMTK storescp, Orthanc) as fixtures for any test.
pytest_plugins = ["tests.peers"]


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A small file system of its own at `directory` (created), to fill up: root only."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)

async def expire_events(bus: Bus, through_seq: int, timeout: float = 30) -> None:
    """Let the EVENTS stream drop everything up to `through_seq`, as if its retention had passed: it
    keeps events a second from now on (put `subjects.events_stream_config()` back to keep them)."""
    short = subjects.events_stream_config(1 / 86400)
    short.duplicate_window = 1   # JetStream's de-duplication window may not outlast max age
    await bus.js.update_stream(short)
    deadline = time.monotonic() + timeout
    while (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.first_seq <= through_seq:
        assert time.monotonic() < deadline, "the events did not expire"
        await asyncio.sleep(0.2)


POSTGRES_ADMIN_URL = os.environ.get("CADUCEUS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    connected = await Bus.connect(nats_url, actor="test")
    yield connected
    await connected.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def _create_postgres_database() -> tuple[str, str]:
    import psycopg

    name = f"caduceus_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)


def _drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name, url = _create_postgres_database()
    yield url
    _drop_postgres_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs once per bookkeeper backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bookkeeper.sqlite'}"
        return
    name, url = _create_postgres_database()
    yield url
    _drop_postgres_database(name)
