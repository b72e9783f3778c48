"""The command line: parses options (defined once) and calls one function in `commands` per verb.

Conventions: `bgsync --version`/`-V`, `-h`/`--help` everywhere, shell completion (Typer's
`--install-completion`/`--show-completion`), and the global options `--dsn` and `--state-schema`
accepted before the command (`bgsync --dsn URL status`) or after it, the command's own value winning.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, TypeVar

import psycopg
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from orchestrator import commands, db
from orchestrator.errors import BgsyncError, Cancelled
from orchestrator.log import console
from orchestrator.plan import Backfill, Cutover, Verify, parse_duration
from orchestrator.spec import DEFAULT_STATE_SCHEMA

HELP = "bgsync: change large, live PostgreSQL tables blue-green, without downtime."
CONTEXT = {"help_option_names": ["-h", "--help"]}


# -- help without type placeholders -------------------------------------------------------------------
def _no_type(ctx: Any) -> None:
    return None


def _plain(params: list[Any]) -> list[Any]:
    """Help shows `--workers N`, `--dry-run` and `PLAN`, not `<int range>`, `<bool>` and `{plan}`:
    flags take no value, options show their metavar, arguments their name."""
    for param in params:
        if isinstance(param, TyperArgument):
            param.metavar = param.metavar or (param.name or "").upper()
            setattr(param, "display_type_rich", _no_type)  # noqa: B010 (an instance override of the type column)
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = (param.name or "value").upper()
    return params


class Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = str(param.metavar)
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain(super().get_params(ctx))


app = typer.Typer(cls=Group, no_args_is_help=True, pretty_exceptions_enable=False, context_settings=CONTEXT,
                  help=HELP)
plan_app = typer.Typer(cls=Group, no_args_is_help=True, context_settings=CONTEXT,
                       help="The plans recorded in the journal.")
app.add_typer(plan_app, name="plan")


F = TypeVar("F", bound=Callable[..., Any])


def command() -> Callable[[F], F]:
    """`@app.command()` with help that shows no type placeholders."""
    decorator: Callable[[F], F] = app.command(cls=Command)
    return decorator


# -- options, defined once ---------------------------------------------------------------------------
def _duration(value: str) -> str:
    try:
        return parse_duration(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


def _phase_choices(incomplete: str) -> list[str]:
    return [p for p in commands.SQL_PHASES if p.startswith(incomplete)]


def _through_choices(incomplete: str) -> list[str]:
    return [p for p in commands.RUN_PHASES if p.startswith(incomplete)]


def _version(value: bool) -> None:
    if value:
        try:
            version = metadata.version("bgsync")
        except metadata.PackageNotFoundError:
            version = "unknown"
        sys.stdout.write(f"bgsync {version}\n")
        raise typer.Exit()


def _default(model: Any, field: str) -> Any:
    return model.model_fields[field].default


Dsn = Annotated[str | None, typer.Option(
    "--dsn", metavar="DSN", show_default=False,
    help="Connection string (its password never printed); else BGSYNC_DSN, else DATABASE_URL, else libpq's "
         "defaults and PG* variables. Also accepted before the command.")]
StateSchema = Annotated[str | None, typer.Option(
    "--state-schema", metavar="SCHEMA", show_default=False,
    help=f"Schema of bgsync's journal (default: {DEFAULT_STATE_SCHEMA}). Also accepted before the command.")]
PlanFile = Annotated[Path, typer.Argument(metavar="PLAN", help="The plan file (YAML).", show_default=False)]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the SQL instead of running it; changes nothing.")]
Workers = Annotated[int | None, typer.Option(
    "--workers", metavar="N", min=1, max=64, show_default=False,
    help=f"Parallel workers; default: the plan's backfill.workers ({_default(Backfill, 'workers')} when unset).")]
BatchRows = Annotated[int | None, typer.Option(
    "--batch-rows", metavar="N", min=1, show_default=False,
    help=f"Rows per batch; default: the plan's backfill.batch_rows ({_default(Backfill, 'batch_rows')} when "
         f"unset).")]
MaxRowsPerSecond = Annotated[float | None, typer.Option(
    "--max-rows-per-second", metavar="R", min=0, show_default=False,
    help="Global throttle: all workers of all processes of the migration together, 0 = unthrottled; default: "
         f"the plan's backfill.max_rows_per_second ({_default(Backfill, 'max_rows_per_second'):g} when unset).")]
MaxReplicaLag = Annotated[str | None, typer.Option(
    "--max-replica-lag", metavar="DURATION", parser=_duration, show_default=False,
    help="Hold while any standby of pg_stat_replication replays more than this far behind (e.g. 10s), or is "
         "gone, or its lag cannot be read (fail closed).")]
ThrottleSqlOption = Annotated[str | None, typer.Option(
    "--throttle-sql", metavar="SQL", show_default=False,
    help="Hold while this query (one row, one boolean) returns true; checked every 0.25 s.")]
MetricsPort = Annotated[int | None, typer.Option(
    "--metrics-port", metavar="N", min=1, max=65535, show_default=False,
    help="Serve Prometheus metrics (rows, rate, ETA, held seconds, batch latency) on 127.0.0.1:N/metrics.")]
CancelBlockers = Annotated[bool, typer.Option(
    "--cancel-blockers", help="When the flip's lock cannot be had, cancel the sessions whose open transactions "
                              "hold locks on the tables (terminate those idle in transaction), name them, retry.")]
VerifyWorkers = Annotated[int | None, typer.Option(
    "--workers", metavar="N", min=1, max=64, show_default=False,
    help=f"Parallel workers; default: the plan's verify.workers ({_default(Verify, 'workers')} when unset).")]
AsJson = Annotated[bool, typer.Option("--json", help="Machine output on stdout: always one JSON object, with an "
                                                     "`error` member when the command fails.")]
LockTimeout = Annotated[str | None, typer.Option(
    "--lock-timeout", metavar="DURATION", parser=_duration, show_default=False,
    help="How long each attempt waits for a lock: a PostgreSQL duration with its unit (us, ms, s, min, h, d; "
         f"e.g. 200ms, 2s); default: the plan's cutover.lock_timeout ({_default(Cutover, 'lock_timeout')} "
         f"when unset).")]
Attempts = Annotated[int | None, typer.Option(
    "--attempts", metavar="N", min=1, show_default=False,
    help=f"Lock attempts, with jittered backoff; default: the plan's cutover.attempts "
         f"({_default(Cutover, 'attempts')} when unset).")]
Phase = Annotated[str, typer.Option(
    "--phase", metavar="PHASE", autocompletion=_phase_choices,
    help=f"One of {', '.join(commands.PHASES_WITH_SQL)}, or all (every phase, in order). Phases not reached "
         f"yet print the SQL they would run, labeled.")]
Through = Annotated[str, typer.Option(
    "--through", metavar="PHASE", autocompletion=_through_choices,
    help=f"Last phase to run: one of {', '.join(commands.RUN_PHASES)}.")]
Version = Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                       help="Print bgsync's version and exit.")]


@dataclass
class Globals:
    """`--dsn` and `--state-schema` given before the command."""

    dsn: str | None = None
    state_schema: str | None = None


@app.callback()
def _global(ctx: typer.Context, version: Version = False, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    ctx.obj = Globals(dsn=dsn, state_schema=state_schema)


def _options(ctx: typer.Context, dsn: str | None, state_schema: str | None) -> commands.Options:
    """The command's own --dsn/--state-schema win over the ones given before the command."""
    top = ctx.find_object(Globals) or Globals()
    return commands.Options(dsn=dsn or top.dsn, state_schema=state_schema or top.state_schema or DEFAULT_STATE_SCHEMA)


