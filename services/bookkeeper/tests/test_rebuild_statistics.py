"""Rebuild refreshes the planner's statistics as it grows the projections (Postgres only)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from services.bookkeeper.models import PROJECTION_TABLES
from services.bookkeeper.projector import _StatisticsRefresh


class RecordingConnection:
    def __init__(self, dialect: str) -> None:
        self.dialect = SimpleNamespace(name=dialect)
        self.statements: list[str] = []

    def exec_driver_sql(self, statement: str) -> Any:
        self.statements.append(statement)


def test_analyze_after_geometric_steps_on_postgres() -> None:
    conn = RecordingConnection("postgresql")
    refresh = _StatisticsRefresh(conn)  # type: ignore[arg-type]
    analyzed_at = []
    for applied in range(1000, 200_001, 1000):  # one call per chunk, as advance() makes them
        before = len(conn.statements)
        refresh(applied)
        if len(conn.statements) > before:
            analyzed_at.append(applied)
    assert analyzed_at == [10_000, 40_000, 160_000]
    assert conn.statements[:len(PROJECTION_TABLES)] == [f"ANALYZE {t.name}" for t in PROJECTION_TABLES]


def test_sqlite_is_left_alone() -> None:
    conn = RecordingConnection("sqlite")
    refresh = _StatisticsRefresh(conn)  # type: ignore[arg-type]
    for applied in range(1000, 100_001, 1000):
        refresh(applied)
    assert conn.statements == []
