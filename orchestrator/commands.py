"""One function per CLI verb. The CLI module only parses options and calls these.

Every verb says where a migration stands in the DBA's words (`states`), treats a repeat of what is
already done as a no-op that says so (exit 0), and names the command that comes next when it
refuses. Dry runs print, through the same `Executor`, the units a real run executes.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import yaml

from orchestrator import catalog, db, log, origin, states
from orchestrator.errors import BgsyncError, Cancelled, DatabaseError, GateRefused, ParityMismatch, UsageError
from orchestrator.executor import Executor, Unit
from orchestrator.journal import MigrationRow, get_migration, journal_unit, migration_lock, require_same_plan
from orchestrator.names import QualifiedName
from orchestrator.phases import backfill as backfill_phase
from orchestrator.phases import cutover as cutover_phase
from orchestrator.phases import expose as expose_phase
from orchestrator.phases import operations, scaffold
from orchestrator.phases import rollback as rollback_phase
from orchestrator.phases import status as status_phase
from orchestrator.phases import verify as verify_phase
from orchestrator.phases.prepare import prepare_units
from orchestrator.phases.validate import Validation, validate_live
from orchestrator.plan import Plan, duration_seconds, load_plan, parse_plan, plan_json_schema
from orchestrator.spec import DEFAULT_STATE_SCHEMA, MigrationSpec

Conn = psycopg.Connection[Any]
Confirm = Callable[[str], bool | None]     # the answer, or None when there is no terminal to ask on
VERIFIABLE = ("backfilled", "verified", "mismatch", "reverted", "exposed")
PRE_CUTOVER = ("prepared", "backfilling", "backfilled", "verified", "mismatch", "reverted", "exposed")
BACKFILLABLE = ("prepared", "backfilling", "backfilled", "mismatch", "verified")
# TODO(expose): add "expose" between "verify" and "cutover" once the expose phase exists, with a dry run
# that prints its units through the Executor like the others; `sql --phase all` then includes it.
PHASES_WITH_SQL = ("prepare", "backfill", "verify", "expose", "cutover", "rollback", "finalize")
SQL_PHASES = (*PHASES_WITH_SQL, "all")
RUN_PHASES = ("validate", "prepare", "backfill", "verify", "expose", "cutover")


@dataclass
class Options:
    """Options shared by every command that talks to a database."""

    dsn: str | None = None
    state_schema: str = DEFAULT_STATE_SCHEMA
    hints: bool = True       # log the command that comes next (the demo runs it itself)


def _use(conn: Conn | None, options: Options, purpose: str, lock_timeout: str = db.DEFAULT_LOCK_TIMEOUT
         ) -> AbstractContextManager[Conn]:
    """The caller's connection (`bgsync sql` prints several phases on one), else a new one."""
    return nullcontext(conn) if conn is not None else _connection(options, purpose, lock_timeout)


@contextmanager
def _connection(options: Options, purpose: str, lock_timeout: str = db.DEFAULT_LOCK_TIMEOUT) -> Iterator[Conn]:
    source = origin.remember(options.dsn)
    try:
        conn = db.connect(db.resolve_dsn(options.dsn), purpose, lock_timeout=lock_timeout)
    except DatabaseError as error:
        raise DatabaseError(f"{error} (connection from {source})") from None
    try:
        yield conn
    finally:
        conn.close()


def _note(*lines: str) -> None:
    """SQL comments printed before a dry run's units: what this SQL is, and when it would run."""
    sys.stdout.write("".join(f"-- {line}\n" for line in lines) + "\n")


def _where(conn: Conn, options: Options) -> str:
    journal = "" if options.state_schema == DEFAULT_STATE_SCHEMA else f", journal schema {options.state_schema}"
    return f"{origin.describe(conn)}{journal}"


def _phase(row: MigrationRow | None) -> str | None:
    return None if row is None else row.phase


def _refused(verb: str, conn: Conn, options: Options, plan: Plan, plan_path: Path, row: MigrationRow | None,
             why: str = "") -> GateRefused:
    """`VERB refused: migration NAME is <in words>[; why]; run `<next command>``."""
    phase = _phase(row)
    where = f" in {_where(conn, options)}" if row is None else ""
    return GateRefused(f"{verb} refused: migration {plan.name} is {states.words(phase)}{where}{why}"
                       f"{states.run_next(phase, plan_path)}")