# -- verbs ---------------------------------------------------------------------------------------------
@command()
def schema() -> None:
    """Print the JSON Schema of the plan file."""
    commands.schema()


@command()
def init(ctx: typer.Context,
         table: Annotated[str, typer.Argument(metavar="TABLE", help="The live table, e.g. public.orders.",
                                              show_default=False)],
         output: Annotated[Path | None, typer.Option("-o", "--output", metavar="FILE", show_default=False,
                                                     help="Write the plan here (never overwritten); default: "
                                                          "stdout.")] = None,
         dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Scaffold a plan from the live table."""
    commands.init(_options(ctx, dsn, state_schema), table, output)


@command()
def validate(ctx: typer.Context, plan: PlanFile, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Check the plan's syntax, then against the live catalog (exit 2 when invalid, 1 when edited since prepare)."""
    commands.validate(_options(ctx, dsn, state_schema), plan)


@command()
def sql(ctx: typer.Context, plan: PlanFile, phase: Phase = "all", dsn: Dsn = None,
        state_schema: StateSchema = None) -> None:
    """Print the SQL of a phase, or of every phase (dry run; reads the catalog, changes nothing)."""
    commands.sql(_options(ctx, dsn, state_schema), plan, phase)


@command()
def prepare(ctx: typer.Context, plan: PlanFile, dry_run: DryRun = False, dsn: Dsn = None,
            state_schema: StateSchema = None) -> None:
    """Create green, copy grants, install forward dual-write triggers."""
    commands.prepare(_options(ctx, dsn, state_schema), plan, dry_run=dry_run)


@command()
def backfill(ctx: typer.Context, plan: PlanFile, workers: Workers = None, batch_rows: BatchRows = None,
             max_rows_per_second: MaxRowsPerSecond = None, max_replica_lag: MaxReplicaLag = None,
             throttle_sql: ThrottleSqlOption = None, metrics_port: MetricsPort = None, dry_run: DryRun = False,
             dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Copy history into green with parallel, resumable, throttled workers."""
    commands.backfill(_options(ctx, dsn, state_schema), plan, workers=workers, batch_rows=batch_rows,
                      max_rows_per_second=max_rows_per_second, dry_run=dry_run, max_replica_lag=max_replica_lag,
                      throttle_sql=throttle_sql, metrics_port=metrics_port)


@command()
def pause(ctx: typer.Context, plan: PlanFile, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Hold every worker of every backfill process of the migration (within a second) until `resume`."""
    commands.pause(_options(ctx, dsn, state_schema), plan)


@command()
def resume(ctx: typer.Context, plan: PlanFile, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Let a paused backfill go on."""
    commands.pause(_options(ctx, dsn, state_schema), plan, resume=True)


@command()
def verify(ctx: typer.Context, plan: PlanFile, workers: VerifyWorkers = None, as_json: AsJson = False,
           repair: Annotated[bool, typer.Option("--repair", help="Re-copy mismatched ranges, then verify again.")]
           = False,
           dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Prove parity: count + checksum per partition in one snapshot; exit 1 with the keys on mismatch."""
    commands.verify(_options(ctx, dsn, state_schema), plan, workers=workers, as_json=as_json, repair=repair,
                    dry_run=dry_run)


@command()
def expose(ctx: typer.Context, plan: PlanFile, dry_run: DryRun = False, dsn: Dsn = None,
           state_schema: StateSchema = None) -> None:
    """Both releases at once: two-way sync and a version schema per shape (after a passing verify)."""
    commands.expose(_options(ctx, dsn, state_schema), plan, dry_run=dry_run)


@command()
def cutover(ctx: typer.Context, plan: PlanFile, dry_run: DryRun = False, lock_timeout: LockTimeout = None,
            attempts: Attempts = None, cancel_blockers: CancelBlockers = False, dsn: Dsn = None,
            state_schema: StateSchema = None) -> None:
    """Flip the live name to green (refused unless the last verify passed after the last backfill)."""
    commands.cutover(_options(ctx, dsn, state_schema), plan, lock_timeout=lock_timeout, attempts=attempts,
                     dry_run=dry_run, cancel_blockers=cancel_blockers)


@command()
def rollback(ctx: typer.Context, plan: PlanFile, dry_run: DryRun = False, dsn: Dsn = None,
             state_schema: StateSchema = None) -> None:
    """Before cutover: drop triggers and green. After cutover: swap back, losing no write."""
    commands.rollback(_options(ctx, dsn, state_schema), plan, dry_run=dry_run)


@command()
def finalize(ctx: typer.Context, plan: PlanFile,
             yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
             dry_run: DryRun = False, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """After cutover: drop the reverse sync and the retired blue table (asks first)."""
    commands.finalize(_options(ctx, dsn, state_schema), plan, yes=yes, dry_run=dry_run, confirm=_confirm)


@command()
def status(ctx: typer.Context,
           plan: Annotated[Path | None, typer.Argument(metavar="PLAN", help="Only this plan's migration.",
                                                       show_default=False)] = None,
           as_json: AsJson = False, dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Every migration: phase, backfill progress, last verify, drift against the catalog."""
    commands.status(_options(ctx, dsn, state_schema), plan, as_json=as_json)


@command()
def run(ctx: typer.Context, plan: PlanFile, through: Through = "cutover",
        auto_rollback: Annotated[bool, typer.Option("--auto-rollback", help="Roll back on a parity mismatch or "
                                                                            "a failed cutover.")] = False,
        dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Run the phases in order, stopping at the first failure."""
    commands.run(_options(ctx, dsn, state_schema), plan, through=through, auto_rollback=auto_rollback)


@command()
def demo(rows: Annotated[int, typer.Option("--rows", metavar="N", min=1000, help="Rows in the sample table.")]
         = 200_000,
         keep: Annotated[bool, typer.Option("--keep", help="Leave the server running and print its DSN.")] = False
         ) -> None:
    """The whole story on an embedded PostgreSQL with live writes."""
    raise typer.Exit(commands.demo(rows, keep))


@plan_app.command("show", cls=Command)
def plan_show(ctx: typer.Context,
              name: Annotated[str, typer.Argument(metavar="NAME", help="The migration's name (the plan's `name`).",
                                                  show_default=False)],
              dsn: Dsn = None, state_schema: StateSchema = None) -> None:
    """Print the plan recorded at prepare, as YAML (to restore a plan file edited since)."""
    commands.plan_show(_options(ctx, dsn, state_schema), name)


def _confirm(question: str) -> bool | None:
    """The operator's answer; None when stdin is not a terminal (nobody to ask)."""
    if not sys.stdin.isatty():
        return None
    return bool(typer.confirm(question, default=False, err=True))


# -- the edge: errors become `FAILED: ...` and their exit code -----------------------------------------
def _fail(message: str) -> None:
    console.print(f"FAILED: {db.redact(message)}", style="red", markup=False, highlight=False)


def _json_usage_error(message: str) -> None:
    """`--json` promises one JSON object on stdout, even when the command line itself is wrong."""
    if "--json" in sys.argv[1:]:
        import json

        error = {"message": db.redact(message), "exit_code": 2}
        sys.stdout.write(json.dumps({"version": 1, "error": error}, indent=2, sort_keys=True) + "\n")


def main() -> None:
    """Entry point: BgsyncError becomes `FAILED: ...` and its exit code; passwords never print."""
    db.remember_arguments(sys.argv[1:])
    try:
        app(prog_name="bgsync", standalone_mode=False)
    except Cancelled as cancelled:
        console.print(db.redact(str(cancelled)), style="yellow", markup=False, highlight=False)
        sys.exit(cancelled.exit_code)
    except BgsyncError as error:
        _fail(str(error))
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted")
        sys.exit(130)
    except psycopg.Error as error:
        message = error.diag.message_primary or str(error)
        if isinstance(error, psycopg.errors.LockNotAvailable):
            message += (f"{db.lock_timeout_hint(error)}; nothing was changed, try again when the lock is free")
        _fail(f"database error: {message.strip()}")
        sys.exit(3)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as error:  # click usage errors
        if type(error).__name__ == "NoArgsIsHelpError":
            sys.exit(2)              # `bgsync` alone: the help was printed, nothing failed
        usage = _click_usage_error(error)
        if usage is None:
            raise
        _json_usage_error(usage)
        _fail(usage)
        sys.exit(2)


def _click_usage_error(error: Exception) -> str | None:
    for cls in type(error).__mro__:
        if cls.__name__ in ("UsageError", "ClickException") and hasattr(error, "format_message"):
            return str(error.format_message())
    return None


if __name__ == "__main__":
    main()
