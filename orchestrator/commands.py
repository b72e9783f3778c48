"""One function per CLI verb. The CLI module only parses options and calls these."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from orchestrator import catalog, db, log
from orchestrator.errors import DatabaseError, GateRefused, ParityMismatch, UsageError
from orchestrator.executor import Executor, Unit
from orchestrator.journal import MigrationRow, get_migration, migration_lock, require_same_plan
from orchestrator.phases import backfill as backfill_phase
from orchestrator.phases import cutover as cutover_phase
from orchestrator.phases import rollback as rollback_phase
from orchestrator.phases import scaffold
from orchestrator.phases import status as status_phase
from orchestrator.phases import verify as verify_phase
from orchestrator.phases.prepare import prepare_units
from orchestrator.phases.validate import Validation, validate_live
from orchestrator.plan import Plan, duration_seconds, load_plan, plan_json_schema
from orchestrator.spec import DEFAULT_STATE_SCHEMA, MigrationSpec

Conn = psycopg.Connection[Any]
VERIFIABLE = ("backfilled", "verified", "mismatch", "reverted")
PRE_CUTOVER = ("prepared", "backfilling", "backfilled", "verified", "mismatch", "reverted")
PHASES_WITH_SQL = ("prepare", "backfill", "verify", "cutover", "rollback", "finalize")


@dataclass
class Options:
    """Options shared by every command that talks to a database."""

    dsn: str | None = None
    state_schema: str = DEFAULT_STATE_SCHEMA


def _use(conn: Conn | None, options: Options, purpose: str, lock_timeout: str = db.DEFAULT_LOCK_TIMEOUT
         ) -> AbstractContextManager[Conn]:
    """The caller's connection (`bgsync sql` prints several phases on one), else a new one."""
    return nullcontext(conn) if conn is not None else _connection(options, purpose, lock_timeout)


@contextmanager
def _connection(options: Options, purpose: str, lock_timeout: str = db.DEFAULT_LOCK_TIMEOUT) -> Iterator[Conn]:
    conn = db.connect(db.resolve_dsn(options.dsn), purpose, lock_timeout=lock_timeout)
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
    with _connection(options, f"validate {plan.name}", plan.cutover.lock_timeout) as conn:
        result = validate_live(conn, plan, options.state_schema)
        conn.rollback()
    spec = result.spec
    out = sys.stdout
    out.write(f"plan {plan.name} is valid: {spec.blue.display()} -> {spec.green.display()}\n")
    out.write(f"  key: {', '.join(spec.green_key)} (from blue {', '.join(spec.blue_key)})\n")
    out.write(f"  columns: {len(spec.columns)}; copied from blue: {len(spec.copied_columns)}; "
              f"indexes deferred to backfill: {len(spec.indexes)}; checks: {len(spec.checks)}\n")
    out.write(f"  retired name at cutover: {spec.retired.display()}\n")
    out.write("  after cutover, each blue column is fed by:\n")
    for feed in spec.feeds:
        out.write(f"    {feed.blue_column} <- {feed.source} ({feed.how})\n")
    if spec.settings:
        out.write("  pinned settings: " + ", ".join(f"{k} = {v!r}" for k, v in sorted(spec.settings.items())) + "\n")
    for note in result.notes:
        out.write(f"  note: {note}\n")
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
    with _connection(options, f"sql {plan.name}", plan.cutover.lock_timeout) as conn:
        for name in phases:
            if name == "prepare":
                prepare(options, plan_path, dry_run=True, conn=conn)
            elif name == "backfill":
                backfill(options, plan_path, dry_run=True, conn=conn)
            elif name == "verify":
                verify(options, plan_path, dry_run=True, conn=conn)
            elif name == "cutover":
                cutover(options, plan_path, dry_run=True, conn=conn)
            elif name == "rollback" and phase != "all":
                rollback(options, plan_path, dry_run=True, conn=conn)
            elif name == "finalize" and phase != "all":
                finalize(options, plan_path, dry_run=True)
        conn.rollback()


def prepare(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"prepare {plan.name}", plan.cutover.lock_timeout) as conn:
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
                executor.run(unit)
        log.success(f"prepared {plan.name}: green {validation.spec.green} created, forward triggers enabled "
                    f"(ALWAYS) on {validation.spec.blue}")
        return None


