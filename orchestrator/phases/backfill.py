"""backfill: partition the key space, copy batches with parallel workers, resume from the journal.

Each batch is one transaction that claims its partition row (FOR UPDATE SKIP LOCKED), copies rows
locked FOR KEY SHARE with ON CONFLICT DO NOTHING, and advances the partition's cursor: progress and
rows commit together, so a killed backfill resumes exactly where it stopped, and any number of
workers or processes cooperate on one plan. A partition whose row another session holds (another
process's batch, or the session of a killed process that the server has not ended yet) is claimed
as soon as it is free; while every worker waits for such partitions the holders are named, and the
backfill gives up once they make no progress for `backfill.held_partition_wait`.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from orchestrator import catalog, db, log, surroundings
from orchestrator.catalog import Session
from orchestrator.errors import DatabaseError, Interrupted
from orchestrator.executor import Executor, Statement, Unit
from orchestrator.journal import (
    LOCK_CLASS,
    green_written_statement,
    journal_unit,
    phase_statement,
    session_pin_statement,
)
from orchestrator.names import QualifiedName
from orchestrator.phases import bulk
from orchestrator.phases.keys import keys_units
from orchestrator.phases.operations import Holds, Metrics, ThrottleSql, replica_lag
from orchestrator.plan import duration_seconds
from orchestrator.render import render, render_steps
from orchestrator.spec import MigrationSpec

Conn = psycopg.Connection[Any]
Key = list[str]
RETRYABLE = (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.LockNotAvailable)
SAMPLE_TARGET_ROWS = 20000
HELD_PARTITION_POLL = 0.2   # seconds between claims while every unfinished partition is held by another session


@dataclass(frozen=True)
class Settings:
    workers: int
    batch_rows: int
    max_rows_per_second: float
    lock_timeout: str = "2s"     # for the short locks that add green's foreign keys
    attempts: int = 10
    held_partition_wait: str = "1min"   # a PostgreSQL duration: held partitions without progress, then give up
    batch_time: str = "500ms"           # the time target of one batch
    max_replica_lag: str | None = None  # hold while a standby lags more (or its lag is unknown)
    throttle_sql: str | None = None     # hold while this query returns true
    metrics_port: int | None = None     # serve Prometheus metrics here


def _statement(template: str, **context: Any) -> Statement:
    [(description, text)] = render_steps(template, **context)
    return Statement(description, text)


# -- partitioning --------------------------------------------------------------------------------
def estimate_rows(conn: Conn, spec: MigrationSpec, *, exact_fallback: bool = True) -> int:
    row = conn.execute("SELECT reltuples::float8 FROM pg_class WHERE oid = to_regclass(%s)",
                       [str(spec.blue)]).fetchone()
    estimate = float(row[0]) if row and row[0] is not None else -1.0
    if estimate > 0 or not exact_fallback:
        return max(0, int(estimate))
    counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(spec.blue.ident())).fetchone()
    return int(counted[0]) if counted else 0


def partition_count(settings: Settings, rows: int) -> int:
    return max(1, settings.workers, min(settings.workers * 4, math.ceil(rows / settings.batch_rows)))


def sample_percent(rows: int) -> float:
    if rows <= 5 * SAMPLE_TARGET_ROWS:
        return 100.0
    return max(0.01, round(100.0 * SAMPLE_TARGET_ROWS / rows, 4))


def bounds_statement(spec: MigrationSpec, rows: int) -> Statement:
    return _statement("backfill_bounds.sql.j2", spec=spec, sample_percent=sample_percent(rows))


def sampled_chunks(keys: list[Key], parts: int) -> list[dict[str, Any]]:
    """Boundaries at the quantiles of a sorted key sample: (None, b1], (b1, b2], ..., (bn, None]. The
    partitions hold about as many rows each, for every key type and whatever the spread of its values
    (a dense block plus sparse huge ids included); the batches inside them are cut by rows too."""
    bounds: list[Key] = []
    for i in range(1, parts):
        candidate = keys[len(keys) * i // parts] if keys else None
        if candidate is not None and (not bounds or bounds[-1] != candidate):
            bounds.append(candidate)
    edges: list[Key | None] = [None, *bounds, None]
    return [{"chunk_no": i, "lo": edges[i], "hi": edges[i + 1], "step": None} for i in range(len(edges) - 1)]


def plan_chunks(conn: Conn, executor: Executor, spec: MigrationSpec, settings: Settings) -> list[dict[str, Any]]:
    rows = estimate_rows(conn, spec)
    parts = partition_count(settings, rows)
    result = executor.execute(conn, bounds_statement(spec, rows))
    return sampled_chunks([list(r) for r in result], parts)


# -- one batch -----------------------------------------------------------------------------------
@dataclass
class Chunk:
    chunk_no: int
    lo: Key | None
    hi: Key | None
    cursor: Key | None
    step: Decimal | None

    @property
    def lower(self) -> Key | None:
        return self.cursor if self.cursor is not None else self.lo


@dataclass
class BatchSql:
    """The rendered batch statements, one text per bound variant, rendered once per worker."""

    spec: MigrationSpec
    batch_rows: int
    _cache: dict[tuple[str, bool, bool, str], Statement] = field(default_factory=dict)

    def get(self, kind: str, has_lower: bool, has_upper: bool, mode: str = "") -> Statement:
        key = (kind, has_lower, has_upper, mode)
        if key not in self._cache:
            green_types = {c.name: c.type for c in self.spec.columns}
            self._cache[key] = _statement(
                f"backfill_{kind}.sql.j2", spec=self.spec, has_lower=has_lower, has_upper=has_upper,
                batch_rows=self.batch_rows, mode=mode,
                green_key_types=[green_types[k] for k in self.spec.green_key])
        return self._cache[key]


def _with(statement: Statement, params: list[Any]) -> Statement:
    return Statement(statement.description, statement.sql, params)


def next_range(conn: Conn, executor: Executor, sqls: BatchSql, chunk: Chunk, rows: int
               ) -> tuple[Key | None, Key | None, bool]:
    """(lower exclusive, upper inclusive, chunk finished) of the chunk's next batch: `rows` rows on
    from the cursor in key order (LIMIT over the key, not a key span), or the rest of the chunk."""
    lower = chunk.lower
    statement = sqls.get("next", lower is not None, chunk.hi is not None)
    found = executor.execute(conn, _with(statement, [*(lower or []), *(chunk.hi or []), max(rows, 1) - 1]))
    if found:
        upper = [str(v) for v in found[0]]
        return lower, upper, upper == chunk.hi
    return lower, chunk.hi, True


def copy_batch(conn: Conn, executor: Executor, sqls: BatchSql, lower: Key | None, upper: Key | None
               ) -> tuple[Statement, int]:
    """Copy (lower, upper]: in bulk mode a plain INSERT (the trigger writes only the change log); else a
    plain INSERT where green has nothing of the range yet, or one that skips green's rows; a race with the
    trigger (unique_violation) reruns it ON CONFLICT DO NOTHING."""
    has_lower, has_upper = lower is not None, upper is not None
    bounds = [*(lower or []), *(upper or [])]
    if sqls.spec.bulk:
        copy = sqls.get("copy", has_lower, has_upper, "bulk")
        return copy, executor.execute_counted(conn, _with(copy, bounds))[1]
    [(touched,)] = executor.execute(conn, _with(sqls.get("probe", has_lower, has_upper), bounds))
    copy = sqls.get("copy", has_lower, has_upper, "antijoin" if touched else "plain")
    try:
        with conn.transaction():
            return copy, executor.execute_counted(conn, _with(copy, bounds))[1]
    except pgerrors.UniqueViolation:
        copy = sqls.get("copy", has_lower, has_upper, "on_conflict")
        return copy, executor.execute_counted(conn, _with(copy, bounds))[1]


# -- workers -------------------------------------------------------------------------------------
RATE_SLICE = 0.1    # seconds: with a rate limit, a batch books at most this much of the global timeline


@dataclass
class BatchSize:
    """Rows of a worker's next batch: `batch_rows` to start with, then resized after each batch so that
    it takes about `target` seconds (at most halved or doubled at a time), never above twice
    `batch_rows`, and with a global rate limit never more rows than RATE_SLICE seconds of it."""

    start: int
    target: float
    rate: float
    rows: int = 0

    def __post_init__(self) -> None:
        self.rows = self.start

    @property
    def ceiling(self) -> int:
        ceiling = 2 * self.start
        if self.rate > 0:
            ceiling = min(ceiling, max(1, int(self.rate * RATE_SLICE)))
        return ceiling

    def next(self) -> int:
        return max(1, min(self.rows, self.ceiling))

    def measured(self, rows: int, seconds: float) -> None:
        if rows < self.next() // 2 or seconds <= 0:
            return        # a partition's short tail says nothing about the speed
        factor = min(2.0, max(0.5, self.target / seconds))
        self.rows = max(1, min(self.ceiling, int(self.next() * factor)))


@dataclass
class Shared:
    spec: MigrationSpec
    settings: Settings
    dsn: str
    stop: threading.Event
    progress: Progress | None
    task: Any
    holds: Holds
    metrics: Metrics | None = None
    errors: list[BaseException] = field(default_factory=list)
    copied: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: set[int] = field(default_factory=set)      # workers waiting for partitions held by other sessions
    backends: set[int] = field(default_factory=set)     # the workers' server pids (never named as holders)
    # notified each time a worker of this process commits a batch or ends: a worker waiting for a partition
    # that a sibling holds claims it again at once, instead of at its next poll
    released: threading.Condition = field(default_factory=threading.Condition)

    def release(self) -> None:
        with self.released:
            self.released.notify_all()

    def wait_for_release(self, seconds: float) -> None:
        with self.released:
            if not self.stop.is_set():
                self.released.wait(seconds)

    def wait_for_held(self, number: int, waiting: bool) -> None:
        with self.lock:
            if waiting:
                self.waiting.add(number)
            else:
                self.waiting.discard(number)

    def all_waiting(self, alive: list[int]) -> bool:
        with self.lock:
            return bool(alive) and set(alive) <= self.waiting


class _NothingFree(Exception):
    """No partition could be claimed: `unfinished` are left, all held by other sessions (0: finished)."""

    def __init__(self, unfinished: int) -> None:
        super().__init__(unfinished)
        self.unfinished = unfinished


class _Paused(Exception):
    """The pause flag was set while the batch ran: its transaction rolls back."""


def worker(shared: Shared, number: int) -> None:
    spec, settings = shared.spec, shared.settings
    try:
        conn = db.connect(shared.dsn, f"backfill {spec.name} worker {number}")
    except BaseException as error:
        shared.errors.append(error)
        shared.stop.set()
        return
    executor = Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
    sqls = BatchSql(spec, settings.batch_rows)
    claim = _statement("backfill_claim.sql.j2", spec=spec)
    status = _statement("backfill_status.sql.j2", spec=spec)
    progress = _statement("backfill_progress.sql.j2", spec=spec)
    paused = _statement("backfill_paused.sql.j2", spec=spec)
    reserve = _statement("backfill_reserve.sql.j2", spec=spec)
    event = render("journal_event.sql.j2", schema=spec.state_schema)
    size = BatchSize(settings.batch_rows, duration_seconds(settings.batch_time), settings.max_rows_per_second)
    retries = 0
    try:
        for statement in [*session_statements(), session_pin_statement(spec)]:
            executor.execute(conn, statement)
        conn.commit()
        with shared.lock:
            shared.backends.add(conn.info.backend_pid)
        while not shared.stop.is_set():
            if shared.holds.reason is not None:
                shared.stop.wait(0.05)         # held: the coordinator heartbeats and journals why
                continue
            rows = size.next()
            if settings.max_rows_per_second > 0:
                seconds = rows / settings.max_rows_per_second
                [(wait,)] = executor.execute(conn, _with(reserve, [seconds, seconds, seconds]))
                conn.commit()
                if wait > 0 and shared.stop.wait(float(wait)):
                    break
            try:
                with conn.transaction():
                    claimed = executor.execute(conn, claim)
                    if not claimed:
                        raise _NothingFree(int(executor.execute(conn, status)[0][0]))
                    chunk = Chunk(*claimed[0])
                    lower, upper, finished = next_range(conn, executor, sqls, chunk, rows)
                    started = time.perf_counter()
                    copy, inserted = copy_batch(conn, executor, sqls, lower, upper)
                    elapsed = time.perf_counter() - started
                    executor.execute(conn, _with(progress, [upper, finished, inserted, finished, chunk.chunk_no]))
                    conn.execute(event, [spec.name, "backfill", copy.description, copy.sql,
                                         round(elapsed * 1000, 3), "ok",
                                         json.dumps({"chunk": chunk.chunk_no, "lower": lower, "upper": upper,
                                                     "rows": inserted, "worker": number, "target": rows})])
                    if executor.execute(conn, paused)[0][0]:
                        raise _Paused
                retries = 0
            except _Paused:
                shared.stop.wait(0.05)
                continue
            except _NothingFree as nothing:
                if nothing.unfinished == 0:
                    return
                # the rest is held by other sessions: claim each partition as soon as it is free
                shared.wait_for_held(number, True)
                shared.wait_for_release(HELD_PARTITION_POLL)
                continue
            except RETRYABLE as error:
                shared.wait_for_held(number, False)
                retries += 1
                if retries > 20:
                    raise
                log.warn(f"worker {number}: {type(error).__name__}, retrying batch ({retries})")
                shared.stop.wait(min(2.0, 0.05 * 2**retries))
                continue
            shared.release()
            shared.wait_for_held(number, False)
            size.measured(inserted, elapsed)
            with shared.lock:
                shared.copied += inserted
            if shared.progress is not None:
                shared.progress.advance(shared.task, inserted)
            if shared.metrics is not None:
                shared.metrics.rows.inc(inserted)
                shared.metrics.batch.observe(elapsed)
    except BaseException as error:
        shared.errors.append(error)
        shared.stop.set()
    finally:
        conn.close()
        shared.release()


@dataclass
class HeldPartitions:
    """While every worker waits for partitions that other sessions hold, name the holders (stderr and the
    journal, outcome 'waiting') and give up once the held partitions make no progress for the bound."""

    spec: MigrationSpec
    bound: str
    statement: Statement = field(init=False)
    seen: tuple[tuple[int, int], ...] | None = None    # (partition, batches) of the unfinished ones
    since: float = 0.0                                  # when all workers waited, or progress was last seen
    named: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.statement = _statement("backfill_held.sql.j2", spec=self.spec)

    def check(self, conn: Conn, executor: Executor, shared: Shared, alive: list[int]) -> str | None:
        """None to keep waiting, else why the backfill gives up."""
        if not shared.all_waiting(alive):
            self.seen = None
            return None
        rows = executor.execute(conn, self.statement)
        conn.commit()
        now = time.monotonic()
        state = tuple(sorted({(int(r[0]), int(r[1])) for r in rows}))
        if state != self.seen:
            self.seen, self.since = state, now
        if not rows:
            return None
        with shared.lock:
            ours = set(shared.backends)
        holders = {int(r[2]): Session(int(r[2]), r[3] or "", r[4] or "", r[5]) for r in rows
                   if r[2] is not None and int(r[2]) not in ours}
        held = ", ".join(str(p) for p, _ in state)
        who = "; ".join(h.describe() for h in holders.values()) or "a session bgsync cannot identify"
        if tuple(holders) != self.named:
            self.named = tuple(holders)
            message = (f"waiting for partition(s) {held} held by {who}: a batch of another backfill process, or "
                       f"the session of a killed one that the server has not ended yet; giving up after "
                       f"{self.bound} without progress (backfill.held_partition_wait)")
            log.info(f"backfill {self.spec.name}: {message}")
            conn.execute(render("journal_event.sql.j2", schema=self.spec.state_schema),
                         [self.spec.name, "backfill", "wait for held partitions", None, None, "waiting", message])
            conn.commit()
        if now - self.since <= duration_seconds(self.bound):
            return None
        end = " or ".join(f"SELECT pg_terminate_backend({pid})" for pid in holders) or \
            "SELECT pg_terminate_backend(pid) for the session holding it"
        return (f"backfill {self.spec.name}: partition(s) {held} held by {who} with no progress for {self.bound} "
                f"(backfill.held_partition_wait); if it is the session of a killed bgsync process, the server ends "
                f"it once it notices (or end it now: {end}); then rerun `bgsync backfill` to resume")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def session_statements() -> list[Statement]:
    return [Statement(d, s) for d, s in render_steps("backfill_session.sql.j2", lock_timeout=db.DEFAULT_LOCK_TIMEOUT)]


def _progress() -> Progress:
    return Progress(TextColumn("[bold]backfill"), BarColumn(),
                    TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=log.console, transient=False)


# -- the phase -----------------------------------------------------------------------------------
def run(conn: Conn, dsn: str, spec: MigrationSpec, settings: Settings) -> None:
    executor = Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
    holds = Holds(spec, replica=replica_lag(spec, settings.max_replica_lag),
                  throttle=None if settings.throttle_sql is None else ThrottleSql(settings.throttle_sql))
    if holds.throttle is not None:
        holds.throttle.validate(conn)      # before anything is written: a bad query is a usage error
    metrics = None if settings.metrics_port is None else Metrics(settings.metrics_port, spec.name)
    chunks_statement = _statement("backfill_chunks.sql.j2", spec=spec)
    status = _statement("backfill_status.sql.j2", spec=spec)
    if not catalog.relation_exists(conn, QualifiedName(spec.state_schema, "runs")):
        conn.rollback()
        executor.run(journal_unit(spec.state_schema))    # a journal from before pause, heartbeats and rate limits
    conn.rollback()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", [LOCK_CLASS, spec.name + ":chunks"])
        remaining, total_chunks, copied_before = executor.execute(conn, status)[0]
        if total_chunks == 0:
            chunks = plan_chunks(conn, executor, spec, settings)
            executor.execute(conn, _with(chunks_statement, [json.dumps(chunks)]))
            executor.execute(conn, phase_statement(spec, "backfilling"))
            log.info(f"backfill {spec.name}: {len(chunks)} partitions planned")
        else:
            log.info(f"backfill {spec.name}: resuming, {remaining} of {total_chunks} partitions left, "
                     f"{copied_before:,} rows already copied")
    estimate = estimate_rows(conn, spec)
    conn.commit()
    stop = threading.Event()
    progress = _progress()
    shared = Shared(spec=spec, settings=settings, dsn=dsn, stop=stop, progress=progress, holds=holds,
                    metrics=metrics, task=progress.add_task("backfill", total=max(estimate, int(copied_before)),
                                                            completed=int(copied_before), rate=""))
    threads = [threading.Thread(target=worker, args=(shared, i), name=f"bgsync-backfill-{i}", daemon=True)
               for i in range(settings.workers)]
    started = time.monotonic()
    interrupted = False
    held = HeldPartitions(spec, settings.held_partition_wait)
    gave_up: str | None = None
    held_reported = 0.0
    try:
        with _sigterm_as_interrupt(), progress:
            try:
                holds.start(conn, executor)
                holds.tick(conn, executor, 0)     # a pause or a hold already on: no worker starts a batch
                for thread in threads:
                    thread.start()
                while any(t.is_alive() for t in threads):
                    for thread in threads:
                        thread.join(timeout=0.25 / len(threads))
                    elapsed = max(time.monotonic() - started, 1e-6)
                    # the total is an estimate (reltuples): never let the bar run past it
                    done = int(copied_before) + shared.copied
                    total = max(progress.tasks[0].total or 0, done)
                    rate = shared.copied / elapsed
                    reason = holds.tick(conn, executor, shared.copied)
                    progress.update(shared.task, total=total,
                                    rate=f"held: {reason}" if reason else f"{rate:,.0f} rows/s")
                    if metrics is not None:
                        metrics.rows_total.set(done)
                        metrics.rate.set(rate)
                        metrics.eta.set(float("nan") if reason or rate <= 0 else max(0.0, total - done) / rate)
                        metrics.held.set(1 if reason else 0)
                        now_held = holds.held_now()
                        metrics.held_seconds.inc(max(0.0, now_held - held_reported))
                        held_reported = max(held_reported, now_held)
                    gave_up = held.check(conn, executor, shared, [i for i, t in enumerate(threads) if t.is_alive()])
                    if gave_up is not None:
                        stop.set()
                        for thread in threads:
                            thread.join()
            except KeyboardInterrupt:
                interrupted = True
                stop.set()
                log.warn("interrupt: stopping after the current batches")
                for thread in threads:
                    thread.join()
            except psycopg.Error as failure:
                # the coordinator's own session failed (a server restart, a terminated backend): stop the
                # workers after their current batches and report it like a worker's failure
                shared.errors.insert(0, failure)
                stop.set()
                for thread in threads:
                    thread.join()
            if not shared.errors and not interrupted and gave_up is None:
                # finished: the real total replaces the estimate, so the bar ends exactly full
                done = int(copied_before) + shared.copied
                progress.update(shared.task, total=done, completed=done)
    finally:
        stop.set()
        holds.end(conn, executor, shared.copied)
        if metrics is not None:
            metrics.close()
    if shared.errors:
        error = shared.errors[0]
        message = error.diag.message_primary if isinstance(error, psycopg.Error) and error.diag.message_primary \
            else str(error)
        raise DatabaseError(f"backfill {spec.name} failed: {db.redact(message)}"
                            f"{db.lock_timeout_hint(error, db.DEFAULT_LOCK_TIMEOUT)}; rerun to resume")
    if interrupted:
        raise Interrupted(f"backfill {spec.name} interrupted; {shared.copied:,} rows copied in this run, "
                          f"progress recorded: rerun `bgsync backfill` to resume")
    if gave_up is not None:
        raise DatabaseError(gave_up)

    # every worker ended with no partition left (held ones were waited for), so indexes see complete data
    remaining, total_chunks, copied_total = executor.execute(conn, status)[0]
    conn.commit()
    if remaining:
        raise DatabaseError(f"backfill {spec.name}: {remaining} partition(s) left; rerun to resume")
    if spec.bulk:
        bulk.finish(conn, dsn, spec, settings.lock_timeout, settings.attempts)
    with db.connect(dsn, f"backfill {spec.name} indexes", lock_timeout="0") as index_conn:
        # CONCURRENTLY waits for older transactions; those waits block no writer, so no timeout here.
        build_indexes(index_conn, Executor(index_conn, dry_run=False, migration=spec.name,
                                           state_schema=spec.state_schema), spec)
    for unit in finish_units(conn, spec, settings):
        executor.run(unit)
    executor.run(Unit(f"backfill {spec.name} complete",
                      [phase_statement(spec, "backfilled"), green_written_statement(spec)], phase="backfill"))
    elapsed = time.monotonic() - started
    log.success(f"backfilled {spec.name}: {copied_total:,} rows in green; this run copied {shared.copied:,} rows "
                f"in {elapsed:.1f}s ({shared.copied / max(elapsed, 1e-6):,.0f} rows/s)"
                + (f", {holds.held_seconds:.1f}s of it held" if holds.held_seconds >= 0.05 else ""))


def finish_units(conn: Conn, spec: MigrationSpec, settings: Settings) -> list[Unit]:
    """After the copy and the indexes: green takes blue's foreign keys (and twins of the inbound ones),
    blue's replica identity index, and fresh statistics."""
    units = keys_units(conn, spec, settings.lock_timeout, settings.attempts, "backfill")
    replica = None
    blue_oid = catalog.regclass_oid(conn, str(spec.blue))
    if blue_oid is not None:
        definition = surroundings.table_properties(conn, blue_oid).replica_index
        replica = next((ix.name for ix in catalog.index_names(conn, str(spec.green))
                        if definition and ix.definition == definition), None)
    steps = render_steps("backfill_finish.sql.j2", spec=spec, replica_index=replica)
    units.append(Unit(f"backfill {spec.name}: green's replica identity and statistics",
                      [Statement(d, s) for d, s in steps], atomic=False, lock_timeout=settings.lock_timeout,
                      phase="backfill"))
    conn.rollback()     # the catalog reads above end here: each unit runs in its own transaction
    return units


