"""Alembic migrations from an empty database, on both backends; the models match the migrations."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from services.bookkeeper.db import alembic_config, create_db_engine, normalize_url, upgrade
from services.bookkeeper.models import is_search_index_table, metadata

TABLES = {"events", "event_duplicates", "projection_cursors", "series", "tasks", "config_items", "services"}


def test_upgrade_from_empty_matches_models(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        assert not set(inspect(engine).get_table_names()) & TABLES
        upgrade(engine)
        upgrade(engine)  # at head already: a no-op
        assert set(inspect(engine).get_table_names()) >= TABLES | {"alembic_version"}
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert [d for d in diff if not _foreign_table(d)] == []
        command.downgrade(alembic_config(engine), "base")
        assert not set(inspect(engine).get_table_names()) & TABLES
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def _foreign_table(diff: object) -> bool:
    """Other services' SQLModel tables may share the global metadata in a full test run; the search
    index (migration 0003) is per backend and outside the metadata on purpose (models.py)."""
    if isinstance(diff, tuple) and diff[0] == "remove_table" and is_search_index_table(diff[1].name):
        return True
    if isinstance(diff, tuple) and diff[0] == "remove_index" and is_search_index_table(diff[1].table.name):
        return True
    return isinstance(diff, tuple) and diff[0] == "add_table" and diff[1].name not in TABLES


def test_plain_postgres_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u:p@h:5432/db") == "postgresql+psycopg://u:p@h:5432/db"
    assert normalize_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalize_url("postgresql+psycopg://h/db") == "postgresql+psycopg://h/db"
    assert normalize_url("sqlite:////tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"
