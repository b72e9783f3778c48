"""One function per CLI verb. The CLI module only parses options and calls these."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from orchestrator import catalog, db, log
from orchestrator.errors import GateRefused, ParityMismatch, UsageError
from orchestrator.executor import Executor
from orchestrator.journal import MigrationRow, get_migration, migration_lock, require_same_plan
from orchestrator.phases import backfill as backfill_phase
from orchestrator.phases import scaffold
from orchestrator.phases import verify as verify_phase
from orchestrator.phases.prepare import prepare_units
from orchestrator.phases.validate import Validation, validate_live
from orchestrator.plan import Plan, load_plan, plan_json_schema
from orchestrator.spec import DEFAULT_STATE_SCHEMA, MigrationSpec

Conn = psycopg.Connection[Any]
PHASES_WITH_SQL = ("prepare", "backfill", "verify")


@dataclass
class Options:
    """Options shared by every command that talks to a database."""

    dsn: str | None = None
    state_schema: str = DEFAULT_STATE_SCHEMA


@contextmanager
def _connection(options: Options, purpose: str) -> Iterator[Conn]:
    conn = db.connect(db.resolve_dsn(options.dsn), purpose)
    try:
        yield conn
    finally:
        conn.close()


def _spec_for(conn: Conn, plan: Plan, options: Options) -> tuple[MigrationSpec, MigrationRow | None]:
    """The journal's spec once prepared (checked against the plan), else one resolved live."""
    row = get_migration(conn, options.state_schema, plan.name)
    if row is not None and row.active:
        require_same_plan(row, plan)
        return row.spec, row
    return validate_live(conn, plan, options.state_schema).spec, row


# -- verbs -------------------------------------------------------------------------------------
def demo(rows: int, keep: bool) -> int:
    from orchestrator import demo as story

    return story.run(rows, keep)


def schema() -> None:
    sys.stdout.write(json.dumps(plan_json_schema(), indent=2) + "\n")


def init(options: Options, table: str, output: Path | None) -> None:
    with _connection(options, "init") as conn:
        text = scaffold.plan_yaml(conn, table)
        conn.rollback()
    if output is None:
        sys.stdout.write(text)
    else:
        if output.exists():
            raise UsageError(f"{output} already exists; not overwriting it")
        output.write_text(text, encoding="utf-8")
        log.success(f"wrote {output}")


def validate(options: Options, plan_path: Path) -> Validation:
    plan = load_plan(plan_path)
    with _connection(options, f"validate {plan.name}") as conn:
        result = validate_live(conn, plan, options.state_schema)
        conn.rollback()
    spec = result.spec
    out = sys.stdout
    out.write(f"plan {plan.name} is valid: {spec.blue.display()} -> {spec.green.display()}\n")
    out.write(f"  key: {', '.join(spec.green_key)} (from blue {', '.join(spec.blue_key)})\n")
    out.write(f"  columns: {len(spec.columns)}; copied from blue: {len(spec.copied_columns)}; "
              f"indexes deferred to backfill: {len(spec.indexes)}; checks: {len(spec.checks)}\n")
    out.write(f"  retired name at cutover: {spec.retired.display()}\n")
    if result.migration is not None:
        out.write(f"  journal: migration {plan.name} is {result.migration.phase}\n")
    if result.dependents:
        out.write("  dependent objects:\n")
        for dep in result.dependents:
            out.write(f"    {dep.kind} {dep.name}: {dep.action}\n")
    else:
        out.write("  dependent objects: none\n")
    return result


def sql(options: Options, plan_path: Path, phase: str) -> None:
    plan = load_plan(plan_path)
    phases = PHASES_WITH_SQL if phase == "all" else (phase,)
    with _connection(options, f"sql {plan.name}") as conn:
        for name in phases:
            if name == "prepare":
                prepare(options, plan_path, dry_run=True, conn=conn)
            elif name == "backfill":
                backfill(options, plan_path, dry_run=True, conn=conn)
            elif name == "verify":
                verify(options, plan_path, dry_run=True, conn=conn)
        conn.rollback()


def prepare(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    if conn is None:
        with _connection(options, f"prepare {plan.name}") as own:
            return prepare(options, plan_path, dry_run=dry_run, conn=own)
    row = get_migration(conn, options.state_schema, plan.name)
    if row is not None and row.active and not dry_run:
        require_same_plan(row, plan)
        _check_prepared(conn, row)
        log.success(f"migration {plan.name} is already prepared (phase {row.phase}); nothing to do")
        conn.rollback()
        return None
    validation = validate_live(conn, plan, options.state_schema)
    conn.rollback()
    units = prepare_units(plan, validation.spec, catalog.current_user(conn))
    executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
    if dry_run:
        for unit in units:
            executor.run(unit)
        return None
    with migration_lock(conn, plan.name):
        for unit in units:
            results = executor.run(unit)
        if not results[-1]:
            raise GateRefused(f"migration {plan.name} is already registered and active; "
                              f"see `bgsync status`")
    log.success(f"prepared {plan.name}: green {validation.spec.green} created, forward triggers enabled "
                f"(ALWAYS) on {validation.spec.blue}")
    return None


def _check_prepared(conn: Conn, row: MigrationRow) -> None:
    """The journal says prepared: the catalog must agree, or we say what drifted."""
    spec = row.spec
    if row.phase in ("prepared", "backfilling", "backfilled", "verified", "mismatch"):
        missing = []
        if catalog.relation_exists(conn, spec.green) is None:
            missing.append(f"green table {spec.green}")
        present = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s)", [str(spec.blue)])}
        missing += [f"trigger {t}" for t in spec.triggers.values() if t not in present]
        if missing:
            raise GateRefused(f"journal says {row.name} is {row.phase} but {', '.join(missing)} "
                              f"missing from the database; run `bgsync rollback` and prepare again")


