"""The catalog in docs/events.md must name every event type the code defines."""

from pathlib import Path

from shared.events import PAYLOADS

CATALOG = Path(__file__).resolve().parent.parent / "docs" / "events.md"


def test_every_event_type_is_documented() -> None:
    text = CATALOG.read_text()
    missing = [t for t in PAYLOADS if f"`{t}`" not in text]
    assert not missing, f"event types missing from docs/events.md: {missing}"


def test_every_documented_event_row_exists_in_code() -> None:
    rows = [line for line in CATALOG.read_text().splitlines() if line.startswith("| `") and "caduceus." in line]
    documented = {line.split("`")[1] for line in rows}
    durables_and_streams = {"bookkeeper-events", "bookkeeper-config", "dispatcher-urgent", "dispatcher-normal",
                            "processor", "cleaner", "EVENTS", "CONFIG", "STATUS"}
    unknown = documented - set(PAYLOADS) - durables_and_streams
    assert not unknown, f"docs/events.md documents event types the code does not define: {unknown}"
