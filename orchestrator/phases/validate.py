"""validate: the plan against the live catalog. Reads only; its probes run in a rolled-back transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from orchestrator import catalog, origin
from orchestrator.catalog import Dependent, TableInfo
from orchestrator.errors import DatabaseError, PlanError
from orchestrator.executor import Executor, Statement
from orchestrator.journal import MigrationRow, get_migration
from orchestrator.names import QualifiedName, quote_ident
from orchestrator.plan import Plan
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, build_spec

Conn = psycopg.Connection[Any]
RELKINDS = {"v": "view", "m": "materialized view", "p": "partitioned table", "f": "foreign table",
            "S": "sequence", "i": "index", "c": "composite type", "t": "TOAST table"}


@dataclass
class Validation:
    plan: Plan
    blue: TableInfo
    spec: MigrationSpec
    dependents: list[Dependent]
    migration: MigrationRow | None


def validate_live(conn: Conn, plan: Plan, state_schema: str) -> Validation:
    """Every live check of the design; raises PlanError naming each failing field or object."""
    oid = catalog.regclass_oid(conn, plan.source)
    if oid is None:
        raise PlanError([f"source: table {plan.source} does not exist in {origin.describe(conn)}"])
    blue = catalog.load_table(conn, oid)
    if blue.relkind != "r":
        raise PlanError([f"source: {blue.name.display()} is a {RELKINDS.get(blue.relkind, blue.relkind)}, "
                         f"not a plain table"])
    spec, problems = build_spec(plan, blue, state_schema)
    if spec is None:
        raise PlanError(problems)
    migration = get_migration(conn, state_schema, plan.name)
    ours = migration is not None and migration.active
    if not catalog.schema_exists(conn, spec.green.schema):
        problems.append(f"target: schema {spec.green.schema!r} does not exist")
    for field, name in (("target", spec.green), ("cutover.retired_name", spec.retired)):
        kind = catalog.relation_exists(conn, name)
        if kind and not ours:
            what = RELKINDS.get(kind, "table")
            problems.append(f"{field}: {name.display()} already exists ({what}); choose a free name")
    for col in spec.columns:
        if col.sequence and catalog.relation_exists(conn, QualifiedName(spec.green.schema, col.sequence)) \
                and not ours:
            problems.append(f"columns: sequence {col.sequence!r} for green column {col.name!r} already exists")
    problems += typecheck(conn, plan, spec, blue)
    if problems:
        raise PlanError(problems)
    return Validation(plan=plan, blue=blue, spec=spec, dependents=catalog.dependents(conn, oid),
                      migration=migration)


def typecheck(conn: Conn, plan: Plan, spec: MigrationSpec, blue: TableInfo) -> list[str]:
    """Run each expression the way bgsync will (assignment casts, CHECK and index rules) on a probe."""
    problems: list[str] = []
    steps = render_steps(
        "validate.sql.j2", plan_columns=plan.columns, spec_columns=spec.columns, blue=blue.name,
        checks=plan.checks, indexes=plan.indexes,
        col_index={c.name: i for i, c in enumerate(plan.columns)})
    runner = Executor(conn=None, dry_run=False)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('search_path', %s, true), set_config('lock_timeout', %s, true),"
                         " set_config('statement_timeout', '30s', true)",
                         [", ".join(quote_ident(s) for s in spec.search_path), plan.cutover.lock_timeout])
            types_ok = True
            for field, text in steps:
                if field == "columns" and not types_ok:
                    break
                try:
                    with conn.transaction():
                        runner.execute(conn, Statement(field, text))
                except psycopg.errors.LockNotAvailable:
                    raise
                except psycopg.Error as error:
                    message = (error.diag.message_primary or str(error)).strip()
                    problems.append(f"{field}: {message}")
                    if field.endswith(".type"):
                        types_ok = False
                    if field == "columns":
                        break
    except psycopg.errors.LockNotAvailable:
        raise DatabaseError(f"source {blue.name.display()} is locked by another session beyond lock_timeout "
                            f"{plan.cutover.lock_timeout}; nothing was changed, try again when it is free") from None
    return problems