def index_units(conn: Conn | None, spec: MigrationSpec) -> list[Unit]:
    """CREATE INDEX CONCURRENTLY for the deferred indexes still missing (in bulk mode the unique ones);
    invalid leftovers dropped first."""
    if not spec.indexes:
        return []
    existing = {} if conn is None else catalog.index_validity(conn, str(spec.green))
    # bulk mode built the non-unique ones plainly before the switch; unique ones need every row current
    todo = [ix for ix in spec.indexes if not existing.get(ix.name, False) and (ix.unique or not spec.bulk)]
    invalid = {name for name, valid in existing.items() if not valid}
    steps = render_steps("backfill_indexes.sql.j2", spec=spec, indexes=todo, invalid=invalid)
    if not steps:
        return []
    return [Unit(f"deferred indexes on {spec.green} (CONCURRENTLY, outside a transaction)",
                 [Statement(d, s) for d, s in steps], atomic=False, phase="backfill")]


def build_indexes(conn: Conn, executor: Executor, spec: MigrationSpec) -> None:
    """One process builds; others poll (a waiting lock request would itself block CONCURRENTLY)."""
    key = [LOCK_CLASS, spec.name + ":indexes"]
    conn.commit()
    conn.autocommit = True
    try:
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", key).fetchone()
            if row and row[0]:
                break
            time.sleep(0.5)
        try:
            for unit in index_units(conn, spec):
                log.info(f"building {len(unit.statements)} deferred index statement(s) CONCURRENTLY")
                executor.run(unit)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)
    finally:
        if not conn.closed and conn.autocommit:
            conn.autocommit = False


