"""verify: per partition, count + order-independent checksum of blue (projected through `from`) and
green, both read in one REPEATABLE READ snapshot, so the comparison is exact while the application
writes and takes no table lock. A mismatched partition is bisected down to the rows that differ."""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from orchestrator import db, log
from orchestrator.errors import DatabaseError
from orchestrator.executor import Executor, Statement, Unit
from orchestrator.journal import journal_unit, phase_statement
from orchestrator.names import quote_ident
from orchestrator.phases.backfill import BatchSql, Key, _statement, _with, session_statements
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec

Conn = psycopg.Connection[Any]
LEAF_ROWS = 200          # a mismatched range this small is compared row by row
MAX_REPORTED = 1000      # mismatched rows reported in full; the count is always exact


@dataclass(frozen=True)
class Range:
    lo: Key | None
    hi: Key | None


@dataclass
class Mismatch:
    kind: str                        # missing_in_green | extra_in_green | different
    key: list[str]
    columns: list[str]
    blue: dict[str, str | None] | None
    green: dict[str, str | None] | None


@dataclass
class Report:
    migration: str
    passed: bool = True
    partitions: int = 0
    rows_blue: int = 0
    rows_green: int = 0
    mismatched_rows: int = 0
    seconds: float = 0.0
    mismatches: list[Mismatch] = field(default_factory=list)
    ranges: list[Range] = field(default_factory=list)
    repaired: Report | None = None     # the mismatching report that --repair fixed

    def as_json(self) -> dict[str, Any]:
        return {
            "migration": self.migration, "passed": self.passed, "partitions": self.partitions,
            "rows_blue": self.rows_blue, "rows_green": self.rows_green,
            "mismatched_rows": self.mismatched_rows, "seconds": round(self.seconds, 3),
            "mismatches": [vars(m) for m in self.mismatches],
            "ranges": [{"lo": r.lo, "hi": r.hi} for r in self.ranges],
            "repaired": None if self.repaired is None else self.repaired.as_json(),
        }


