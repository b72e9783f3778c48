"""bgsync demo: the whole story on an embedded PostgreSQL while an application keeps writing."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from rich.console import Console
from rich.table import Table

from orchestrator import commands, log
from orchestrator.embedded import create_database, embedded_server
from orchestrator.errors import ParityMismatch
from orchestrator.workload import ORDERS, Workload, load_sample_schema, seed_sample, unqualified

# The same plan as plans/orders_numeric.yaml (a test keeps the two equal).
DEMO_PLAN = """\
# The commonest blue-green change: a type change in place. `amount` goes from integer to
# numeric(12,2) under the same name, and a new NOT NULL column with a default appears, so the
# application keeps writing the same statements before and after the cutover.
name: orders_numeric
source: public.orders
target: public.orders_v2
columns:
  - {name: id, type: bigint, not_null: true}
  - {name: customer_id, type: bigint, not_null: true}
  - {name: amount, type: "numeric(12,2)", not_null: true, reverse: "round(amount)::integer"}
  - {name: state, type: text, not_null: true}
  - {name: note, type: text}
  - {name: created_at, type: timestamptz, not_null: true}
  - {name: currency, type: text, not_null: true, default: "'EUR'"}
indexes:
  - {columns: [customer_id]}
  - {columns: [state], where: "state <> 'void'"}
checks:
  - {name: orders_amount_nonneg, expression: "amount >= 0"}
backfill: {workers: 2, batch_rows: 10000}
cutover: {mode: rename, retired_name: orders_old, lock_timeout: 2s, attempts: 10}
versions: {blue: app_v1, green: app_v2}
"""

# An independent projection of blue and green for the parity check the demo shows.
PROJECTION = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM public.{}"


@dataclass
class Story:
    dsn: str
    timings: list[tuple[str, float]] = field(default_factory=list)

    def step(self, title: str, action: Callable[[], object]) -> None:
        log.console.rule(f"[bold]{title}")
        started = time.perf_counter()
        action()
        self.timings.append((title, time.perf_counter() - started))


def parity_rows(dsn: str, blue: str, green: str) -> int:
    b, g = PROJECTION.format(blue), PROJECTION.format(green)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM ((({g}) EXCEPT ALL ({b})) UNION ALL (({b}) EXCEPT ALL ({g}))) d"
                           ).fetchone()
    return int(row[0]) if row else -1


def plant_corruption(dsn: str) -> None:
    """Damage green behind the trigger's back: a lost row and a wrong value."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM public.orders_v2 WHERE id = (SELECT min(id) FROM public.orders_v2)")
        conn.execute("UPDATE public.orders_v2 SET amount = amount + 0.01 WHERE id = (SELECT max(id) FROM public.orders"
                     " WHERE id < 1000)")
    log.info("planted: one row deleted from green, one amount changed by 0.01")


