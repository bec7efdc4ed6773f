"""Structured JSON-lines logging with the service name and the series/study in hand."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_CONTEXT_FIELDS = ("event_type", "event_id", "series_uid", "study_uid", "sop_uid", "task_id",
                   "correlation_id", "target", "rule")


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value:
                line[field] = value
        extra = getattr(record, "data", None)
        if isinstance(extra, dict):
            line.update(extra)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom is chatty at INFO (one line per PDU); its warnings still come through.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # ...except the warning for each UID in a proposed presentation context that is not a transfer
    # syntax it knows: how many there are is the peer's choice (one A-ASSOCIATE-RQ of 60 KB wrote
    # 28,200 lines, 6.9 MB, into the receiver's log, whose rotation then drops the older logs).
    logging.getLogger("pynetdicom.presentation").setLevel(logging.ERROR)
    logging.getLogger("nats").setLevel(logging.WARNING)
