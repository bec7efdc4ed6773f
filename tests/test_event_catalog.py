"""The catalog in docs/events.md must name every event type the code defines, with its payload fields."""

import re
from pathlib import Path

from shared import subjects
from shared.events import PAYLOADS

CATALOG = Path(__file__).resolve().parent.parent / "docs" / "events.md"


def _event_rows() -> dict[str, str]:
    """Event type -> its catalog row (type | subject | publisher | consumers | payload)."""
    rows = [line for line in CATALOG.read_text().splitlines() if line.startswith("| `") and "caduceus." in line]
    return {line.split("`")[1]: line for line in rows}


def test_every_event_type_is_documented() -> None:
    text = CATALOG.read_text()
    missing = [t for t in PAYLOADS if f"`{t}`" not in text]
    assert not missing, f"event types missing from docs/events.md: {missing}"


def test_every_documented_event_row_exists_in_code() -> None:
    durables = {d.name for d in vars(subjects).values() if isinstance(d, subjects.Durable)}
    streams = {subjects.EVENTS_STREAM, subjects.CONFIG_STREAM, subjects.STATUS_STREAM}
    unknown = set(_event_rows()) - set(PAYLOADS) - durables - streams
    assert not unknown, f"docs/events.md documents event types the code does not define: {unknown}"


def test_every_payload_field_is_documented_in_its_row() -> None:
    rows = _event_rows()
    missing: dict[str, list[str]] = {}
    for event_type, model in PAYLOADS.items():
        payload_column = rows[event_type].rstrip(" |").rsplit(" | ", 1)[-1]
        words = set(re.findall(r"[a-z_0-9]+", payload_column))
        absent = [field for field in model.model_fields if field not in words]
        if absent:
            missing[event_type] = absent
    assert not missing, f"payload fields missing from their row in docs/events.md: {missing}"
