"""The command line: parses options (defined once) and calls one function in `commands` per verb."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import psycopg
import typer

from orchestrator import commands, db
from orchestrator.errors import BgsyncError
from orchestrator.log import console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="bgsync: change large, live PostgreSQL tables blue-green, without downtime.")

Dsn = Annotated[str | None, typer.Option("--dsn", help="Connection string; else BGSYNC_DSN, DATABASE_URL, PG*.",
                                         show_default=False)]
StateSchema = Annotated[str, typer.Option("--state-schema", help="Schema of bgsync's journal.")]
PlanFile = Annotated[Path, typer.Argument(help="The plan file (YAML).", show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the SQL instead of running it.")]


def _options(dsn: str | None, state_schema: str) -> commands.Options:
    return commands.Options(dsn=dsn, state_schema=state_schema)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the plan file."""
    commands.schema()


@app.command()
def init(table: Annotated[str, typer.Argument(help="The live table, e.g. public.orders.")],
         output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here, not stdout.")] = None,
         dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Scaffold a plan from the live table."""
    commands.init(_options(dsn, state_schema), table, output)


@app.command()
def validate(plan: PlanFile, dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Check the plan's syntax, then against the live catalog (exit 2 when invalid)."""
    commands.validate(_options(dsn, state_schema), plan)


@app.command()
def sql(plan: PlanFile,
        phase: Annotated[str, typer.Option("--phase", help="prepare, backfill or all.")] = "all",
        dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Print the SQL of a phase (dry run; changes nothing)."""
    if phase not in (*commands.PHASES_WITH_SQL, "all"):
        raise typer.BadParameter(f"unknown phase {phase!r}; choose from "
                                 f"{', '.join((*commands.PHASES_WITH_SQL, 'all'))}", param_hint="--phase")
    commands.sql(_options(dsn, state_schema), plan, phase)


@app.command()
def prepare(plan: PlanFile, dry_run: DryRun = False, dsn: Dsn = None,
            state_schema: StateSchema = "bgsync") -> None:
    """Create green, copy grants, install forward dual-write triggers."""
    commands.prepare(_options(dsn, state_schema), plan, dry_run=dry_run)


@app.command()
def backfill(plan: PlanFile,
             workers: Annotated[int | None, typer.Option("--workers", min=1, max=64)] = None,
             batch_rows: Annotated[int | None, typer.Option("--batch-rows", min=1)] = None,
             max_rows_per_second: Annotated[float | None, typer.Option("--max-rows-per-second", min=0)] = None,
             dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Copy history into green with parallel, resumable, throttled workers."""
    commands.backfill(_options(dsn, state_schema), plan, workers=workers, batch_rows=batch_rows,
                      max_rows_per_second=max_rows_per_second, dry_run=dry_run)


@app.command()
def demo(rows: Annotated[int, typer.Option("--rows", min=1000, help="Rows in the sample table.")] = 200_000,
         keep: Annotated[bool, typer.Option("--keep", help="Leave the server running and print its DSN.")] = False
         ) -> None:
    """The whole story on an embedded PostgreSQL with live writes."""
    raise typer.Exit(commands.demo(rows, keep))


@app.command()
def verify(plan: PlanFile,
           workers: Annotated[int | None, typer.Option("--workers", min=1, max=64)] = None,
           as_json: Annotated[bool, typer.Option("--json", help="The report as JSON on stdout.")] = False,
           repair: Annotated[bool, typer.Option("--repair", help="Re-copy mismatched ranges, then verify again.")]
           = False,
           dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Prove parity: count + checksum per partition in one snapshot; exit 1 with the keys on mismatch."""
    commands.verify(_options(dsn, state_schema), plan, workers=workers, as_json=as_json, repair=repair,
                    dry_run=dry_run)


Timeout = Annotated[str | None, typer.Option("--lock-timeout", help="Per attempt, e.g. 2s; default: the plan's.")]
Attempts = Annotated[int | None, typer.Option("--attempts", min=1, help="Lock attempts; default: the plan's.")]


@app.command()
def cutover(plan: PlanFile, dry_run: DryRun = False, lock_timeout: Timeout = None, attempts: Attempts = None,
            dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Flip the live name to green (refused unless the last verify passed after the last backfill)."""
    if lock_timeout is not None:
        from orchestrator.plan import DURATION
        if not DURATION.match(lock_timeout):
            raise typer.BadParameter("not a PostgreSQL duration such as 200ms or 2s", param_hint="--lock-timeout")
    commands.cutover(_options(dsn, state_schema), plan, lock_timeout=lock_timeout, attempts=attempts,
                     dry_run=dry_run)


@app.command()
def rollback(plan: PlanFile, dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Before cutover: drop triggers and green. After cutover: swap back, losing no write."""
    commands.rollback(_options(dsn, state_schema), plan, dry_run=dry_run)


@app.command()
def finalize(plan: PlanFile, yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
             dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """After cutover: drop the reverse sync and the retired blue table (asks first)."""
    commands.finalize(_options(dsn, state_schema), plan, yes=yes, dry_run=dry_run, confirm=_confirm)


@app.command()
def status(plan: Annotated[Path | None, typer.Argument(help="Only this plan's migration.", show_default=False)]
           = None,
           as_json: Annotated[bool, typer.Option("--json", help="Machine-readable, schema-stable.")] = False,
           dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Every migration: phase, backfill progress, last verify, drift against the catalog."""
    commands.status(_options(dsn, state_schema), plan, as_json=as_json)


@app.command()
def run(plan: PlanFile,
        through: Annotated[str, typer.Option("--through", help="Last phase: validate, prepare, backfill, "
                                                               "verify or cutover.")] = "cutover",
        auto_rollback: Annotated[bool, typer.Option("--auto-rollback", help="Roll back on a parity mismatch or "
                                                                            "a failed cutover.")] = False,
        dsn: Dsn = None, state_schema: StateSchema = "bgsync") -> None:
    """Run the phases in order, stopping at the first failure."""
    if through not in commands.RUN_PHASES:
        raise typer.BadParameter(f"choose from {', '.join(commands.RUN_PHASES)}", param_hint="--through")
    commands.run(_options(dsn, state_schema), plan, through=through, auto_rollback=auto_rollback)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    return bool(typer.confirm(question, default=False, err=True))


def main() -> None:
    """Entry point: BgsyncError becomes `FAILED: ...` and its exit code; passwords never print."""
    try:
        app(standalone_mode=False)
    except BgsyncError as error:
        console.print(f"FAILED: {db.redact(str(error))}", style="red", markup=False, highlight=False)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print("FAILED: interrupted", style="red")
        sys.exit(130)
    except psycopg.Error as error:
        message = error.diag.message_primary or str(error)
        if isinstance(error, psycopg.errors.LockNotAvailable):
            message += ("; another session holds a lock bgsync needs to read the catalog; nothing was changed, "
                        "try again when it is free")
        console.print(f"FAILED: database error: {db.redact(message.strip())}", style="red", markup=False,
                      highlight=False)
        sys.exit(3)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as error:  # click usage errors
        usage = _click_usage_error(error)
        if usage is None:
            raise
        console.print(f"FAILED: {db.redact(usage)}", style="red", markup=False, highlight=False)
        sys.exit(2)


def _click_usage_error(error: Exception) -> str | None:
    for cls in type(error).__mro__:
        if cls.__name__ in ("UsageError", "ClickException") and hasattr(error, "format_message"):
            return str(error.format_message())
    return None


if __name__ == "__main__":
    main()
