"""Fixtures for the project-wide tests (the root conftest.py has NATS, Postgres and the bus)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cli.main import main

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(nats_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`caduceus ARGV...` in this process against the test's NATS: (exit code, stdout, stderr)."""
    monkeypatch.setenv("CADUCEUS_NATS_URL", nats_url)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
