"""`caduceus config apply` against a whole `caduceus up`: it returns once all seven services (the
receiver's worker process included) use the change, and names a service that does not."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.harness import Caduceus, settings_doc

SERVICES = ("bookkeeper", "cleaner", "dispatcher", "processor", "receiver", "router", "ui")


def _file(tmp_path: Path, **settings: object) -> Path:
    path = tmp_path / f"config-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump({"settings": settings_doc(**settings)}))
    return path


def _lines(output: str, state: str) -> set[str]:
    """The services whose line in `config apply`'s report says `state`."""
    return {line.split()[0] for line in output.splitlines() if line.startswith("  ") and state in line}


def test_apply_confirms_every_service_and_names_one_that_hangs(
        tmp_path: Path, caduceus_factory: Callable[..., Caduceus]) -> None:
    cad = caduceus_factory(config={"settings": settings_doc()})
    result = cad.cli("config", "apply", str(_file(tmp_path, dispatch_retries=3)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in use by every running service (7 instance(s)" in result.stdout, result.stdout
    assert _lines(result.stdout, " applied") == set(SERVICES), result.stdout
    seq = len(cad.config_events())

    status = cad.cli("status").stdout
    assert sum(1 for line in status.splitlines() if f"config {seq}" in line) == 7, status
    assert "BEHIND" not in status

    cleaner = cad.pid("cleaner")
    os.kill(cleaner, signal.SIGSTOP)   # alive and recently heard from, but applies nothing
    try:
        started = time.monotonic()
        result = cad.cli("config", "apply", str(_file(tmp_path, dispatch_retries=4)), "--wait", "2")
        assert time.monotonic() - started < 20
        assert result.returncode == 5, result.stdout + result.stderr
        assert "NOT CONFIRMED: 1 of 7 running instance(s)" in result.stdout, result.stdout
        assert _lines(result.stdout, f"NOT APPLIED (still at {seq};") == {"cleaner"}, result.stdout
        assert _lines(result.stdout, " applied") == set(SERVICES) - {"cleaner"}, result.stdout
    finally:
        os.kill(cleaner, signal.SIGCONT)
    result = cad.cli("config", "apply", str(_file(tmp_path, dispatch_retries=4)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("no changes\n") and _lines(result.stdout, " applied") == set(SERVICES)
