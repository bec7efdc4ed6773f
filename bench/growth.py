"""Growth benchmark: how the cost of caduceus grows with series count, rule count and log size.

    python -m bench.growth [--series 1,10,100,1000] [--rules 0,10,100] [--events 10000,100000,1000000]
                           [--postgres URL] [--backends postgres,sqlite] [--search patient1,...]
                           [--skip series,rules,events] [--smoke]

1. Series: N series of 10 images (64x64) sent by one storescu (files in series order) through
   `caduceus up` (route-all rule to a storescp, series_complete_seconds = --quiet). Time = until every
   instance is at the destination, minus the quiet period; per series = time / N.
2. Rules: the route-all rule plus K never-matching series rules; --rule-series series of 10 images.
   Router decision time per series = series.completed -> route.decided (occurred_at).
3. Event log: synthetic events (a series = 20 image.received, series.completed, route.decided,
   dispatch.requested, dispatch.completed) bulk-loaded into a fresh database that has the
   bookkeeper's schema (its own alembic migrations): COPY into Postgres, executemany into an SQLite
   file (--backends); at each size: wall time of `caduceus bookkeeper rebuild --database-url ...` and
   the latency of the series browser query (services.bookkeeper.queries.series, what the `series` RPC
   runs: first page, and one search per --search term).

Every step prints its growth factor against the previous one; a step whose cost grew more than
1.5x faster than its size is flagged "WORSE THAN LINEAR" (per-item cost for series, time for the
log; the decision time should not grow with the rule count more than the rule count does).
--smoke: 1 and 5 series, 0 and 10 rules with 2 series, 240 and 2400 events; `caduceus up` runs only
receiver, router and dispatcher.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import REPO, Peer, make_series, set_aside, start_storescp
from bench.pipeline import (
    DATA_PATH,
    Caduceus,
    last_seq,
    read_events,
    route_all_config,
    start_caduceus,
    ts,
    wait_for_files,
)
from shared.health import EXPECTED_SERVICES

FLAG_FACTOR = 1.5
IMAGES_PER_SERIES = 10
POSTGRES_ADMIN_URL = os.environ.get("CADUCEUS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
# patient1: common (~1/5 of the series match); pat0000042: one patient, 8 series at every size;
# 42: shorter than a trigram, served by a scan (services/bookkeeper/queries.py).
SEARCH_TERMS = "patient1,pat0000042,42"


def growth_line(label: str, sizes: list[float], costs: list[float], unit: str, per_item: bool) -> None:
    """Print each step's growth factor; flag a step that grew more than FLAG_FACTOR x its size."""
    for i in range(1, len(sizes)):
        size_factor = sizes[i] / sizes[i - 1]
        cost_factor = costs[i] / costs[i - 1] if costs[i - 1] > 0 else float("inf")
        # Linear: total cost grows like the size, i.e. the per-item cost stays flat.
        limit = FLAG_FACTOR if per_item else FLAG_FACTOR * size_factor
        flag = "  WORSE THAN LINEAR" if cost_factor > limit else ""
        print(f"growth {label} {sizes[i - 1]:g} -> {sizes[i]:g} (x{size_factor:g}): {unit} x{cost_factor:.2f}{flag}",
              flush=True)


# ------------------------------------------------------------------ 1. series count

def series_files(root: Path, count: int) -> list[Path]:
    make_series(root, IMAGES_PER_SERIES, 64, studies=1, series_per_study=count)
    return sorted(root.iterdir())  # st0_se<k>_<i>: series by series, like a modality sends them


def bench_series(cad: Caduceus, dest: Peer, work: Path, counts: list[int], quiet: float) -> dict[int, float]:
    out: Path = dest.extra["dir"]  # type: ignore[assignment]
    per_series: dict[int, float] = {}
    for count in counts:
        files = series_files(work / f"series-{count}", count)
        set_aside(out)
        t0 = time.time()
        cad.send(files)
        sent = time.time() - t0
        done = wait_for_files(out, len(files), timeout=120 + 2 * len(files))
        seconds = done - t0 - quiet
        per_series[count] = seconds / count
        print(f"series {count:5d} x {IMAGES_PER_SERIES} images: {seconds:8.2f} s after the quiet period "
              f"(storescu {sent:.2f} s), {1000 * per_series[count]:8.1f} ms per series", flush=True)
    growth_line("series", [float(c) for c in counts], [per_series[c] for c in counts], "time per series",
                per_item=True)
    return per_series


# ------------------------------------------------------------------ 2. rule count