def _next(options: Options, phase: str | None, plan_path: Path) -> None:
    following = states.next_command(phase, plan_path)
    if following is not None and options.hints:
        log.info(f"next: {following}")


def _spec_for(conn: Conn, plan: Plan, options: Options) -> tuple[MigrationSpec, MigrationRow | None]:
    """The journal's spec once prepared (checked against the plan), else one resolved live from the plan."""
    row = get_migration(conn, options.state_schema, plan.name)
    if row is not None and row.active:
        require_same_plan(row, plan)
        return row.spec, row
    return validate_live(conn, plan, options.state_schema).spec, row


class _JsonOutput:
    """Machine output: the verb prints its JSON object and marks it done; on a failure before that, an
    object with an `error` member takes its place (and the exit code stays the failure's)."""

    def __init__(self) -> None:
        self.done = False

    def write(self, report: dict[str, Any], error: BgsyncError | None = None) -> None:
        if error is not None:
            report = {**report, "error": {"message": db.redact(str(error)), "exit_code": error.exit_code}}
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        self.done = True


@contextmanager
def _json_errors(as_json: bool) -> Iterator[_JsonOutput]:
    output = _JsonOutput()
    try:
        yield output
    except (BgsyncError, psycopg.Error) as error:
        if as_json and not output.done:
            if isinstance(error, BgsyncError):
                message, code = str(error), error.exit_code
            else:
                message, code = f"database error: {error.diag.message_primary or error}", 3
            sys.stdout.write(json.dumps({"version": status_phase.STATUS_VERSION,
                                         "error": {"message": db.redact(message.strip()), "exit_code": code}},
                                        indent=2, sort_keys=True) + "\n")
        raise


# -- verbs -------------------------------------------------------------------------------------
def demo(rows: int, keep: bool) -> int:
    from orchestrator import demo as story

    return story.run(rows, keep)


def schema() -> None:
    sys.stdout.write(json.dumps(plan_json_schema(), indent=2) + "\n")


def init(options: Options, table: str, output: Path | None) -> None:
    if output is not None and output.exists():
        raise UsageError(f"{output} already exists; not overwriting it")
    with _connection(options, "init") as conn:
        text = scaffold.plan_yaml(conn, table)
        conn.rollback()
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        log.success(f"wrote {output}: a starting plan with every column of {table}; edit it, then run "
                    f"`{states.command('validate', output)}`")