def _check_prepared(conn: Conn, row: MigrationRow) -> None:
    """The journal says prepared: the catalog must agree, or we say what drifted."""
    spec = row.spec
    if row.phase in PRE_CUTOVER:
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
    with _use(conn, options, f"backfill {plan.name}") as conn:
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
    with _use(conn, options, f"verify {plan.name}") as conn:
        if dry_run:
            spec, _ = _spec_for(conn, plan, options)
            verify_phase.print_plan(conn, spec)
            conn.rollback()
            return verify_phase.Report(migration=plan.name)
        row = _prepared_row(conn, plan, options, VERIFIABLE, "verify")
        _check_prepared(conn, row)
        conn.rollback()
        dsn = db.resolve_dsn(options.dsn)
        with migration_lock(conn, plan.name, shared=True):
            wait = duration_seconds(plan.verify.snapshot_wait)
            report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers, snapshot_wait=wait)
            if not report.passed and repair:
                if not as_json:
                    _print_report(report, as_json)
                count = verify_phase.repair(conn, row.spec, report)
                log.info(f"repaired {count} range(s); verifying again")
                first = report
                report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers, snapshot_wait=wait)
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


def _run_fk_validation(executor: Executor, unit: Unit | None) -> None:
    """Foreign keys re-pointed NOT VALID are validated after the lock is gone; a failure is reported,
    the constraint stays enforced for new rows."""
    if unit is None:
        return
    try:
        executor.run(unit)
    except DatabaseError as error:
        log.warn(f"{error}; the foreign key stays NOT VALID (enforced for new rows): fix the data and run "
                 f"ALTER TABLE ... VALIDATE CONSTRAINT")