def bench_rules(cad: Caduceus, dest: Peer, work: Path, rule_counts: list[int], n_series: int,
                quiet: float) -> dict[int, float]:
    results: dict[int, float] = {}
    out: Path = dest.extra["dir"]  # type: ignore[assignment]
    current = 0  # the initial configuration has no extra rule
    for extra in rule_counts:
        if extra != current:
            cad.apply_config(route_all_config(dest.port, quiet, extra))
            current = extra
        files = series_files(work / f"rules-{extra}", n_series)
        set_aside(out)
        since = last_seq(cad.nats_url)
        cad.send(files)
        wait_for_files(out, len(files), timeout=120 + 2 * len(files))
        events = read_events(cad.nats_url, ("series.completed", "route.decided"), since_seq=since)
        completed = {e.payload["batch_id"]: ts(e.occurred_at) for e in events if e.type == "series.completed"}
        decided = {e.payload["batch_id"]: (ts(e.occurred_at), len(e.payload.get("evaluations") or []))
                   for e in events if e.type == "route.decided"}
        times = [decided[b][0] - completed[b] for b in completed if b in decided]
        evaluated = {decided[b][1] for b in completed if b in decided}
        if len(times) != n_series or evaluated != {extra + 1}:
            raise RuntimeError(f"{extra} extra rules: {len(times)} decisions for {n_series} series, "
                               f"rules evaluated per decision: {sorted(evaluated)} (expected {extra + 1})")
        results[extra] = statistics.median(times)
        print(f"rules {extra + 1:4d} (route-all + {extra} non-matching): decision median "
              f"{1000 * results[extra]:7.2f} ms, max {1000 * max(times):7.2f} ms over {n_series} series", flush=True)
    growth_line("rules", [float(r + 1) for r in rule_counts], [results[r] for r in rule_counts],
                "decision time", per_item=False)
    return results


def bench_pipeline(work: Path, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    """Series and rule growth share one `caduceus up` (rules are changed with `caduceus config apply`)."""
    results: dict[str, Any] = {}
    dest = start_storescp(work / "dest")
    services = DATA_PATH if args.smoke else EXPECTED_SERVICES
    cad = start_caduceus(work / "caduceus", route_all_config(dest.port, args.quiet), services=services)
    try:
        if "series" not in skip:
            results["series"] = bench_series(cad, dest, work, [int(c) for c in args.series.split(",")], args.quiet)
        if "rules" not in skip:
            results["rules"] = bench_rules(cad, dest, work, [int(c) for c in args.rules.split(",")],
                                           args.rule_series, args.quiet)
    finally:
        cad.stop()
        dest.stop()
    return results


# ------------------------------------------------------------------ 3. event log

EVENT_COLUMNS = ("event_id", "stream", "stream_seq", "type", "schema_version", "occurred_at", "recorded_at",
                 "actor", "correlation_id", "causation_id", "study_uid", "series_uid", "sop_uid", "task_id",
                 "config_kind", "config_name", "payload")
EVENTS_PER_SERIES = 24
BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def synthetic_series(index: int, first_seq: int) -> Iterator[tuple[Any, ...]]:
    """The events of one routed series: 20 image.received, completed, decided, requested, completed."""
    study = f"1.2.826.0.1.3680043.9.9999.{index // 4}"
    series = f"{study}.{index % 4}"
    batch, task = uuid.uuid4().hex, uuid.uuid4().hex
    at = BASE_TIME + timedelta(seconds=index * 30)
    tags = {"PatientID": f"PAT{index // 8:07d}", "PatientName": f"SYNTH^PATIENT{index // 8}", "Modality": "CT",
            "SeriesDescription": f"AXIAL {index % 4}", "StudyDescription": "CT HEAD", "BodyPartExamined": "HEAD",
            "StudyDate": "20260101", "SeriesNumber": str(index % 4 + 1), "Manufacturer": "SYNTH",
            "InstitutionName": "BENCH HOSPITAL", "SliceThickness": "1.0", "Rows": "512", "Columns": "512"}
    seq = first_seq
    for i in range(20):
        sop = f"{series}.{i + 1}"
        payload = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                   "blob_key": f"instances/{study}/{series}/{sop}.dcm", "size": 525000, "sha256": "0" * 64,
                   "calling_aet": "BENCH", "called_aet": "CADUCEUS", "peer_host": "127.0.0.1",
                   "peer_port": 40000, "association_id": batch, "duplicate": "new", "tags": tags}
        yield _row("image.received", "receiver", seq, at + timedelta(milliseconds=10 * i), study, series, sop,
                   None, payload)
        seq += 1
    done = at + timedelta(seconds=2)
    common = {"batch_id": batch, "manifest_key": f"manifests/{batch}.json", "instance_count": 20}
    yield _row("series.completed", "router", seq, done, study, series, None, None,
               {**common, "first_seq": first_seq, "last_seq": seq - 1, "calling_aet": "BENCH",
                "peer_host": "127.0.0.1", "trigger": "quiet", "tags": tags})
    ref = {"task_id": task, "kind": "dispatch", "rule": "route-all", "target": "dest", "modules": []}
    yield _row("dispatch.requested", "router", seq + 1, done, study, series, None, task,
               {"task_id": task, "rule": "route-all", "target": "dest", "manifest_key": common["manifest_key"],
                "instance_count": 20, "priority": "normal", "calling_aet": "BENCH", "peer_host": "127.0.0.1"})
    yield _row("route.decided", "router", seq + 2, done, study, series, None, None,
               {"trigger": "series", "batch_id": batch, "evaluations": [{"rule": "route-all", "matched": True}],
                "matched_rules": ["route-all"], "tasks": [ref], "discarded": False, "reason": "matched route-all"})
    yield _row("dispatch.completed", "dispatcher", seq + 3, done + timedelta(seconds=1), study, series, None, task,
               {"task_id": task, "target": "dest", "sent": 20, "warnings": 0})


