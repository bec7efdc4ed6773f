"""The series browser search (queries.series_search_condition) on both backends.

Contract: the indexed search (migration 0003: pg_trgm on Postgres, FTS5 trigram on SQLite) returns
exactly what the original full scan `lower(column) LIKE '%needle%'` returned, for any needle (short,
mixed case, non-ASCII, LIKE wildcards, quotes, the index's field separator); the index follows
every change of a series and `rebuild`; where the trigram machinery is missing, the search falls
back to the scan with the same results.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import Connection, Engine, func, or_, select, text
from sqlalchemy.engine import make_url

from conftest import POSTGRES_ADMIN_URL
from services.bookkeeper.db import create_db_engine, open_database, upgrade
from services.bookkeeper.models import SEARCH_COLUMNS, SERIES
from services.bookkeeper.projector import rebuild
from services.bookkeeper.queries import _like_escape, series
from services.bookkeeper.store import record_from_event, write_batch
from services.bookkeeper.tests.scenario import image
from shared.bookkeeper_client import SeriesRequest

ROOT = "1.2.826.0.1.3680043.10.777"

# (patient name, patient id, series description): values chosen to trip each way the index could
# disagree with the scan. "" becomes NULL in the projection (series_on_image keeps the old value).
PATIENTS = [
    ("Doe^Jane", "PID-0001", "Thorax CT"),
    ("DOE^JOHN", "pid-0002", "THORAX low dose"),
    ("MÜLLER^Jörg", "PID-0003", "Schädel nativ"),
    ("O'Brien^Ann", "100%_sure\\x", 'Knee "left"'),
    ("\u212aelvin^Sign", "PID-0005", "Kelvin sign folds to k in Unicode, not in SQLite"),
    ("ΣΊΣΥΦΟΣ^Γιάννης", "PID-0006", "Κεφαλή"),
    ("Field\x1fSeparator", "PID-0007", "unit separator inside a value"),
    ("", "", ""),
    ("Anonymous", "ANON", "doe^jane lookalike in the description"),
]

NEEDLES = [
    "doe", "DOE^J", "jane", "Doe^Jane", "pid-000", "PID-0001", "thorax", "THORAX LOW", "low dose",
    "müller", "MÜLLER", "jörg", "schädel", "SCHÄDEL",
    "%", "_", "%_", "100%", "0%_s", "\\", "\\x", "_sure\\", "o'b", "'", '"left"', '"',
    "kelvin", "\u212aelvin", "sign", "σίσ", "ΣΊΣ", "κεφαλή",
    "field\x1fsep", "\x1f", "d\x1fs", "ce\x1fpid", "jane\x1fpid",
    ROOT, ROOT + ".3.", ".3.1", "10.777", "  ", "e^j", "zzz", "qqqq",
    "d", "D", "e^", "00", "1.", "xx", "%%", "__",
]


def series_uid(n: int) -> str:
    return f"{ROOT}.{n // 3}.{n}"


def study_uid(n: int) -> str:
    return f"{ROOT}.{n // 3}"


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = open_database(database_url)
    yield engine
    engine.dispose()


def write_patients(engine: Engine, patients: list[tuple[str, str, str]], first_seq: int = 1, images: int = 2,
                   first_series: int = 0) -> int:
    """One series per patient (images of the same tags); returns the next stream sequence."""
    records = []
    seq = first_seq
    for offset, (name, pid, description) in enumerate(patients):
        n = first_series + offset
        for i in range(images):
            event = image(study_uid(n), series_uid(n), i, PatientName=name, PatientID=pid,
                          SeriesDescription=description)
            records.append(record_from_event(event, "EVENTS", seq, None))
            seq += 1
    write_batch(engine, records)
    return seq


def scan(conn: Connection, needle: str) -> list[str]:
    """The series browser search as it was before the index: the reference semantics."""
    pattern = f"%{_like_escape(needle.lower())}%"
    where = or_(*(func.lower(SERIES.c[c]).like(pattern, escape="\\") for c in SEARCH_COLUMNS))
    return sorted(conn.execute(select(SERIES.c.series_uid).where(where)).scalars())


def search(engine: Engine, needle: str, **filters: Any) -> list[str]:
    with engine.connect() as conn:
        result = series(conn, SeriesRequest(search=needle, limit=1000, **filters))
    assert result.total == len(result.series)
    return sorted(s.series_uid for s in result.series)


def assert_same_as_scan(engine: Engine) -> None:
    with engine.connect() as conn:
        expected = {needle: scan(conn, needle) for needle in NEEDLES}
    assert {needle: search(engine, needle) for needle in NEEDLES} == expected


def test_indexed_search_returns_what_the_scan_returns(engine: Engine) -> None:
    write_patients(engine, PATIENTS)
    assert_same_as_scan(engine)
    # The reference itself, spelled out for needles whose answer does not depend on the backend.
    assert search(engine, "doe") == [series_uid(0), series_uid(1), series_uid(8)]
    assert search(engine, "DOE^JOHN") == [series_uid(1)]
    assert search(engine, "100%_") == [series_uid(3)]
    assert search(engine, "%") == [series_uid(3)]
    assert search(engine, "_") == [series_uid(3)]
    assert search(engine, '"left"') == [series_uid(3)]
    assert search(engine, "\\x") == [series_uid(3)]
    assert search(engine, "jane\x1fpid") == []  # never across two fields
    assert search(engine, "field\x1fsep") == [series_uid(6)]  # a separator inside one value does match
    assert search(engine, "zzz") == [] and search(engine, "xx") == []
    assert search(engine, "d") == sorted(series_uid(n) for n in (0, 1, 2, 4, 5, 6, 8))
    assert search(engine, ROOT) == [series_uid(n) for n in range(len(PATIENTS))]


def test_search_combines_with_filters_and_pages(engine: Engine) -> None:
    write_patients(engine, PATIENTS)
    assert search(engine, "doe", patient_id="pid-0002") == [series_uid(1)]
    assert search(engine, "doe", study_uid=study_uid(8)) == [series_uid(8)]
    with engine.connect() as conn:
        pages = [series(conn, SeriesRequest(search="thorax", limit=1, offset=i)) for i in range(3)]
    assert [p.total for p in pages] == [2, 2, 2]
    assert sorted(s.series_uid for p in pages for s in p.series) == [series_uid(0), series_uid(1)]


def test_index_follows_changes_and_rebuild(engine: Engine) -> None:
    seq = write_patients(engine, PATIENTS)
    assert search(engine, "doe^jane") == [series_uid(0), series_uid(8)]
    # A later image of series 0 with corrected demographics: the projection (and the index) change.
    seq = write_patients(engine, [("Roe^Richard", "PID-0001", "Thorax CT")], first_seq=seq, images=1)
    assert search(engine, "doe^jane") == [series_uid(8)]
    assert search(engine, "roe^ri") == [series_uid(0)]
    # Counters and timestamps change, searchable values do not: the index stays right.
    write_patients(engine, [("", "", "")], first_seq=seq, images=1, first_series=0)
    assert search(engine, "roe^ri") == [series_uid(0)]
    assert_same_as_scan(engine)
    with engine.begin() as conn:
        rebuild(conn)
    assert search(engine, "roe^ri") == [series_uid(0)]
    assert search(engine, "doe^jane") == [series_uid(8)]
    assert_same_as_scan(engine)
    with engine.connect() as conn:
        assert index_rows(conn) == conn.execute(select(func.count()).select_from(SERIES)).scalar_one()


def index_rows(conn: Connection) -> int:
    table = "series_search_docs" if conn.dialect.name == "sqlite" else "series_search"
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_migration_indexes_series_that_already_exist(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        upgrade(engine, "0002")
        write_patients(engine, PATIENTS)
        upgrade(engine)
        with engine.connect() as conn:
            assert index_rows(conn) == len(PATIENTS)
        assert_same_as_scan(engine)
    finally:
        engine.dispose()


def test_search_uses_the_trigram_index(engine: Engine) -> None:
    write_patients(engine, PATIENTS)
    request = SeriesRequest(search="thorax")
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Nine rows: a sequential scan is cheaper and the planner rightly picks it. What matters is
            # that the query can use the index at all, i.e. its predicate is one the GIN index serves.
            conn.execute(text("SET enable_seqscan = off"))
        plan = explain(conn, request)
    expected = "ix_series_search_trgm" if engine.dialect.name == "postgresql" else "VIRTUAL TABLE"
    assert expected in plan, plan


def explain(conn: Connection, request: SeriesRequest) -> str:
    from services.bookkeeper.queries import series_search_condition

    assert request.search
    query = select(func.count()).select_from(SERIES).where(series_search_condition(conn, request.search))
    sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "postgresql":
        return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))
    return "\n".join(str(r) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


def test_sqlite_without_the_fts_table_falls_back_to_the_scan(tmp_path: Any) -> None:
    """What a database migrated by an SQLite without the trigram tokenizer looks like."""
    url = f"sqlite:///{tmp_path / 'bookkeeper.sqlite'}"
    engine = open_database(url)
    try:
        seq = write_patients(engine, PATIENTS)
        with engine.begin() as conn:
            for trigger in ("series_search_insert", "series_search_update", "series_search_delete"):
                conn.execute(text(f"DROP TRIGGER {trigger}"))
            conn.execute(text("DROP TABLE series_search"))
            conn.execute(text("DROP TABLE series_search_docs"))
    finally:
        engine.dispose()
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            assert "VIRTUAL TABLE" not in explain(conn, SeriesRequest(search="thorax"))
        assert_same_as_scan(engine)
        write_patients(engine, [("Late^Comer", "PID-0100", "after")], first_seq=seq, first_series=100)
        assert search(engine, "late^co") == [series_uid(100)]
    finally:
        engine.dispose()


@pytest.fixture
def unprivileged_postgres_url(postgres_url: str) -> Iterator[str]:
    """The test database, reached as a role that may create tables but not extensions."""
    role = f"caduceus_noext_{uuid.uuid4().hex[:8]}"
    database = make_url(postgres_url).database
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
    with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}", autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'").fetchone() == (0,)
        conn.execute(f'GRANT CREATE ON SCHEMA public TO "{role}"')
    yield str(make_url(postgres_url).set(username=role))
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'DROP ROLE "{role}"')


def test_postgres_without_pg_trgm_migrates_and_searches_by_scan(unprivileged_postgres_url: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.bookkeeper.migrations"):
        engine = open_database(unprivileged_postgres_url)
    try:
        assert any("pg_trgm extension could not be created" in r.getMessage() and "CREATE EXTENSION pg_trgm"
                   in r.getMessage() for r in caplog.records), caplog.text
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_regclass('ix_series_search_trgm')")).scalar_one() is None
        write_patients(engine, PATIENTS)
        assert_same_as_scan(engine)
    finally:
        engine.dispose()
