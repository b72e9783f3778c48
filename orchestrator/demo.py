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
from orchestrator.workload import ORDERS, Workload, load_sample_schema, seed_sample

# The same plan as plans/orders_v2.yaml (a test keeps the two equal).
DEMO_PLAN = """\
# A type change with a rename: integer `amount` becomes numeric `total_amount`,
# `state` becomes `status`; the reverse expressions keep blue fed after cutover.
name: orders_v2
source: public.orders
target: public.orders_v2
key: [id]
columns:
  - {name: id, type: bigint, not_null: true}
  - {name: customer_id, type: bigint, not_null: true}
  - name: total_amount
    type: numeric(12,2)
    not_null: true
    from: "amount::numeric(12,2)"
    reverse: "round(total_amount)::integer"
    reverse_column: amount
  - {name: status, type: text, not_null: true, from: state, default: "'new'"}
  - {name: note, type: text}
  - {name: created_at, type: timestamptz, not_null: true, default: "now()"}
indexes:
  - {columns: [customer_id]}
  - {columns: [status], where: "status <> 'void'"}
checks:
  - {name: orders_total_amount_nonneg, expression: "total_amount >= 0"}
backfill: {workers: 4, batch_rows: 10000, max_rows_per_second: 0}
verify: {workers: 4}
cutover: {mode: rename, retired_name: orders_old, lock_timeout: 2s, attempts: 10}
"""

# An independent projection of blue and green for the parity check the demo shows.
BLUE_PROJECTION = ("SELECT id, customer_id, amount::numeric(12,2), state, note, created_at "
                   "FROM public.orders")
GREEN_PROJECTION = "SELECT id, customer_id, total_amount, status, note, created_at FROM public.orders_v2"


@dataclass
class Story:
    dsn: str
    plan: Path
    timings: list[tuple[str, float]] = field(default_factory=list)

    def step(self, title: str, action: Callable[[], object]) -> None:
        log.console.rule(f"[bold]{title}")
        started = time.perf_counter()
        action()
        self.timings.append((title, time.perf_counter() - started))


def parity_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM ((({GREEN_PROJECTION}) EXCEPT ALL ({BLUE_PROJECTION})) UNION ALL "
            f"(({BLUE_PROJECTION}) EXCEPT ALL ({GREEN_PROJECTION}))) d").fetchone()
    return int(row[0]) if row else -1


def run(rows: int, keep: bool) -> int:
    """Run the story; returns the exit code (0 when parity holds and no writer failed)."""
    with embedded_server(keep=keep) as server, tempfile.TemporaryDirectory(prefix="bgsync-demo-") as folder:
        dsn = create_database(server.dsn, "bgsync_demo")
        plan = Path(folder) / "orders_v2.yaml"
        plan.write_text(DEMO_PLAN)
        options = commands.Options(dsn=dsn)
        story = Story(dsn, plan)
        log.info(f"embedded PostgreSQL started; loading {rows:,} orders")
        def load() -> None:
            load_sample_schema(dsn)
            seed_sample(dsn, orders=rows)

        story.step("load sample data", load)
        workload = Workload(dsn, ORDERS, writers=4, key_space=rows, pause=0.005).start()
        try:
            story.step("validate", lambda: commands.validate(options, plan))
            story.step("prepare", lambda: commands.prepare(options, plan))
            story.step("backfill", lambda: commands.backfill(options, plan))
            time.sleep(0.5)
        finally:
            workload.finish()
        diff = parity_rows(dsn)
        summary(story, rows, workload, diff)
        if keep:
            log.info(f"server kept running; connect with: {dsn}")
        return 0 if diff == 0 and not workload.errors else 1


def summary(story: Story, rows: int, workload: Workload, diff: int) -> None:
    table = Table(title="bgsync demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rows in blue at start", f"{rows:,}")
    for title, seconds in story.timings:
        table.add_row(f"time: {title}", f"{seconds:.2f} s")
    table.add_row("writes by the live workload", f"{sum(workload.counts.values()):,}")
    table.add_row("longest writer stall", f"{workload.longest_stall * 1000:.0f} ms")
    table.add_row("writer errors", str(len(workload.errors)))
    table.add_row("retried lock/serialization errors", str(workload.retried))
    table.add_row("parity (independent EXCEPT ALL)", "OK" if diff == 0 else f"MISMATCH: {diff} rows")
    Console(file=sys.stdout).print(table)