def _row(event_type: str, actor: str, seq: int, at: datetime, study: str, series: str, sop: str | None,
         task: str | None, payload: dict[str, Any]) -> tuple[Any, ...]:
    return (uuid.uuid4().hex, "EVENTS", seq, event_type, 1, at, at, actor, None, None, study, series, sop, task,
            None, None, json.dumps(payload))


def plain_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class _SyntheticLog:
    """What both event logs share: a fresh database migrated by the bookkeeper, series written so far."""

    def __init__(self, url: str) -> None:
        from services.bookkeeper.db import open_database

        self.url = url
        self.series_written = 0
        self.engine = open_database(url)  # runs the bookkeeper's own migrations

    @property
    def events(self) -> int:
        return self.series_written * EVENTS_PER_SERIES

    @staticmethod
    def series_for(events: int) -> int:
        return -(-events // EVENTS_PER_SERIES)


class EventLog(_SyntheticLog):
    """A fresh Postgres database with the bookkeeper schema, filled by COPY."""

    backend = "postgres"

    def __init__(self, admin_url: str) -> None:
        import psycopg

        self.name = f"caduceus_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        self.admin_url = admin_url
        super().__init__(f"{admin_url.rsplit('/', 1)[0]}/{self.name}")

    def grow_to(self, events: int) -> float:
        import psycopg

        target_series = self.series_for(events)
        start = time.perf_counter()
        with psycopg.connect(plain_url(self.url)) as conn, conn.cursor() as cur:
            with cur.copy(f"COPY events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy:
                for index in range(self.series_written, target_series):
                    for row in synthetic_series(index, 1 + index * EVENTS_PER_SERIES):
                        copy.write_row(row)
            conn.commit()
        with psycopg.connect(plain_url(self.url), autocommit=True) as conn:
            # Like a log that has been read before: hint bits and visibility map set, statistics fresh
            # (otherwise the first reader after a bulk load pays for writing the hint bits).
            conn.execute("VACUUM (ANALYZE) events")
        self.series_written = target_series
        return time.perf_counter() - start

    def after_rebuild(self) -> None:
        """Statistics for the rebuilt projections (and search index), as autovacuum would have them live."""
        import psycopg

        with psycopg.connect(plain_url(self.url), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")

    def drop(self) -> None:
        import psycopg

        self.engine.dispose()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def _sqlite_time(at: datetime) -> str:
    """The text SQLAlchemy's SQLite DateTime stores (UtcDateTime keeps naive UTC there)."""
    return at.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


class SqliteEventLog(_SyntheticLog):
    """A fresh SQLite file with the bookkeeper schema, filled by executemany in one transaction."""

    backend = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / f"bookkeeper-{uuid.uuid4().hex[:10]}.sqlite"
        super().__init__(f"sqlite:///{self.path}")

    def grow_to(self, events: int) -> float:
        import sqlite3

        target_series = self.series_for(events)
        start = time.perf_counter()
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                conn.executemany(
                    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
                    (row[:5] + (_sqlite_time(row[5]), _sqlite_time(row[6])) + row[7:]
                     for index in range(self.series_written, target_series)
                     for row in synthetic_series(index, 1 + index * EVENTS_PER_SERIES)))
            conn.execute("ANALYZE")
        finally:
            conn.close()
        self.series_written = target_series
        return time.perf_counter() - start

    def after_rebuild(self) -> None:
        import sqlite3

        conn = sqlite3.connect(self.path)
        try:
            conn.execute("ANALYZE")
        finally:
            conn.close()

    def drop(self) -> None:
        self.engine.dispose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def time_rebuild(url: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli.main", "bookkeeper", "rebuild", "--database-url", url],
                          capture_output=True, text=True, cwd=REPO, timeout=7200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"caduceus bookkeeper rebuild failed: {proc.stdout}{proc.stderr}")
    return seconds


def time_query(log: EventLog | SqliteEventLog, **request: Any) -> tuple[float, int]:
    """Median of 5 runs of the series browser query (after one warm-up run)."""
    from services.bookkeeper.queries import run_query
    from shared.bookkeeper_client import SeriesRequest, SeriesResponse

    req = SeriesRequest(**request)
    run_query(log.engine, "series", req)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        result = run_query(log.engine, "series", req)
        times.append(time.perf_counter() - start)
    assert isinstance(result, SeriesResponse)
    return statistics.median(times), result.total


def bench_events(sizes: list[int], log: EventLog | SqliteEventLog, terms: list[str],
                 measure_empty: bool = True) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    # Postgres keeps the unmarked labels of the first version of this benchmark (tests/test_bench_smoke.py).
    name = "events" if log.backend == "postgres" else f"events [{log.backend}]"
    loader = "COPY" if log.backend == "postgres" else "insert"
    try:
        if measure_empty:
            empty = time_rebuild(log.url)
            print(f"{name}: `caduceus bookkeeper rebuild` on an empty log: {empty:.2f} s (process start, "
                  f"migrations)", flush=True)
        for size in sizes:
            load = log.grow_to(size)
            rebuild = time_rebuild(log.url)
            log.after_rebuild()
            page, total = time_query(log)
            searches = {term: time_query(log, search=term) for term in terms}
            results[size] = {"events": log.events, "load_s": load, "rebuild_s": rebuild, "query_s": page,
                             "series": total, "search_s": {t: s for t, (s, _) in searches.items()},
                             "search_hits": {t: n for t, (_, n) in searches.items()}}
            found = ", ".join(f"search {t!r} {1000 * s:8.2f} ms ({n} hits)" for t, (s, n) in searches.items())
            print(f"{name} {log.events:9d} ({total} series): {loader} {load:7.1f} s, rebuild {rebuild:8.2f} s "
                  f"({log.events / rebuild:8.0f} events/s), series page {1000 * page:8.2f} ms, {found}", flush=True)
    finally:
        log.drop()
    sizes_done = [float(results[s]["events"]) for s in sizes]
    for key, label in (("rebuild_s", "rebuild time"), ("query_s", "series page latency")):
        growth_line(f"{name} ({label})", sizes_done, [results[s][key] for s in sizes], label, per_item=False)
    for i, term in enumerate(terms):
        label = "series search latency" if i == 0 else f"series search {term!r} latency"
        growth_line(f"{name} ({label})", sizes_done, [results[s]["search_s"][term] for s in sizes],
                    label, per_item=False)
    return results


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="1,10,100,1000", help="series counts (10 images each)")
    parser.add_argument("--rules", default="0,10,100", help="numbers of non-matching rules next to route-all")
    parser.add_argument("--rule-series", type=int, default=20, help="series sent per rule count")
    parser.add_argument("--events", default="10000,100000,1000000", help="event log sizes")
    parser.add_argument("--quiet", type=float, default=1.0, help="settings.series_complete_seconds")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL,
                        help="admin URL of a Postgres server (a temporary database is created and dropped)")
    parser.add_argument("--backends", default="postgres",
                        help="bookkeeper databases for the event log part: postgres, sqlite or both")
    parser.add_argument("--search", default=SEARCH_TERMS, help="comma separated series browser search terms")
    parser.add_argument("--skip", default="", help="comma separated parts to skip: series, rules, events")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the machinery")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.series, args.rules, args.rule_series, args.events = "1,5", "0,10", 2, "240,2400"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="caduceus-growth-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if not {"series", "rules"} <= skip:
            results.update(bench_pipeline(work, args, skip))
    if "events" not in skip:
        sizes = [int(c) for c in args.events.split(",")]
        terms = [t for t in args.search.split(",") if t]
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            with tempfile.TemporaryDirectory(prefix="caduceus-growth-", dir=args.workdir) as tmp:
                log: EventLog | SqliteEventLog
                if backend == "postgres":
                    log = EventLog(args.postgres)
                elif backend == "sqlite":
                    log = SqliteEventLog(Path(tmp))
                else:
                    parser.error(f"unknown backend {backend!r}")
                key = "events" if backend == "postgres" else f"events_{backend}"
                results[key] = bench_events(sizes, log, terms, measure_empty=not args.smoke)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
