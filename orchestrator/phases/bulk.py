"""The end of a bulk-mode backfill: indexes after the copy, the change log drained, the switch to dual write.

In bulk mode (`backfill.mode: bulk`, the default) green is created without its primary key and the
forward trigger only records the keys each statement changes. The copy is then a plain `INSERT ...
SELECT` into a table without indexes (no row lock on blue, no index insertion per row), as pg_repack
does. Once every partition is copied: the primary key and the non-unique indexes are built plainly in
parallel (nothing but bgsync writes green), the recorded keys are re-read from blue in rounds while
the application goes on, and a short transaction that holds off blue's writers (SHARE ROW EXCLUSIVE,
taken like a flip's locks) re-reads the last keys, turns the trigger into direct dual write and drops
the log. Unique secondary indexes are built CONCURRENTLY after that, as in direct mode.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import psycopg

from orchestrator import catalog, db, log
from orchestrator.errors import DatabaseError
from orchestrator.executor import Executor, Statement, Unit
from orchestrator.journal import LOCK_CLASS, session_pin_statement
from orchestrator.render import render, render_steps
from orchestrator.spec import MigrationSpec, forward_sync

Conn = psycopg.Connection[Any]
DRAIN_KEYS = 50_000        # keys re-read from blue per round while the application writes
SWITCH_BELOW = 2_000       # a round that found fewer keys than this: the rest is re-read under the switch's lock
MAX_ROUNDS = 100           # writers outpacing the drain: switch anyway, with a longer hold
MAINTENANCE_WORK_MEM = "256MB"


def _statements(template: str, **context: Any) -> list[Statement]:
    return [Statement(d, s) for d, s in render_steps(template, **context)]


def _update_columns(spec: MigrationSpec) -> list[str]:
    return [c.name for c in spec.written_columns if c.name not in spec.green_key]


def _primary_attached(conn: Conn, spec: MigrationSpec) -> bool:
    return any(ix.primary for ix in catalog.index_names(conn, str(spec.green)))


def build_statements(conn: Conn | None, spec: MigrationSpec) -> list[list[Statement]]:
    """One list of statements per index still to build (each runs on its own connection, in parallel):
    the primary key's unique index and the non-unique indexes; an invalid leftover is dropped first."""
    existing = {} if conn is None else catalog.index_validity(conn, str(spec.green))
    builds: list[list[Statement]] = []
    if not existing.get(spec.primary_key_name, False):
        builds.append(_statements("bulk_indexes.sql.j2", spec=spec, build=True, primary_missing=True, indexes=[],
                                  invalid={spec.primary_key_name} & {n for n, v in existing.items() if not v},
                                  maintenance_work_mem=MAINTENANCE_WORK_MEM))
    invalid = {name for name, valid in existing.items() if not valid}
    for index in spec.indexes:
        if index.unique or existing.get(index.name, False):
            continue
        builds.append(_statements("bulk_indexes.sql.j2", spec=spec, build=True, primary_missing=False,
                                  indexes=[index], invalid=invalid, maintenance_work_mem=MAINTENANCE_WORK_MEM))
    return builds


def attach_statement(spec: MigrationSpec) -> Statement:
    [statement] = _statements("bulk_indexes.sql.j2", spec=spec, build=False)
    return statement


def drain_statement(spec: MigrationSpec, limit: int = DRAIN_KEYS) -> Statement:
    [statement] = _statements("bulk_drain.sql.j2", spec=spec, all=False, limit=limit,
                              update_columns=_update_columns(spec))
    return statement


def switch_unit(spec: MigrationSpec, lock_timeout: str, attempts: int) -> Unit:
    return Unit(f"backfill {spec.name}: switch the forward sync from the change log to dual write "
                f"(blue's writers held off for the last keys)",
                _statements("bulk_switch.sql.j2", spec=spec, forward=forward_sync(spec), lock_timeout=lock_timeout,
                            all=True, update_columns=_update_columns(spec)),
                lock_timeout=lock_timeout, attempts=attempts, phase="backfill")