def backfill(options: Options, plan_path: Path, *, workers: int | None = None, batch_rows: int | None = None,
             max_rows_per_second: float | None = None, dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    settings = backfill_phase.Settings(
        workers=workers or plan.backfill.workers, batch_rows=batch_rows or plan.backfill.batch_rows,
        max_rows_per_second=plan.backfill.max_rows_per_second if max_rows_per_second is None
        else max_rows_per_second)
    dsn = db.resolve_dsn(options.dsn)
    if conn is None:
        with _connection(options, f"backfill {plan.name}") as own:
            return backfill(options, plan_path, workers=workers, batch_rows=batch_rows,
                            max_rows_per_second=max_rows_per_second, dry_run=dry_run, conn=own)
    spec, row = _spec_for(conn, plan, options)
    conn.rollback()
    if dry_run:
        backfill_phase.print_plan(conn, spec, settings)
        return None
    if row is None or not row.active:
        raise GateRefused(f"migration {plan.name} is not prepared; run `bgsync prepare` first")
    _check_prepared(conn, row)
    if row.phase not in ("prepared", "backfilling", "backfilled", "mismatch", "verified"):
        raise GateRefused(f"migration {plan.name} is {row.phase}; backfill runs only before cutover")
    with migration_lock(conn, plan.name, shared=True):
        backfill_phase.run(conn, dsn, spec, settings)
    return None


VERIFIABLE = ("backfilled", "verified", "mismatch", "reverted")


def _prepared_row(conn: Conn, plan: Plan, options: Options, phases: tuple[str, ...], verb: str) -> MigrationRow:
    """The journal row of a prepared migration in one of `phases`, checked against the plan."""
    row = get_migration(conn, options.state_schema, plan.name)
    if row is None or not row.active:
        raise GateRefused(f"migration {plan.name} is not prepared; run `bgsync prepare` first")
    require_same_plan(row, plan)
    if row.phase not in phases:
        raise GateRefused(f"migration {plan.name} is {row.phase}; {verb} runs when it is {' or '.join(phases)}")
    return row


def verify(options: Options, plan_path: Path, *, workers: int | None = None, as_json: bool = False,
           repair: bool = False, dry_run: bool = False, conn: Conn | None = None) -> verify_phase.Report:
    plan = load_plan(plan_path)
    if conn is None:
        with _connection(options, f"verify {plan.name}") as own:
            return verify(options, plan_path, workers=workers, as_json=as_json, repair=repair, dry_run=dry_run,
                          conn=own)
    if dry_run:
        spec, _ = _spec_for(conn, plan, options)
        verify_phase.print_plan(conn, spec)
        conn.rollback()
        return verify_phase.Report(migration=plan.name)
    row = _prepared_row(conn, plan, options, VERIFIABLE, "verify")
    conn.rollback()
    dsn = db.resolve_dsn(options.dsn)
    with migration_lock(conn, plan.name, shared=True):
        report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers)
        if not report.passed and repair:
            if not as_json:
                _print_report(report, as_json)
            count = verify_phase.repair(conn, row.spec, report)
            log.info(f"repaired {count} range(s); verifying again")
            first = report
            report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers)
            report.repaired = first
    _print_report(report, as_json)
    if not report.passed:
        raise ParityMismatch(f"verify {plan.name}: {report.mismatched_rows} row(s) differ between blue and green")
    return report


def _print_report(report: verify_phase.Report, as_json: bool) -> None:
    out = sys.stdout
    if as_json:
        out.write(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")
        return
    verdict = "parity" if report.passed else f"MISMATCH: {report.mismatched_rows} row(s) differ"
    out.write(f"verify {report.migration}: {verdict}; {report.partitions} partitions, "
              f"{report.rows_blue:,} rows in blue, {report.rows_green:,} in green ({report.seconds:.2f}s)\n")
    for m in report.mismatches:
        key = ", ".join(m.key)
        detail = ""
        if m.kind == "different":
            detail = "  " + "; ".join(f"{c}: blue {_show(m.blue, c)} green {_show(m.green, c)}" for c in m.columns)
        out.write(f"  {m.kind:<17} key ({key}){detail}\n")
    if report.mismatched_rows > len(report.mismatches):
        out.write(f"  ... and {report.mismatched_rows - len(report.mismatches)} more\n")


def _show(values: dict[str, str | None] | None, column: str) -> str:
    value = (values or {}).get(column)
    return "NULL" if value is None else repr(value)