def cutover(options: Options, plan_path: Path, *, lock_timeout: str | None = None, attempts: int | None = None,
            dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"cutover {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        if dry_run and (row is None or not row.active):
            sys.stdout.write(f"-- cutover {plan.name}: its SQL depends on green's catalog; it is printed once "
                             f"`bgsync prepare` has created green\n\n")
            return None
        row = _prepared_row(conn, plan, options, ("verified",) if not dry_run else PRE_CUTOVER, "cutover")
        if not dry_run and row.phase != "verified":
            raise GateRefused(f"cutover {plan.name} refused: it needs a passing verify after the last backfill")
        _check_prepared(conn, row)
        timeout = lock_timeout or plan.cutover.lock_timeout
        unit, fks = cutover_phase.cutover_units(conn, row.spec, plan.cutover.mode, timeout,
                                                attempts or plan.cutover.attempts, catalog.current_user(conn))
        conn.rollback()
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        if dry_run:
            executor.run(unit)
            fk_unit = cutover_phase.validate_fk_unit(row.spec, fks, "cutover")
            if fk_unit:
                executor.run(fk_unit)
            return None
        with migration_lock(conn, plan.name):
            started = time.perf_counter()
            executor.run(unit)
            held = time.perf_counter() - started
            _run_fk_validation(executor, cutover_phase.validate_fk_unit(row.spec, fks, "cutover"))
        log.success(f"cut over {plan.name}: {row.spec.blue.display()} is now green ({plan.cutover.mode} mode); "
                    f"reverse sync keeps {row.spec.retired.display()} current (transaction {held * 1000:.0f} ms)")
        return None


def rollback(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"rollback {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        if row is None or row.phase == "rolled_back":
            log.success(f"migration {plan.name} has nothing to roll back")
            return None
        if row.phase == "finalized":
            raise GateRefused(f"migration {plan.name} is finalized: the retired table is gone, nothing to roll back to")
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        timeout, attempts = plan.cutover.lock_timeout, plan.cutover.attempts
        fks: list[Any] = []
        if row.phase == "cut_over":
            unit, fks = rollback_phase.uncutover_unit(conn, row.spec, row, timeout, attempts,
                                                      catalog.current_user(conn))
        else:
            unit = rollback_phase.teardown_unit(row.spec, timeout, attempts)
        conn.rollback()
        if dry_run:
            executor.run(unit)
            return None
        with migration_lock(conn, plan.name):
            executor.run(unit)
            _run_fk_validation(executor, cutover_phase.validate_fk_unit(row.spec, fks, "rollback"))
        if row.phase == "cut_over":
            log.success(f"rolled back the cutover of {plan.name}: {row.spec.blue.display()} is blue again; green is "
                        f"kept in sync; verify, then cut over again (or roll back again to drop green)")
        else:
            log.success(f"rolled back {plan.name}: triggers and green {row.spec.green.display()} dropped")
        return None


def finalize(options: Options, plan_path: Path, *, yes: bool = False, dry_run: bool = False,
             confirm: Any = None) -> None:
    plan = load_plan(plan_path)
    with _connection(options, f"finalize {plan.name}", plan.cutover.lock_timeout) as conn:
        row = _prepared_row(conn, plan, options, ("cut_over",), "finalize")
        unit = rollback_phase.finalize_unit(row.spec, row, plan.cutover.lock_timeout, plan.cutover.attempts)
        conn.rollback()
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        if dry_run:
            executor.run(unit)
            return
        if not yes:
            question = (f"Drop the retired table {row.spec.retired.display()} and the reverse sync? "
                        f"Rollback is impossible afterwards")
            if confirm is None or not confirm(question):
                raise GateRefused(f"finalize {plan.name} not confirmed; rerun with --yes to drop "
                                  f"{row.spec.retired.display()}")
        with migration_lock(conn, plan.name):
            executor.run(unit)
    log.success(f"finalized {plan.name}: {row.spec.retired.display()} and the reverse sync are gone")


def status(options: Options, plan_path: Path | None, *, as_json: bool = False) -> dict[str, Any]:
    name = load_plan(plan_path).name if plan_path is not None else None
    with _connection(options, "status") as conn:
        report = status_phase.status(conn, options.state_schema, name)
        conn.rollback()
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    else:
        _print_status(report)
    drifted = [m for m in report["migrations"] if m["drift"]]
    for m in drifted:
        for line in m["drift"]:
            log.warn(f"DRIFT in {m['name']}: {line}")
    if drifted:
        raise GateRefused(f"drift in {', '.join(m['name'] for m in drifted)}: the catalog disagrees with the journal")
    return report


def _print_status(report: dict[str, Any]) -> None:
    out = sys.stdout
    if not report["migrations"]:
        out.write("no migrations\n")
    for m in report["migrations"]:
        b = m["backfill"]
        out.write(f"{m['name']}: {m['phase']}  {m['source']} -> {m['target']} ({m['mode']} mode)\n")
        rate = f", {b['rows_per_second']:,.0f} rows/s" if b["rows_per_second"] else ""
        eta = f", ETA {b['eta_seconds']:.0f}s" if b["eta_seconds"] else ""
        out.write(f"  backfill: {b['partitions_done']}/{b['partitions']} partitions, {b['rows_copied']:,} of "
                  f"~{b['rows_estimate']:,} rows{rate}{eta}\n")
        v = m["verify"]
        verdict = "never run" if v is None else (
            f"{'parity' if v['passed'] else 'MISMATCH (' + str(v['mismatched_rows']) + ' rows)'} at {v['finished_at']}")
        out.write(f"  last verify: {verdict}\n")
        out.write(f"  drift: {'; '.join(m['drift']) if m['drift'] else 'none (triggers and tables as expected)'}\n")


RUN_PHASES = ("validate", "prepare", "backfill", "verify", "cutover")


def run(options: Options, plan_path: Path, *, through: str = "cutover", auto_rollback: bool = False) -> None:
    """The phases in order; stop at the first failure. With auto_rollback, a parity mismatch or a failed
    cutover rolls back and exits 1."""
    steps = RUN_PHASES[:RUN_PHASES.index(through) + 1]
    for phase in steps:
        log.console.rule(f"[bold]{phase}")
        try:
            if phase == "validate":
                validate(options, plan_path)
            elif phase == "prepare":
                prepare(options, plan_path)
            elif phase == "backfill":
                backfill(options, plan_path)
            elif phase == "verify":
                verify(options, plan_path)
            else:
                cutover(options, plan_path)
        except (ParityMismatch, DatabaseError) as error:
            if not auto_rollback or phase not in ("verify", "cutover"):
                raise
            log.warn(f"{phase} failed ({error}); rolling back")
            rollback(options, plan_path)
            raise GateRefused(f"run stopped at {phase} and rolled back: {error}") from None
