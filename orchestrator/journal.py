"""The state journal in its own schema: migrations, chunks, events; and the advisory locks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg

from orchestrator.errors import GateRefused
from orchestrator.executor import Statement, Unit
from orchestrator.names import QualifiedName, quote_ident
from orchestrator.plan import Plan, diff_fields
from orchestrator.render import render_steps
from orchestrator.spec import CheckSpec, Feed, GreenColumn, IndexSpec, MigrationSpec, ViewSpec

Conn = psycopg.Connection[Any]
LOCK_CLASS = 0x6267  # "bg": the first key of every bgsync advisory lock
ACTIVE_PHASES = ("prepared", "backfilling", "backfilled", "verified", "mismatch", "cut_over")


@dataclass(frozen=True)
class MigrationRow:
    name: str
    phase: str
    plan_hash: str
    plan: dict[str, Any]
    spec: MigrationSpec
    cutover: dict[str, Any] | None = None
    plan_source: str | None = None     # the plan file's text at prepare (None in older journals)

    @property
    def active(self) -> bool:
        return self.phase not in ("rolled_back", "finalized")


def journal_unit(schema: str) -> Unit:
    steps = render_steps("journal.sql.j2", schema=schema)
    return Unit("state journal", [Statement(d, s) for d, s in steps], phase="prepare")


def phase_statement(spec: MigrationSpec, phase: str, *, keep_exposed: bool = False) -> Statement:
    [(description, text)] = render_steps("migration_phase.sql.j2", schema=spec.state_schema,
                                         name=spec.name, phase=phase, keep_exposed=keep_exposed)
    return Statement(description, text)


def green_written_statement(spec: MigrationSpec) -> Statement:
    [(description, text)] = render_steps("migration_green_written.sql.j2", schema=spec.state_schema, name=spec.name)
    return Statement(description, text)


def session_pin_statement(spec: MigrationSpec) -> Statement:
    """The settings bgsync's own sessions share with its trigger functions (search_path and, when an
    expression is not IMMUTABLE, the settings recorded at prepare)."""
    [(description, text)] = render_steps("session_pin.sql.j2", spec=spec)
    return Statement(description, text)


def journal_exists(conn: Conn, schema: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", [f"{quote_ident(schema)}.migrations"]).fetchone()
    return bool(row and row[0])


def get_migration(conn: Conn, schema: str, name: str) -> MigrationRow | None:
    if not journal_exists(conn, schema):
        return None
    row = conn.execute(
        f"SELECT name, phase, plan_hash, plan, spec, to_jsonb(m) -> 'cutover', to_jsonb(m) ->> 'plan_source'"
        f" FROM {quote_ident(schema)}.migrations AS m WHERE name = %s", [name]).fetchone()
    if row is None:
        return None
    return MigrationRow(name=row[0], phase=row[1], plan_hash=row[2], plan=row[3], spec=spec_from_json(row[4]),
                        cutover=row[5], plan_source=row[6])


def require_same_plan(row: MigrationRow, plan: Plan) -> None:
    """A plan edited after prepare would make green disagree with what the triggers do: refuse."""
    if row.plan_hash == plan.structural_hash():
        return
    changes = diff_fields(row.plan, plan.structural_dump())
    raise GateRefused(
        f"plan {plan.name} was edited after prepare (hash {row.plan_hash} -> {plan.structural_hash()}):\n  "
        + "\n  ".join(changes or ["(structure differs)"])
        + f"\nrestore the prepared plan (`bgsync plan show {plan.name}` prints it), or roll back and prepare again")


def spec_to_json(spec: MigrationSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def spec_from_json(data: dict[str, Any]) -> MigrationSpec:
    fields = dict(data)
    for key in ("blue", "green", "retired", "forward_function"):
        fields[key] = QualifiedName(**fields[key])
    fields["columns"] = [GreenColumn(**c) for c in fields["columns"]]
    fields["indexes"] = [IndexSpec(**i) for i in fields["indexes"]]
    fields["checks"] = [CheckSpec(**c) for c in fields["checks"]]
    fields["feeds"] = [Feed(**f) for f in fields.get("feeds", [])]
    fields["views"] = [ViewSpec(QualifiedName(**v["name"]), v["query"]) for v in fields.get("views", [])]
    fields["grants"] = [tuple(g) for g in fields["grants"]]
    return MigrationSpec(**fields)


def _lock_holder(conn: Conn, name: str) -> str:
    row = conn.execute(
        """SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = hashtext(%s)::oid
              AND l.objsubid = 2 AND l.granted AND l.pid <> pg_backend_pid() LIMIT 1""",
        [LOCK_CLASS, name]).fetchone()
    return f"{row[1] or 'a session'} (pid {row[0]})" if row else "another session"


@contextmanager
def migration_lock(conn: Conn, name: str, *, shared: bool = False) -> Iterator[None]:
    """Keep two commands from working on one migration at once; backfills share the lock."""
    function = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
    row = conn.execute(f"SELECT {function}(%s, hashtext(%s))", [LOCK_CLASS, name]).fetchone()
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.commit()
    if not (row and row[0]):
        raise GateRefused(f"migration {name} is busy: {_lock_holder(conn, name)} holds its lock; "
                          f"wait for it to finish or stop it")
    try:
        yield
    finally:
        if not conn.closed:
            unlock = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.rollback()
                conn.execute(f"SELECT {unlock}(%s, hashtext(%s))", [LOCK_CLASS, name])
                conn.commit()
            except psycopg.Error:
                pass