def print_plan(conn: Conn, spec: MigrationSpec, settings: Settings) -> None:
    """The backfill's SQL, from the same templates the workers run, with its parameters named."""
    printer = Executor(None, dry_run=True, migration=spec.name, state_schema=spec.state_schema)
    rows = estimate_rows(conn, spec, exact_fallback=False)
    sqls = BatchSql(spec, settings.batch_rows)
    plan_unit = [
        bounds_statement(spec, rows),
        _with(_statement("backfill_chunks.sql.j2", spec=spec), ["<partitions as JSON>"]),
        phase_statement(spec, "backfilling"),
    ]
    printer.run(Unit("settings of each worker's session", [*session_statements(), session_pin_statement(spec)],
                     atomic=False))
    printer.run(Unit(f"backfill {spec.name}: plan about {partition_count(settings, rows)} partitions "
                     f"({settings.workers} workers, {settings.batch_rows} rows per batch)", plan_unit))
    holds = Holds(spec)
    printer.run(Unit("this process registers, then every 0.25 s heartbeats and reads the pause flag (while paused, "
                     "or while a hold below applies, no worker starts a batch)",
                     [holds.statement("start", ["<host and pid>"]),
                      holds.statement("heartbeat", ["<what holds it>", "<seconds held>", "<rows copied>", "<run>"])],
                     atomic=False))
    printer.run(Unit("with --max-replica-lag, every 0.25 s: hold while a standby lags more, or is gone, or its lag "
                     "cannot be read", [_statement("backfill_replicas.sql.j2", spec=spec)], atomic=False))
    seconds = "<batch rows / max_rows_per_second>"
    printer.run(Unit("with a rate limit (max_rows_per_second), before each batch: book it on the global timeline",
                     [_with(_statement("backfill_reserve.sql.j2", spec=spec), [seconds] * 3)]))
    batch = [_statement("backfill_claim.sql.j2", spec=spec),
             _with(sqls.get("next", True, True), ["<cursor>", "<partition hi>", "<batch rows - 1>"])]
    bounds = ["<batch lower (exclusive)>", "<batch upper (inclusive)>"]
    if spec.bulk:
        batch.append(_with(sqls.get("copy", True, True, "bulk"), bounds))
    else:
        batch += [
            _with(sqls.get("probe", True, True), bounds),
            _with(sqls.get("copy", True, True, "plain"), bounds),
            _with(sqls.get("copy", True, True, "antijoin"), bounds),
            _with(sqls.get("copy", True, True, "on_conflict"), bounds),
        ]
    batch += [
        _with(_statement("backfill_progress.sql.j2", spec=spec),
              ["<batch upper>", "<partition done>", "<rows inserted>", "<partition done>", "<partition>"]),
        _statement("backfill_paused.sql.j2", spec=spec),
    ]
    printer.run(Unit("each batch, repeated by every worker until no partition is left", batch))
    if spec.bulk:
        for unit in bulk.print_units(conn, spec, settings.lock_timeout, settings.attempts):
            printer.run(unit)
    for unit in index_units(conn, spec):
        printer.run(unit)
    printer.run(Unit(f"backfill {spec.name} complete", [phase_statement(spec, "backfilled"),
                                                         green_written_statement(spec)]))