def validate(options: Options, plan_path: Path) -> Validation:
    plan = load_plan(plan_path)
    with _connection(options, f"validate {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        if row is not None and row.active:
            require_same_plan(row, plan)   # a plan edited after prepare is not valid for its migration
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
        out.write(f"  journal: migration {plan.name} is {states.words(result.migration.phase)}\n")
    if result.dependents:
        out.write("  dependent objects:\n")
        for dep in result.dependents:
            out.write(f"    {dep.kind} {dep.name}: {dep.action}\n")
    else:
        out.write("  dependent objects: none\n")
    return result


def sql(options: Options, plan_path: Path, phase: str) -> None:
    """The SQL of one phase, or of all of them in order, from the plan and the catalog; changes nothing."""
    if phase not in SQL_PHASES:
        raise UsageError(f"--phase: unknown phase {phase!r}; choose from {', '.join(SQL_PHASES)}")
    plan = load_plan(plan_path)
    phases = PHASES_WITH_SQL if phase == "all" else (phase,)
    with _connection(options, f"sql {plan.name}", plan.cutover.lock_timeout) as conn:
        for name in phases:
            sys.stdout.write(f"-- phase: {name}\n")
            if name == "prepare":
                prepare(options, plan_path, dry_run=True, conn=conn)
            elif name == "backfill":
                backfill(options, plan_path, dry_run=True, conn=conn)
            elif name == "verify":
                verify(options, plan_path, dry_run=True, conn=conn)
            elif name == "expose":
                if plan.versions is None:
                    _note(f"expose {plan.name}: the plan has no `versions`, so there is no window for two releases")
                else:
                    expose(options, plan_path, dry_run=True, conn=conn)
            elif name == "cutover":
                cutover(options, plan_path, dry_run=True, conn=conn)
            elif name == "rollback":
                rollback(options, plan_path, dry_run=True, conn=conn, every_case=phase == "all")
            elif name == "finalize":
                finalize(options, plan_path, dry_run=True, conn=conn)
        conn.rollback()


def plan_show(options: Options, name: str) -> None:
    """The plan recorded at prepare, as YAML on stdout (to restore a plan file edited since)."""
    with _connection(options, f"plan show {name}") as conn:
        row = get_migration(conn, options.state_schema, name)
        if row is None:
            raise UsageError(f"NAME: no migration {name} in {_where(conn, options)}; `bgsync status` lists them")
        conn.rollback()
    if row.plan_source is not None:
        sys.stdout.write(row.plan_source)
        return
    # journals from before the plan file was kept: the recorded structure (the tuning knobs were not kept)
    recorded = parse_plan(row.plan).model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
    sys.stdout.write(f"# plan {name} as recorded at prepare; this journal kept only the fields that define green\n"
                     f"# (backfill, verify, cutover.lock_timeout and cutover.attempts were not recorded)\n")
    sys.stdout.write(yaml.safe_dump(recorded, sort_keys=False, allow_unicode=True, width=100))


def prepare(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"prepare {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        if row is not None and row.active:
            require_same_plan(row, plan)
            if not dry_run:
                _check_prepared(conn, row, plan_path)
                log.success(f"migration {plan.name} is already prepared ({states.words(row.phase)}); nothing to do")
                _next(options, row.phase, plan_path)
                conn.rollback()
                return None
            _note(f"migration {plan.name} is already prepared ({states.words(row.phase)}): prepare would do "
                  f"nothing; this is the SQL it ran")
        validation = validate_live(conn, plan, options.state_schema)
        conn.rollback()
        units = prepare_units(plan, validation.spec, catalog.current_user(conn),
                              plan_text=plan_path.read_text(encoding="utf-8"), properties=validation.properties)
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
        _next(options, "prepared", plan_path)
        return None


def _check_prepared(conn: Conn, row: MigrationRow, plan_path: Path) -> None:
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
            raise GateRefused(f"journal says {row.name} is {states.words(row.phase)} but {', '.join(missing)} "
                              f"missing from the database; run `{states.command('rollback', plan_path)}` and "
                              f"prepare again")


def backfill(options: Options, plan_path: Path, *, workers: int | None = None, batch_rows: int | None = None,
             max_rows_per_second: float | None = None, dry_run: bool = False, conn: Conn | None = None,
             max_replica_lag: str | None = None, throttle_sql: str | None = None,
             metrics_port: int | None = None) -> None:
    plan = load_plan(plan_path)
    if throttle_sql is not None and not throttle_sql.strip():
        raise UsageError("--throttle-sql: the query is empty")
    settings = backfill_phase.Settings(
        workers=workers or plan.backfill.workers, batch_rows=batch_rows or plan.backfill.batch_rows,
        max_rows_per_second=plan.backfill.max_rows_per_second if max_rows_per_second is None
        else max_rows_per_second, lock_timeout=plan.cutover.lock_timeout, attempts=plan.cutover.attempts,
        held_partition_wait=plan.backfill.held_partition_wait, batch_time=plan.backfill.batch_time,
        max_replica_lag=max_replica_lag, throttle_sql=throttle_sql, metrics_port=metrics_port)
    dsn = db.resolve_dsn(options.dsn)
    with _use(conn, options, f"backfill {plan.name}") as conn:
        if dry_run:
            spec, _ = _spec_for(conn, plan, options)
            conn.rollback()
            backfill_phase.print_plan(conn, spec, settings)
            return None
        row = get_migration(conn, options.state_schema, plan.name)
        if row is None or not row.active:
            raise _refused("backfill", conn, options, plan, plan_path, row)
        require_same_plan(row, plan)
        _check_prepared(conn, row, plan_path)
        if row.phase not in BACKFILLABLE:
            why = "; the backfill runs before cutover" if row.phase == "cut_over" else \
                "; green is complete and kept in sync" if row.phase == "reverted" else ""
            raise _refused("backfill", conn, options, plan, plan_path, row, why)
        conn.rollback()
        with migration_lock(conn, plan.name, shared=True):
            backfill_phase.run(conn, dsn, row.spec, settings)
        _next(options, "backfilled", plan_path)
        return None


def pause(options: Options, plan_path: Path, *, resume: bool = False) -> None:
    """Set (or clear) the pause flag every backfill worker of every process reads between batches."""
    plan = load_plan(plan_path)
    verb = "resume" if resume else "pause"
    with _connection(options, f"{verb} {plan.name}") as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        if row is None or not row.active:
            raise _refused(verb, conn, options, plan, plan_path, row)
        require_same_plan(row, plan)
        executor = Executor(conn, dry_run=False, migration=plan.name, state_schema=options.state_schema)
        if not catalog.relation_exists(conn, QualifiedName(options.state_schema, "runs")):
            conn.rollback()
            executor.run(journal_unit(options.state_schema))
        conn.rollback()
        was = status_phase.backfill_state(conn, options.state_schema, plan.name)
        conn.rollback()      # the flag is set in its own transaction, committed before we look for holders
        executor.run(Unit(f"{verb} {plan.name}", [operations.pause_statement(options.state_schema, plan.name,
                                                                              not resume)], phase="backfill"))
        if resume:
            if not was["paused"]:
                log.success(f"migration {plan.name} is not paused; nothing to do")
            else:
                log.success(f"resumed {plan.name}: {_processes(was['processes'])} go on with their next batch")
            if was["processes"] == 0 and row.phase in ("prepared", "backfilling"):
                _next(options, row.phase, plan_path)
            return None
        if was["paused"]:
            log.success(f"migration {plan.name} is already paused; nothing to do")
            return None
        # the running processes notice within a quarter second; wait until each says it holds
        deadline = time.monotonic() + 2.0
        state = was
        while time.monotonic() < deadline and state["processes"] > state["holding"]:
            time.sleep(0.1)
            state = status_phase.backfill_state(conn, options.state_schema, plan.name)
            conn.rollback()
        log.success(f"paused {plan.name}: {_processes(state['processes'])} holding ({state['holding']} confirmed); "
                    f"`{states.command('resume', plan_path)}` goes on")
        return None


def _processes(count: int) -> str:
    return "no backfill process is running" if count == 0 else \
        "1 backfill process" if count == 1 else f"{count} backfill processes"


def verify(options: Options, plan_path: Path, *, workers: int | None = None, as_json: bool = False,
           repair: bool = False, dry_run: bool = False, conn: Conn | None = None) -> verify_phase.Report:
    plan = load_plan(plan_path)
    with _json_errors(as_json and not dry_run) as json_out, _use(conn, options, f"verify {plan.name}") as conn:
        if dry_run:
            spec, _ = _spec_for(conn, plan, options)
            verify_phase.print_plan(conn, spec)
            conn.rollback()
            return verify_phase.Report(migration=plan.name)
        row = get_migration(conn, options.state_schema, plan.name)
        if row is None or not row.active:
            raise _refused("verify", conn, options, plan, plan_path, row)
        require_same_plan(row, plan)
        if row.phase not in VERIFIABLE:
            why = "; verify compares blue and green before cutover" if row.phase == "cut_over" else ""
            raise _refused("verify", conn, options, plan, plan_path, row, why)
        _check_prepared(conn, row, plan_path)
        conn.rollback()
        dsn = db.resolve_dsn(options.dsn)
        with migration_lock(conn, plan.name, shared=True):
            wait = duration_seconds(plan.verify.snapshot_wait)
            age = duration_seconds(plan.verify.max_snapshot_age)
            report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers, snapshot_wait=wait,
                                      max_snapshot_age=age)
            if not report.passed and repair:
                if not as_json:
                    _print_report(report)
                count = verify_phase.repair(conn, row.spec, report)
                log.info(f"repaired {count} range(s); verifying again")
                first = report
                report = verify_phase.run(conn, dsn, row.spec, workers or plan.verify.workers, snapshot_wait=wait,
                                      max_snapshot_age=age)
                report.repaired = first
        mismatch = None if report.passed else ParityMismatch(
            f"verify {plan.name}: {report.mismatched_rows} row(s) differ between blue and green; run "
            f"`{states.command('verify --repair', plan_path)}` to copy them again from blue")
        if as_json:
            json_out.write(report.as_json(), mismatch)
        else:
            _print_report(report)
        if mismatch is not None:
            raise mismatch
        _next(options, "verified", plan_path)
        return report


def _print_report(report: verify_phase.Report) -> None:
    out = sys.stdout
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


def _rows(count: int) -> str:
    return "1 row that differs" if count == 1 else f"{count:,} rows that differ"


def expose(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None) -> None:
    """Both releases at once: two-way sync and the version schemas, after a passing verify."""
    plan = load_plan(plan_path)
    with _use(conn, options, f"expose {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        phase = _phase(row)
        if row is not None and row.active:
            require_same_plan(row, plan)
        if plan.versions is None:
            raise UsageError(f"versions: plan {plan.name} has no `versions: {{blue: SCHEMA, green: SCHEMA}}`; expose "
                             f"creates those two schemas")
        window_open = phase == "exposed" or (phase == "cut_over" and bool((row.cutover or {}).get("window"))
                                             if row is not None else False)
        if row is not None and window_open:
            done = f"migration {plan.name} is already exposed: both releases write; nothing to do"
            if dry_run:
                _note(f"{done} (expose would run nothing)")
            else:
                log.success(done)
            return None
        if not dry_run and phase != "verified":
            raise _refused("expose", conn, options, plan, plan_path, row, "; expose needs a passing verify")
        if row is None or not row.active:
            spec = validate_live(conn, plan, options.state_schema).spec
            _note(f"expose {plan.name}: not prepared yet; this is the SQL expose runs after a passing verify")
        else:
            spec = row.spec
            _check_prepared(conn, row, plan_path)
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        if dry_run:
            unit = expose_phase.expose_unit(conn, spec, plan.cutover.lock_timeout, plan.cutover.attempts,
                                            catalog.current_user(conn))
            conn.rollback()
            executor.run(unit)
            return None
        conn.rollback()
        with migration_lock(conn, plan.name):
            unit = expose_phase.expose_unit(conn, spec, plan.cutover.lock_timeout, plan.cutover.attempts,
                                            catalog.current_user(conn))
            conn.rollback()
            executor.run(unit)
        assert plan.versions is not None
        log.success(f"exposed {plan.name}: both releases write; search_path {plan.versions.blue} for blue's shape, "
                    f"{plan.versions.green} for green's")
        _next(options, "exposed", plan_path)
        return None


def cutover(options: Options, plan_path: Path, *, lock_timeout: str | None = None, attempts: int | None = None,
            dry_run: bool = False, conn: Conn | None = None, cancel_blockers: bool = False) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"cutover {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        phase = _phase(row)
        if row is not None and row.active:
            require_same_plan(row, plan)
        if row is not None and phase in ("cut_over", "finalized"):
            done = (f"migration {plan.name} is already cut over{' and finalized' if phase == 'finalized' else ''}: "
                    f"{row.spec.blue.display()} is green; nothing to do")
            if dry_run:
                _note(f"{done} (cutover would run nothing)")
            else:
                log.success(done)
                _next(options, phase, plan_path)
            return None
        if not dry_run and phase == "exposed" and not status_phase.last_verify_passed(conn, options.state_schema,
                                                                                       plan.name):
            raise GateRefused(f"cutover refused: the last verify (in the window) found differences; run "
                              f"`{states.command('verify --repair', plan_path)}`")
        if not dry_run and phase not in ("verified", "exposed"):
            if phase == "mismatch":
                last = status_phase.last_verify(conn, options.state_schema, plan.name)
                count = int(last["mismatched_rows"]) if last else 0
                raise GateRefused(f"cutover refused: the last verify found {_rows(count)}"
                                  f"{states.run_next(phase, plan_path)}")
            raise _refused("cutover", conn, options, plan, plan_path, row,
                           "; cutover needs a passing verify after the last backfill")
        if row is None or not row.active:
            spec = validate_live(conn, plan, options.state_schema).spec
            _note(f"cutover {plan.name}: not prepared yet; this is the SQL cutover runs after prepare, backfill "
                  f"and a passing verify (green's shape comes from the plan)")
        else:
            spec = row.spec
            _check_prepared(conn, row, plan_path)
            if dry_run and phase != "verified":
                _note(f"cutover {plan.name}: migration is {states.words(phase)}; this is the SQL cutover runs "
                      f"once a verify passes")
        timeout = lock_timeout or plan.cutover.lock_timeout
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)

        def flip() -> tuple[list[Unit], Unit]:
            units = cutover_phase.cutover_units(conn, spec, plan.cutover.mode, timeout,
                                                attempts or plan.cutover.attempts, catalog.current_user(conn),
                                                with_keys=phase in states.BACKFILLED, window=phase == "exposed")
            conn.rollback()
            return units

        if dry_run:
            before, unit = flip()
            for prior in [*before, unit]:
                executor.run(prior)
            return None
        conn.rollback()
        with migration_lock(conn, plan.name):      # a second cutover is refused before it reads anything
            before, unit = flip()
            for prior in before:
                executor.run(prior)
            if cancel_blockers:
                executor.on_give_way = cutover_phase.BlockerCanceller(conn, spec, timeout).cancel
            started = time.perf_counter()
            executor.run(unit)
            held = time.perf_counter() - started
        log.success(f"cut over {plan.name}: {spec.blue.display()} is now green ({plan.cutover.mode} mode); "
                    f"reverse sync keeps {spec.retired.display()} current (transaction {held * 1000:.0f} ms)")
        _next(options, "cut_over", plan_path)
        return None


def rollback(options: Options, plan_path: Path, *, dry_run: bool = False, conn: Conn | None = None,
             every_case: bool = False) -> None:
    """Before cutover: drop the triggers and green. After cutover: swap back. A dry run prints what
    rollback runs now (or, not prepared yet, after prepare); `every_case` adds the swap back that it
    runs once cut over."""
    plan = load_plan(plan_path)
    with _use(conn, options, f"rollback {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        phase = _phase(row)
        if phase in ("finalized", "finalizing"):
            why = ("the retired table is gone, there is nothing to roll back to" if phase == "finalized" else
                   "finalize has begun: writes no longer reach the retired table; run "
                   f"`{states.command('finalize', plan_path)}` to finish")
            if dry_run:
                _note(f"rollback {plan.name}: migration is finalized: {why}; rollback would run nothing")
                return None
            raise GateRefused(f"rollback refused: migration {plan.name} is finalized: {why}")
        if not dry_run and (row is None or phase == "rolled_back"):
            where = f" in {_where(conn, options)}" if row is None else ""
            log.success(f"migration {plan.name} is {'already rolled back' if row else 'not prepared'}{where}; "
                        f"nothing to roll back")
            return None
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        timeout, attempts = plan.cutover.lock_timeout, plan.cutover.attempts
        user = catalog.current_user(conn)
        if row is not None and row.active:
            spec = row.spec
            if dry_run and phase != "cut_over":
                _note(f"rollback {plan.name} before cutover (migration is {states.words(phase)}): drops the "
                      f"forward triggers and green")
        else:
            spec = validate_live(conn, plan, options.state_schema).spec
            _note(f"rollback {plan.name}: migration is {states.words(phase)}; this is what rollback runs after "
                  f"prepare, before cutover: it drops the forward triggers and green")

        def rollback_units() -> list[Unit]:
            if row is not None and phase == "cut_over":
                return [rollback_phase.uncutover_unit(conn, spec, row.cutover or {}, timeout, attempts, user)]
            if phase == "exposed":
                return [expose_phase.close_unit(conn, spec, timeout, attempts)]
            return [rollback_phase.teardown_unit(conn, spec, timeout, attempts)]

        if dry_run:
            units = rollback_units()
            swap_back: list[Unit] = []
            if every_case and phase != "cut_over":
                swap_back = [rollback_phase.predicted_uncutover_unit(conn, spec, plan.cutover.mode, timeout,
                                                                     attempts, user)]
            conn.rollback()
            for unit in units:
                executor.run(unit)
            if swap_back:
                _note(f"rollback {plan.name} after cutover (not cut over yet; this is the SQL it runs then): "
                      f"swaps blue back and resumes forward sync")
                for unit in swap_back:
                    executor.run(unit)
            return None
        conn.rollback()
        with migration_lock(conn, plan.name):      # a second rollback is refused before it reads anything
            units = rollback_units()
            conn.rollback()
            for unit in units:
                executor.run(unit)
        if phase == "exposed":
            log.success(f"closed the window of {plan.name}: {spec.blue.display()} is live, green is kept in sync one "
                        f"way; the version schemas are gone")
            _next(options, "reverted", plan_path)
        elif phase == "cut_over":
            log.success(f"rolled back the cutover of {plan.name}: {spec.blue.display()} is blue again; green is "
                        f"kept in sync; verify, then cut over again (or roll back again to drop green)")
            _next(options, "reverted", plan_path)
        else:
            log.success(f"rolled back {plan.name}: triggers and green {spec.green.display()} dropped")
        return None


def finalize(options: Options, plan_path: Path, *, yes: bool = False, dry_run: bool = False,
             confirm: Confirm | None = None, conn: Conn | None = None) -> None:
    plan = load_plan(plan_path)
    with _use(conn, options, f"finalize {plan.name}", plan.cutover.lock_timeout) as conn:
        row = get_migration(conn, options.state_schema, plan.name)
        phase = _phase(row)
        if row is not None and phase == "finalized":
            done = (f"migration {plan.name} is already finalized: {row.spec.retired.display()} and the reverse "
                    f"sync are gone; nothing to do")
            if dry_run:
                _note(f"{done} (finalize would run nothing)")
            else:
                log.success(done)
            return None
        if row is not None and row.active:
            require_same_plan(row, plan)
        timeout, attempts = plan.cutover.lock_timeout, plan.cutover.attempts
        if row is None or phase not in ("cut_over", "finalizing"):
            if not dry_run:
                raise _refused("finalize", conn, options, plan, plan_path, row, "; finalize runs after cutover")
            spec = row.spec if row is not None and row.active else validate_live(conn, plan, options.state_schema).spec
            _note(f"finalize {plan.name}: migration is {states.words(phase)}; finalize runs after cutover, and this "
                  f"is the SQL it runs then")
            units = rollback_phase.finalize_units(conn, spec, cutover_phase.plan_flip(conn, spec, plan.cutover.mode)
                                                  .record, timeout, attempts, predicted=True)
        else:
            spec = row.spec
            units = rollback_phase.finalize_units(conn, spec, row.cutover or {}, timeout, attempts)
            if phase == "finalizing":      # an interrupted finalize: the reverse sync is already gone
                units = units[1:]
        conn.rollback()
        executor = Executor(conn, dry_run=dry_run, migration=plan.name, state_schema=options.state_schema)
        if dry_run:
            for unit in units:
                executor.run(unit)
            return None
        if not yes:
            question = (f"Drop the retired table {spec.retired.display()} and the reverse sync? "
                        f"Rollback is impossible afterwards")
            answer = None if confirm is None else confirm(question)
            if answer is None:
                raise GateRefused(f"finalize {plan.name} needs a confirmation and there is no terminal to ask on; "
                                  f"run `{states.command('finalize', plan_path)} --yes` to drop "
                                  f"{spec.retired.display()}")
            if not answer:
                raise Cancelled("finalize cancelled; nothing was changed")
        with migration_lock(conn, plan.name):
            for unit in units:
                executor.run(unit)
    log.success(f"finalized {plan.name}: {spec.retired.display()} and the reverse sync are gone")
    return None


def status(options: Options, plan_path: Path | None, *, as_json: bool = False) -> dict[str, Any]:
    with _json_errors(as_json) as json_out:
        name = load_plan(plan_path).name if plan_path is not None else None
        with _connection(options, "status") as conn:
            report = status_phase.status(conn, options.state_schema, name)
            where = _where(conn, options)
            conn.rollback()
        drifted = [m for m in report["migrations"] if m["drift"]]
        error = None if not drifted else GateRefused(
            f"drift in {', '.join(m['name'] for m in drifted)}: the catalog disagrees with the journal")
        if as_json:
            json_out.write(report, error)
        else:
            _print_status(report, where)
        for m in drifted:
            for line in m["drift"]:
                log.warn(f"DRIFT in {m['name']}: {line}")
        if error is not None:
            raise error
        return report


def _print_status(report: dict[str, Any], where: str) -> None:
    out = sys.stdout
    if not report["migrations"]:
        out.write(f"no migrations in {where}\n")
    for m in report["migrations"]:
        b = m["backfill"]
        out.write(f"{m['name']}: {states.words(m['phase'])}  {m['source']} -> {m['target']} ({m['mode']} mode)\n")
        rate = f", {b['rows_per_second']:,.0f} rows/s" if b["rows_per_second"] else ""
        eta = f", ETA {b['eta_seconds']:.0f}s" if b["eta_seconds"] else ""
        out.write(f"  backfill: {_backfill_state(b)}{b['partitions_done']}/{b['partitions']} partitions, "
                  f"{b['rows_copied']:,} of ~{b['rows_estimate']:,} rows{rate}{eta}\n")
        if m.get("change_log_keys") is not None:
            out.write(f"  sync: bulk mode, {m['change_log_keys']:,} changed key(s) in the change log, re-read from "
                      f"blue before the switch to dual write\n")
        verdict = _verdict(m["verify"])
        if m["rolled_back_at"] is not None and m["verify"] is None:
            verdict = f"never run since the rollback at {m['rolled_back_at']}"
            if m["verify_before_rollback"] is not None:
                verdict += f"; before the rollback: {_verdict(m['verify_before_rollback'])}"
        out.write(f"  last verify: {verdict}\n")
        out.write(f"  drift: {'; '.join(m['drift']) if m['drift'] else 'none (triggers and tables as expected)'}\n")


def _backfill_state(b: dict[str, Any]) -> str:
    """`running (2 processes, heartbeat 0.3s ago), `, `paused (...)`, `interrupted (...)`, or nothing."""
    state = b.get("state")
    if state is None:
        return ""
    if state == "interrupted":
        return "interrupted (no backfill process is running; rerun `bgsync backfill` to resume), "
    alive = f"{_processes(b['processes'])}, heartbeat {b['heartbeat_age_seconds']}s ago" if b["processes"] else \
        "no backfill process is running"
    held = f"; held: {'; '.join(b['held'])}" if b["held"] and state == "running" else ""
    return f"{state} ({alive}{held}), "


def _verdict(verify: dict[str, Any] | None) -> str:
    if verify is None:
        return "never run"
    result = "parity" if verify["passed"] else f"MISMATCH ({verify['mismatched_rows']} rows)"
    return f"{result} at {verify['finished_at']}"


def run(options: Options, plan_path: Path, *, through: str = "cutover", auto_rollback: bool = False) -> None:
    """The phases in order; stop at the first failure. With auto_rollback, a parity mismatch or a failed
    cutover rolls back and exits 1."""
    if through not in RUN_PHASES:
        raise UsageError(f"--through: unknown phase {through!r}; choose from {', '.join(RUN_PHASES)}")
    steps = [p for p in RUN_PHASES[:RUN_PHASES.index(through) + 1] if p != "expose" or through == "expose"]
    inner = replace(options, hints=False)        # run itself goes on to the next phase
    for phase in steps:
        log.console.rule(f"[bold]{phase}")
        try:
            if phase == "validate":
                validate(inner, plan_path)
            elif phase == "prepare":
                prepare(inner, plan_path)
            elif phase == "backfill":
                backfill(inner, plan_path)
            elif phase == "verify":
                verify(inner, plan_path)
            elif phase == "expose":
                expose(inner, plan_path)
            else:
                cutover(inner, plan_path)
        except (ParityMismatch, DatabaseError) as error:
            if not auto_rollback or phase not in ("verify", "cutover"):
                raise
            log.warn(f"{phase} failed ({error}); rolling back")
            rollback(inner, plan_path)
            raise GateRefused(f"run stopped at {phase} and rolled back: {error}") from None
    reached = {"validate": None, "prepare": "prepared", "backfill": "backfilled", "verify": "verified",
               "expose": "exposed", "cutover": "cut_over"}[through]
    _next(options, reached, plan_path)