class Projection:
    """The compared columns: blue's `from` cast to green's type. Checksums hash each value with its
    type's own hash function (`hash_record_extended`), so values that are equal but print
    differently (numeric scale, -0, time zones) hash the same; types without one are compared as
    text. Row-by-row diffs compare text, normalized the same way (trim_scale, + 0)."""

    def __init__(self, conn: Conn, spec: MigrationSpec) -> None:
        types = {r[0]: (r[1], r[2]) for r in conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::regtype::text
                 FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0
                  AND NOT a.attisdropped""", [str(spec.green)])}
        if not types:  # a dry run before prepare: green's types as the plan writes them
            types = {c.name: (c.type, _base_type(conn, c.type)) for c in spec.columns}
        self.names: list[str] = []
        self.blue: list[str] = []
        self.green: list[str] = []
        self.blue_hashed: list[str] = []
        self.green_hashed: list[str] = []
        version = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        self.record_hash = bool(version and version[0] >= 140000)
        for col in spec.copied_columns:
            full_type, base = types[col.name]
            blue, green = f"CAST(({col.source_expr}) AS {full_type})", quote_ident(col.name)
            self.names.append(col.name)
            self.blue.append(_normalize(blue, base))
            self.green.append(_normalize(green, base))
            if self.record_hash and _hashable(conn, full_type):
                self.blue_hashed.append(blue)
                self.green_hashed.append(green)
            else:
                self.blue_hashed.append(f"({_normalize(blue, base)})::text")
                self.green_hashed.append(f"({_normalize(green, base)})::text")
        self.green_key_types = [types[k][0] for k in spec.green_key]


def _hashable(conn: Conn, type_text: str) -> bool:
    """Does the type have an extended hash function (json, point, xml do not)?"""
    try:
        with conn.transaction():
            conn.execute(f"SELECT hash_record_extended(ROW(NULL::{type_text}), 0)")
        return True
    except psycopg.Error:
        return False


def _base_type(conn: Conn, type_text: str) -> str:
    row = conn.execute("SELECT to_regtype(%s)::text", [type_text]).fetchone()
    return str(row[0]) if row else type_text


def _normalize(expression: str, base_type: str) -> str:
    if base_type == "numeric":
        return f"trim_scale({expression})"
    if base_type in ("double precision", "real"):
        return f"(({expression}) + 0)"
    return expression


class Queries:
    """The verify statements, rendered once per worker; the executor runs them."""

    def __init__(self, spec: MigrationSpec, projection: Projection) -> None:
        self.spec, self.projection = spec, projection
        self._cache: dict[tuple[str, str, bool, bool], Statement] = {}

    def get(self, kind: str, side: str, has_lower: bool, has_upper: bool) -> Statement:
        key = (kind, side, has_lower, has_upper)
        if key not in self._cache:
            p = self.projection
            self._cache[key] = _statement(
                f"verify_{kind}.sql.j2", spec=self.spec, side=side, has_lower=has_lower, has_upper=has_upper,
                blue_row=", ".join(p.blue_hashed), green_row=", ".join(p.green_hashed),
                record_hash=p.record_hash,
                blue_columns=p.blue, green_columns=p.green,
                green_key_types=p.green_key_types)
        return self._cache[key]


def _bounds(r: Range) -> list[str]:
    return [*(r.lo or []), *(r.hi or [])]


@dataclass
class Checker:
    """Compares ranges inside one REPEATABLE READ transaction (one snapshot)."""

    conn: Conn
    executor: Executor
    queries: Queries

    def aggregate(self, side: str, r: Range) -> tuple[int, int]:
        statement = self.queries.get("aggregate", side, r.lo is not None, r.hi is not None)
        count, checksum = self.executor.execute(self.conn, _with(statement, _bounds(r)))[0]
        return int(count), int(checksum)

    def compare(self, r: Range, report: Report, lock: threading.Lock) -> tuple[int, int]:
        blue, green = self.aggregate("blue", r), self.aggregate("green", r)
        if blue != green:
            self.narrow(r, blue, green, report, lock)
        return blue[0], green[0]

    def narrow(self, r: Range, blue: tuple[int, int], green: tuple[int, int], report: Report,
               lock: threading.Lock) -> None:
        """Bisect by key until a range is small enough to compare row by row."""
        if max(blue[0], green[0]) <= LEAF_ROWS:
            self.diff_rows(r, report, lock)
            return
        side, count = ("blue", blue[0]) if blue[0] >= green[0] else ("green", green[0])
        split = self.queries.get("split", side, r.lo is not None, r.hi is not None)
        rows = self.executor.execute(self.conn, _with(split, [*_bounds(r), count // 2]))
        if not rows:
            self.diff_rows(r, report, lock)
            return
        middle = [str(v) for v in rows[0]]
        for half in (Range(r.lo, middle), Range(middle, r.hi)):
            b, g = self.aggregate("blue", half), self.aggregate("green", half)
            if b != g:
                self.narrow(half, b, g, report, lock)

    def rows(self, side: str, r: Range) -> dict[tuple[str, ...], list[str | None]]:
        statement = self.queries.get("rows", side, r.lo is not None, r.hi is not None)
        return {tuple(k): list(v) for k, v in self.executor.execute(self.conn, _with(statement, _bounds(r)))}

    def diff_rows(self, r: Range, report: Report, lock: threading.Lock) -> None:
        blue, green = self.rows("blue", r), self.rows("green", r)
        names = self.queries.projection.names
        found: list[Mismatch] = []
        for key in sorted(set(blue) | set(green)):
            b, g = blue.get(key), green.get(key)
            if g is None:
                found.append(Mismatch("missing_in_green", list(key), [], dict(zip(names, b or [], strict=True)),
                                      None))
            elif b is None:
                found.append(Mismatch("extra_in_green", list(key), [], None, dict(zip(names, g, strict=True))))
            elif b != g:
                columns = [n for n, x, y in zip(names, b, g, strict=True) if x != y]
                found.append(Mismatch("different", list(key), columns,
                                      {n: v for n, v in zip(names, b, strict=True) if n in columns},
                                      {n: v for n, v in zip(names, g, strict=True) if n in columns}))
        with lock:
            report.passed = False
            report.mismatched_rows += len(found)
            room = MAX_REPORTED - len(report.mismatches)
            report.mismatches.extend(found[:max(room, 0)])
            report.ranges.append(r)


def partitions(conn: Conn, spec: MigrationSpec) -> list[Range]:
    rows = conn.execute(
        f"SELECT lo, hi FROM {quote_ident(spec.state_schema)}.chunks WHERE migration = %s ORDER BY chunk_no",
        [spec.name]).fetchall()
    if not rows:
        return [Range(None, None)]
    # The outer partitions are open-ended: rows written past the backfill's key range count too.
    ranges = [Range(lo, hi) for lo, hi in rows]
    ranges[0] = Range(None, ranges[0].hi)
    ranges[-1] = Range(ranges[-1].lo, None)
    return ranges


def run(conn: Conn, dsn: str, spec: MigrationSpec, workers: int, *, record: bool = True) -> Report:
    """Compare every partition with `workers` connections; record the result in the journal."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    executor = Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
    executor.run(journal_unit(spec.state_schema))
    projection = Projection(conn, spec)
    todo: queue.Queue[Range] = queue.Queue()
    ranges = partitions(conn, spec)
    conn.commit()
    for r in ranges:
        todo.put(r)
    report = Report(migration=spec.name, partitions=len(ranges))
    lock = threading.Lock()
    errors: list[BaseException] = []
    progress = Progress(TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TextColumn("partitions"),
                        TimeElapsedColumn(), console=log.console)
    task = progress.add_task("verify", total=len(ranges))

    def work(number: int) -> None:
        try:
            with db.connect(dsn, f"verify {spec.name} worker {number}") as wconn:
                wexec = Executor(wconn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
                checker = Checker(wconn, wexec, Queries(spec, projection))
                wconn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                while not errors:
                    try:
                        r = todo.get_nowait()
                    except queue.Empty:
                        return
                    with wconn.transaction():
                        wconn.execute("SET TRANSACTION READ ONLY")
                        nb, ng = checker.compare(r, report, lock)
                    with lock:
                        report.rows_blue += nb
                        report.rows_green += ng
                    progress.advance(task)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(max(1, workers))]
    with progress:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        error = errors[0]
        message = error.diag.message_primary if isinstance(error, psycopg.Error) and error.diag.message_primary \
            else str(error)
        raise DatabaseError(f"verify {spec.name} failed: {db.redact(str(message))}")
    report.seconds = time.perf_counter() - started
    if record:
        record_result(executor, spec, report, started_at)
    return report


def record_result(executor: Executor, spec: MigrationSpec, report: Report, started_at: datetime) -> None:
    statements = [
        _with(_statement("verify_record.sql.j2", spec=spec), [started_at, report.passed, json.dumps(report.as_json())]),
        phase_statement(spec, "verified" if report.passed else "mismatch"),
    ]
    executor.run(Unit(f"verify {spec.name}: record the result", statements, phase="verify"))


def repair(conn: Conn, spec: MigrationSpec, report: Report) -> int:
    """Re-copy each mismatched range: delete it in green and copy it from blue in one transaction."""
    executor = Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
    projection = Projection(conn, spec)
    conn.commit()
    sqls = BatchSql(spec, 1)
    repaired = 0
    for statement in session_statements():
        executor.execute(conn, statement)
    for r in report.ranges:
        has_lower, has_upper = r.lo is not None, r.hi is not None
        [(description, text)] = render_steps("verify_repair.sql.j2", spec=spec, has_lower=has_lower,
                                              has_upper=has_upper, green_key_types=projection.green_key_types)
        copy = sqls.get("copy", has_lower, has_upper, "on_conflict")
        executor.run(Unit(f"repair {spec.name}: re-copy a mismatched range", [
            Statement(description, text, _bounds(r)), _with(copy, _bounds(r))], phase="verify"))
        repaired += 1
    conn.execute("RESET ALL")
    conn.commit()
    return repaired


def print_plan(conn: Conn, spec: MigrationSpec) -> None:
    printer = Executor(None, dry_run=True, migration=spec.name, state_schema=spec.state_schema)
    projection = Projection(conn, spec)
    queries = Queries(spec, projection)
    bounds = ["<partition lo (exclusive)>", "<partition hi (inclusive)>"]
    printer.run(Unit("each partition, in one REPEATABLE READ READ ONLY transaction per partition", [
        _with(queries.get("aggregate", "blue", True, True), bounds),
        _with(queries.get("aggregate", "green", True, True), bounds)]))
    printer.run(Unit("a mismatched range: bisect, then compare its rows (same transaction)", [
        _with(queries.get("split", "blue", True, True), [*bounds, "<half the rows>"]),
        _with(queries.get("rows", "blue", True, True), bounds),
        _with(queries.get("rows", "green", True, True), bounds)]))