def _session(spec: MigrationSpec) -> list[Statement]:
    """The drain session's settings (hash joins allowed: a round joins thousands of keys)."""
    return [*_statements("bulk_session.sql.j2", lock_timeout=db.DEFAULT_LOCK_TIMEOUT), session_pin_statement(spec)]


def _build(dsn: str, spec: MigrationSpec, statements: list[Statement], errors: list[BaseException]) -> None:
    try:
        with db.connect(dsn, f"backfill {spec.name} index build", lock_timeout="0") as conn:
            executor = Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
            executor.run(Unit(f"backfill {spec.name}: {statements[-1].description}",
                              [session_pin_statement(spec), *statements], atomic=False, phase="backfill"))
    except BaseException as error:
        errors.append(error)


def build_indexes(conn: Conn, dsn: str, spec: MigrationSpec, lock_timeout: str, attempts: int) -> None:
    builds = build_statements(conn, spec)
    attached = _primary_attached(conn, spec)
    conn.rollback()
    if builds:
        log.info(f"backfill {spec.name}: building {len(builds)} index(es) of green in parallel")
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_build, args=(dsn, spec, b, errors), daemon=True) for b in builds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
    if not attached:
        Executor(conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema).run(
            Unit(f"backfill {spec.name}: green's primary key", [attach_statement(spec)], lock_timeout=lock_timeout,
                 attempts=attempts, phase="backfill"))


def finish(conn: Conn, dsn: str, spec: MigrationSpec, lock_timeout: str, attempts: int) -> None:
    """Indexes, drain and switch; one process at a time, and nothing to do once switched."""
    key = [LOCK_CLASS, spec.name + ":bulk"]
    conn.commit()
    conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", key)
    conn.commit()
    try:
        if catalog.regclass_oid(conn, str(spec.log_table)) is None:     # switched already
            conn.rollback()
            return
        build_indexes(conn, dsn, spec, lock_timeout, attempts)
        with db.connect(dsn, f"backfill {spec.name} drain") as drain_conn:
            executor = Executor(drain_conn, dry_run=False, migration=spec.name, state_schema=spec.state_schema)
            for statement in _session(spec):
                executor.execute(drain_conn, statement)
            drain_conn.commit()
            drain = drain_statement(spec)
            for round_no in range(1, MAX_ROUNDS + 1):
                started = time.perf_counter()
                [(taken, written)] = executor.execute(drain_conn, drain)
                drain_conn.execute(render("journal_event.sql.j2", schema=spec.state_schema), [
                    spec.name, "backfill", drain.description, drain.sql,
                    round((time.perf_counter() - started) * 1000, 3), "ok",
                    json.dumps({"round": round_no, "keys": taken, "rows": written})])
                drain_conn.commit()
                log.info(f"backfill {spec.name}: drain round {round_no}: {taken:,} changed key(s) re-read from blue "
                         f"({written:,} row(s) written) in {time.perf_counter() - started:.2f}s")
                if taken < SWITCH_BELOW:
                    break
            executor.run(switch_unit(spec, lock_timeout, attempts))
        log.info(f"backfill {spec.name}: the forward sync writes green directly now")
    except psycopg.Error as error:
        raise DatabaseError(f"backfill {spec.name}: {db.redact(str(error))}; rerun to resume") from None
    finally:
        if not conn.closed:
            conn.rollback()
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", key)
            conn.commit()


def print_units(conn: Conn | None, spec: MigrationSpec, lock_timeout: str, attempts: int) -> list[Unit]:
    """What `finish` runs, for the dry run."""
    units = [Unit(f"backfill {spec.name}: one index build per connection, in parallel (plain, no writer waits)",
                  [session_pin_statement(spec), *s], atomic=False) for s in build_statements(conn, spec)]
    units.append(Unit(f"backfill {spec.name}: green's primary key", [attach_statement(spec)],
                      lock_timeout=lock_timeout))
    units.append(Unit(f"backfill {spec.name}: drain rounds, repeated while a round finds {SWITCH_BELOW:,} keys "
                      f"or more (at most {MAX_ROUNDS})", [*_session(spec), drain_statement(spec)], atomic=False))
    units.append(switch_unit(spec, lock_timeout, attempts))
    return units
