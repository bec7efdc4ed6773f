"""Process-level settings, read from CADUCEUS_* environment variables.

These are the few things a process needs before it can reach the bus (where the rest of the
configuration lives, as events on the CONFIG stream).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CADUCEUS_", extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server(s), comma separated")
    database_url: str = Field(default="", description="SQLAlchemy URL of the bookkeeper database; "
                              "empty means SQLite under the data dir")
    data_dir: Path = Field(default=Path("./caduceus-data"))
    blob_store: str = Field(default="local", description="'local' (data dir) or 'nats' (JetStream object store)")
    log_level: str = "INFO"
    # `caduceus up` keeps each service's log (and NATS's) under <data dir>/logs, rotated by size:
    # the current file plus log_files_kept older ones of up to log_max_mb each.
    log_max_mb: int = Field(default=50, ge=1, le=100_000)
    log_files_kept: int = Field(default=5, ge=1, le=1000)
    heartbeat_seconds: float = 5.0
    # Receiver listens here (the launcher passes --dicom-port through this variable).
    dicom_port: int = 11112
    dicom_host: str = "0.0.0.0"
    ui_port: int = 8080
    ui_host: str = "127.0.0.1"
    # The receiver's write-ahead journal (services/receiver/journal.py): an instance of up to
    # receiver_journal_max_kb is accepted once it is in the journal; a larger one once its own blob
    # file is fsynced and its event is in the journal (or, without the journal, stored by
    # JetStream). 0 turns the journal off.
    receiver_journal_max_kb: int = Field(default=256, ge=0, le=8192)
    receiver_journal_mb: int = Field(default=1024, ge=64, description="room for instances not yet applied")
    receiver_journal_segment_mb: int = Field(default=32, ge=16, le=1024)
    # A receiver worker process that sends its supervisor no report for this long is killed and
    # replaced (services/receiver/workers.py); it reports every 2 s.
    receiver_worker_hung_seconds: float = Field(default=60, ge=5, le=3600)
    # One journal directory per receiver process (the supervisor: main, its workers: w1, w2, ...).
    receiver_journal_slot: str = Field(default="main", pattern=r"^[A-Za-z0-9_-]{1,40}$")
    # Receiver processes behind the DICOM port: `auto` (2 on 2+ cores) or a number (services/receiver/workers.py).
    receiver_workers: str = "auto"
    # How long the receiver waits for JetStream to store an event it must have before answering.
    receiver_publish_timeout: float = Field(default=5.0, gt=0, le=300)
    # The receiver's GIL switch interval (services/receiver/__main__.py says why it is short).
    receiver_switch_interval: float = Field(default=0.0005, gt=0, le=1)
    # Redelivery after a crashed dispatcher happens after ack_wait; a live one sends in_progress
    # every third of it, so a long send is never handed to a second process.
    dispatch_ack_wait_seconds: float = Field(default=60.0, ge=1, le=3600)
    # Tasks one dispatcher process runs at once: one dead destination must not hold up the others.
    dispatch_concurrency: int = Field(default=4, ge=1, le=64)
    # At least one of every N pulls goes to normal work first, so urgent work cannot starve it.
    dispatch_normal_every: int = Field(default=4, ge=1, le=100)
    # Name of this process instance (several dispatchers may run): defaults to <service>-<host>-<pid>.
    instance: str = ""

    @field_validator("receiver_workers")
    @classmethod
    def _workers_auto_or_count(cls, value: str) -> str:
        text = value.strip().lower()
        if text != "auto" and not (text.isdigit() and 1 <= int(text) <= 99):
            raise ValueError("must be `auto` or a number of processes from 1 to 99")
        return text

    @property
    def log_max_bytes(self) -> int:
        return self.log_max_mb * 1024 * 1024

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'bookkeeper.sqlite').resolve()}"


def load_settings() -> Settings:
    return Settings()


# Written by `caduceus up` into its data dir: the embedded NATS URL and the service pids.
UP_STATE_FILE = "caduceus-up.json"


class NoCaduceusFound(LookupError):
    """A CLI command was not told which NATS to use and found no running `caduceus up`."""


def cli_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data dir a CLI command means: --data-dir, else CADUCEUS_DATA_DIR, else ./caduceus-data."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ.get("CADUCEUS_DATA_DIR") or "./caduceus-data")


def nats_url_for_cli(data_dir: str | Path | None = None, nats_url: str | None = None) -> str:
    """The NATS URL a CLI command should use.

    --nats-url, else CADUCEUS_NATS_URL, else the URL of the embedded NATS that `caduceus up`
    recorded in `<data dir>/caduceus-up.json` (so commands run from another shell find it).
    Nothing is guessed beyond that: a NATS on the default port may be somebody else's, and a
    command would declare caduceus's streams there and show (or change) a configuration that is
    not the one in use.
    """
    explicit = nats_url or os.environ.get("CADUCEUS_NATS_URL")
    if explicit:
        return explicit
    url = up_state(data_dir).get("nats_url")
    if url:
        return str(url)
    raise NoCaduceusFound(
        f"no running `caduceus up` found in {cli_data_dir(data_dir)} (no {UP_STATE_FILE}): start it, "
        "pass --data-dir with the data dir it runs on, or --nats-url (or CADUCEUS_NATS_URL) for an external NATS")


def up_state(data_dir: str | Path | None = None) -> dict[str, object]:
    """What a running `caduceus up` recorded in its data dir (empty when none did)."""
    try:
        state = json.loads((cli_data_dir(data_dir) / UP_STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
