"""FileWriter: large instances with O_DIRECT, small ones and unsupported filesystems without."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from services.receiver import filewrite
from services.receiver.filewrite import BUFFERS, CHUNK, DIRECT_MIN_BYTES, FileWriter

SIZES = [0, 1, 4096, DIRECT_MIN_BYTES - 1, DIRECT_MIN_BYTES, 530_123, CHUNK, 3 * CHUNK + 17]


def _write(writer: FileWriter, path: Path, data: bytes) -> None:
    fd = writer.write_new(path, data)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_the_data(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    writer = FileWriter()
    _write(writer, tmp_path / "f.dcm", data)
    assert (tmp_path / "f.dcm").read_bytes() == data


def test_large_writes_use_o_direct_where_supported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[int] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777) -> int:
        opened.append(flags)
        return real_open(path, flags, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(filewrite.os, "open", spy)
    writer = FileWriter()
    _write(writer, tmp_path / "small", os.urandom(1000))
    _write(writer, tmp_path / "large", os.urandom(600_000))
    assert not opened[0] & os.O_DIRECT
    if writer.direct_io:  # the test directory's filesystem supports O_DIRECT
        assert opened[1] & os.O_DIRECT
    assert (tmp_path / "large").stat().st_size == 600_000


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_without_o_direct_falls_back_to_plain_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   refused_at: str) -> None:
    """As on filesystems that refuse O_DIRECT with EINVAL, at open (older tmpfs) or at the first write."""
    real_open, real_write, direct_fds = os.open, os.write, set()

    def open_(path: object, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real_open(path, flags & ~os.O_DIRECT, mode)  # type: ignore[arg-type]
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def write(fd: int, data: object) -> int:
        if fd in direct_fds:  # the first write; the writer then clears O_DIRECT and writes plainly
            direct_fds.discard(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(filewrite.os, "open", open_)
    monkeypatch.setattr(filewrite.os, "write", write)
    writer = FileWriter()
    data = os.urandom(700_001)
    direct_fds.clear()
    _write(writer, tmp_path / "a", data)
    direct_fds.clear()  # the descriptor number is reused by the next file
    _write(writer, tmp_path / "b", data)
    assert (tmp_path / "a").read_bytes() == data == (tmp_path / "b").read_bytes()
    assert not writer.direct_io  # given up after the first refusal


def test_more_writers_than_buffers_still_write_everything(tmp_path: Path) -> None:
    writer = FileWriter()
    taken = [writer._take_buffer() for _ in range(BUFFERS)]
    assert writer._take_buffer() is None
    data = os.urandom(400_000)
    _write(writer, tmp_path / "f", data)  # no buffer free: through the page cache
    assert (tmp_path / "f").read_bytes() == data
    for buffer in taken:
        if buffer is not None:
            writer._buffers.put(buffer)


def test_a_failed_write_removes_the_file_and_returns_the_buffer(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    writer = FileWriter()
    real_write = os.write
    calls = 0

    def failing_write(fd: int, data: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)  # type: ignore[arg-type]

    monkeypatch.setattr(filewrite.os, "write", failing_write)
    with pytest.raises(OSError) as raised:
        writer.write_new(tmp_path / "f", os.urandom(CHUNK + 5000))
    assert raised.value.errno == errno.ENOSPC
    assert not (tmp_path / "f").exists()
    monkeypatch.undo()
    free = [writer._take_buffer() for _ in range(BUFFERS)]
    assert all(buffer is not None for buffer in free) or not writer.direct_io