def run(rows: int, keep: bool) -> int:
    """Run the story; returns the exit code (0 when parity holds and no writer failed)."""
    with embedded_server(keep=keep) as server, tempfile.TemporaryDirectory(prefix="bgsync-demo-") as folder:
        dsn = create_database(server.dsn, "bgsync_demo")
        plan = Path(folder) / "orders_numeric.yaml"
        plan.write_text(DEMO_PLAN)
        options = commands.Options(dsn=dsn, hints=False)
        story = Story(dsn)
        log.info(f"embedded PostgreSQL started; loading {rows:,} orders")

        def load() -> None:
            load_sample_schema(dsn)
            seed_sample(dsn, orders=rows)

        def caught_by_verify() -> None:
            plant_corruption(dsn)
            try:
                commands.verify(options, plan)
            except ParityMismatch as error:
                log.info(f"verify caught it (exit 1): {error}")
            else:
                raise RuntimeError("verify missed the planted corruption")

        stalls: dict[str, float] = {}
        releases: list[Workload] = []

        def flip(title: str, action: Callable[[], object]) -> None:
            workload.longest_stall = 0.0
            story.step(title, action)
            time.sleep(0.5)
            stalls[title] = workload.longest_stall

        story.step("load sample data", load)
        workload = Workload(dsn, ORDERS, writers=4, key_space=rows, pause=0.005).start()
        try:
            story.step("validate", lambda: commands.validate(options, plan))
            story.step("prepare", lambda: commands.prepare(options, plan))
            story.step("backfill", lambda: commands.backfill(options, plan))
            story.step("verify", lambda: commands.verify(options, plan))
            story.step("planted corruption caught by verify", caught_by_verify)
            story.step("verify --repair", lambda: commands.verify(options, plan, repair=True))
            flip("expose: both releases write", lambda: commands.expose(options, plan))
            releases.extend(start_releases(dsn, rows))
            flip("cutover", lambda: commands.cutover(options, plan))
            time.sleep(1.0)
            reverse_diff = parity_rows(dsn, "orders_old", "orders")
            log.info(f"writes through the live table and both version views reached both tables: "
                     f"{'yes, EXCEPT ALL finds no difference' if reverse_diff == 0 else f'{reverse_diff} rows differ'}")
            finish(releases)
            flip("rollback", lambda: commands.rollback(options, plan))
            story.step("verify after rollback", lambda: commands.verify(options, plan, repair=True))
            flip("expose again", lambda: commands.expose(options, plan))
            releases.extend(start_releases(dsn, rows))
            flip("cutover again", lambda: commands.cutover(options, plan))
            time.sleep(0.5)
        finally:
            workload.finish()
            finish(releases)
        diff = parity_rows(dsn, "orders_old", "orders")
        story.step("finalize", lambda: commands.finalize(options, plan, yes=True))
        summary(story, rows, workload, stalls, diff, reverse_diff, releases)
        if keep:
            log.info(f"server kept running; connect with: {dsn}")
        errors = workload.errors + [e for r in releases for e in r.errors]
        for error in errors[:5]:
            log.warn(f"writer error: {error}")
        return 0 if diff == 0 and reverse_diff == 0 and not errors else 1


def start_releases(dsn: str, rows: int) -> list[Workload]:
    """The old release on versions.blue and the new one on versions.green, through search_path."""
    return [Workload(dsn, unqualified(ORDERS), writers=1, key_space=rows, pause=0.005,
                     options=f"-c search_path={schema},public").start() for schema in ("app_v1", "app_v2")]


def finish(releases: list[Workload]) -> None:
    for release in releases:
        release.finish()


def summary(story: Story, rows: int, workload: Workload, stalls: dict[str, float], diff: int,
            reverse_diff: int, releases: list[Workload]) -> None:
    table = Table(title="bgsync demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rows in blue at start", f"{rows:,}")
    for title, seconds in story.timings:
        table.add_row(f"time: {title}", f"{seconds:.2f} s")
    table.add_row("writes by the live workload", f"{sum(workload.counts.values()):,}")
    for name, group in (("old release (app_v1, blue's shape)", releases[0::2]),
                        ("new release (app_v2, green's shape)", releases[1::2])):
        table.add_row(f"writes by the {name}", f"{sum(sum(r.counts.values()) for r in group):,}")
    for title, stall in stalls.items():
        table.add_row(f"longest writer stall: {title}", f"{stall * 1000:.0f} ms")
    table.add_row("writer errors", str(len(workload.errors) + sum(len(r.errors) for r in releases)))
    table.add_row("retried lock/serialization errors", str(workload.retried))
    table.add_row("reverse sync after cutover (EXCEPT ALL)", "OK" if reverse_diff == 0 else f"{reverse_diff} rows")
    table.add_row("parity before finalize (independent EXCEPT ALL)", "OK" if diff == 0 else f"MISMATCH: {diff} rows")
    Console(file=sys.stdout).print(table)
