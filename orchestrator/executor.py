"""The single choke point: every statement bgsync renders is either printed (dry run) or run here.

Phases return `Unit`s (what they would run) instead of running anything, so the dry run and the
real run share one code path: the same rendered text is printed or executed.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg
from psycopg import errors as pgerrors

from orchestrator import log
from orchestrator.errors import DatabaseError, GateRefused
from orchestrator.render import as_server_text, render

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Statement:
    description: str
    sql: str
    params: Sequence[Any] | None = None
    expect_rows: str = ""    # when set: no row returned means a gate refused; the transaction rolls back


@dataclass(frozen=True)
class Unit:
    """Statements that run together: in one transaction when `atomic`, else one by one in autocommit."""

    title: str
    statements: list[Statement]
    atomic: bool = True
    lock_timeout: str | None = None
    attempts: int = 1
    phase: str = ""


@dataclass
class Executor:
    """Runs or prints units; records every statement run in the journal's event log."""

    conn: Conn | None
    dry_run: bool
    migration: str = ""
    state_schema: str = "bgsync"
    out: TextIO = field(default_factory=lambda: sys.stdout)
    on_give_way: Callable[[Unit], None] | None = None   # after a lock attempt failed, before the next one
    _journal_ready: bool = False
    _current: str = ""

    # -- printing -----------------------------------------------------------------------------
    def print_unit(self, unit: Unit) -> None:
        lines = [f"-- {unit.title}"]
        if unit.atomic:
            lines.append("BEGIN;")
            if unit.lock_timeout:
                lines.append(f"SET LOCAL lock_timeout = {_quote(unit.lock_timeout)};")
        for statement in unit.statements:
            lines.append(f"-- {statement.description}")
            text = statement.sql
            if statement.params is not None:
                lines.append("-- parameters: " + ", ".join(
                    f"${i} = {p}" for i, p in enumerate(statement.params, start=1)))
                text = as_server_text(text)
            lines.append(text + ";")
        if unit.atomic:
            lines.append("COMMIT;")
        self.out.write("\n".join(lines) + "\n\n")

    # -- running ------------------------------------------------------------------------------
    def run(self, unit: Unit) -> list[list[tuple[Any, ...]]]:
        """Run a unit; lock timeouts are retried with jittered backoff up to `unit.attempts`."""
        if self.dry_run:
            self.print_unit(unit)
            return []
        assert self.conn is not None
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._run_once(unit)
            except GIVES_WAY as error:
                # a lock wait ran out (lock_timeout, or the statement_timeout that bounds a flip's lock
                # waits), or bgsync was the deadlock victim: the transaction rolled back, try again
                if isinstance(error, pgerrors.QueryCanceled) and not _timed_out(error):
                    self._record_failure(unit, error)
                    raise DatabaseError(f"{unit.title}: {_describe(error)}") from None
                self._record_failure(unit, error)
                if attempt >= unit.attempts:
                    raise DatabaseError(
                        f"{unit.title}: could not get a lock within "
                        f"{f'lock_timeout {unit.lock_timeout}' if unit.lock_timeout else 'the lock_timeout'} "
                        f"after {attempt} attempt(s); nothing was changed") from None
                pause = min(5.0, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random())
                log.warn(f"{unit.title}: {_why(error)} (attempt {attempt}/{unit.attempts}), "
                         f"retrying in {pause:.2f}s")
                if self.on_give_way is not None:
                    self.on_give_way(unit)
                time.sleep(pause)
            except psycopg.Error as error:
                self._record_failure(unit, error)
                step = f" at step '{self._current}'" if self._current else ""
                raise DatabaseError(f"{unit.title}{step}: {_describe(error)}") from None

    def _run_once(self, unit: Unit) -> list[list[tuple[Any, ...]]]:
        assert self.conn is not None
        results: list[list[tuple[Any, ...]]] = []
        timings: list[tuple[Statement, float]] = []
        if not unit.atomic:
            was_autocommit = self.conn.autocommit
            if not was_autocommit:
                self.conn.rollback()
                self.conn.autocommit = True
            try:
                for statement in unit.statements:
                    started = time.perf_counter()
                    results.append(self.execute(self.conn, statement))
                    timings.append((statement, time.perf_counter() - started))
                    self._record(unit, [timings[-1]])
            finally:
                if not was_autocommit and not self.conn.closed:
                    self.conn.autocommit = False
            return results
        with self.conn.transaction():
            if unit.lock_timeout:
                self.conn.execute("SELECT set_config('lock_timeout', %s, true)", [unit.lock_timeout])
            for statement in unit.statements:
                started = time.perf_counter()
                results.append(self.execute(self.conn, statement))
                timings.append((statement, time.perf_counter() - started))
                if statement.expect_rows and not results[-1]:
                    raise GateRefused(statement.expect_rows)
            self._record(unit, timings)
        return results

    def execute(self, conn: Conn, statement: Statement) -> list[tuple[Any, ...]]:
        """Execute exactly one rendered statement (extended protocol: a second statement errors)."""
        return self.execute_counted(conn, statement)[0]

    def execute_counted(self, conn: Conn, statement: Statement) -> tuple[list[tuple[Any, ...]], int]:
        """Like execute, also returning the number of rows the statement affected."""
        self._current = statement.description
        with conn.cursor(binary=True) as cur:
            cur.execute(statement.sql, statement.params if statement.params is not None else None)
            rows = cur.fetchall() if cur.description else []
            return rows, cur.rowcount

    # -- journal ------------------------------------------------------------------------------
    def _journal_exists(self, conn: Conn) -> bool:
        if not self._journal_ready:
            row = conn.execute("SELECT to_regclass(%s)", [f'"{self.state_schema}".events']).fetchone()
            self._journal_ready = bool(row and row[0])
        return self._journal_ready

    def _record(self, unit: Unit, timings: list[tuple[Statement, float]], conn: Conn | None = None) -> None:
        conn = conn or self.conn
        assert conn is not None
        if not self._journal_exists(conn):
            return
        insert = render("journal_event.sql.j2", schema=self.state_schema)
        with conn.cursor() as cur:
            cur.executemany(insert, [
                (self.migration, unit.phase, s.description, s.sql, round(seconds * 1000, 3), "ok", None)
                for s, seconds in timings])

    def _record_failure(self, unit: Unit, error: BaseException) -> None:
        """Log a failed unit in autocommit after its transaction rolled back."""
        if self.conn is None or self.conn.closed:
            return
        try:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.rollback()
            if self._journal_exists(self.conn):
                insert = render("journal_event.sql.j2", schema=self.state_schema)
                self.conn.execute(insert, (self.migration, unit.phase, unit.title, None, None,
                                           "error", _describe(error)))
            if not self.conn.autocommit:
                self.conn.commit()
        except psycopg.Error:
            pass


# Errors after which a unit rolled back whole and may simply run again.
GIVES_WAY = (pgerrors.LockNotAvailable, pgerrors.DeadlockDetected, pgerrors.QueryCanceled)


def _timed_out(error: psycopg.Error) -> bool:
    return "statement timeout" in (error.diag.message_primary or "")


def _why(error: psycopg.Error) -> str:
    if isinstance(error, pgerrors.DeadlockDetected):
        return "gave way to an application transaction (deadlock)"
    return "lock not available"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _describe(error: BaseException) -> str:
    if isinstance(error, psycopg.Error) and error.diag.message_primary:
        text = error.diag.message_primary
        if error.diag.message_detail:
            text += f" ({error.diag.message_detail})"
        return text
    return str(error).strip()
