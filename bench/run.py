"""Benchmark: bgsync against the obvious single statement, same run, same embedded server.

    python -m bench [--rows N] [--dsn DSN] [--out bench/results]

Every figure is a ratio against a reference measured here, never an absolute time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from orchestrator import commands
from orchestrator.commands import Options
from orchestrator.embedded import create_database, drop_database, embedded_server
from orchestrator.workload import load_sample_schema, seed_sample

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "plans" / "orders_v2.yaml"


@dataclass
class Figure:
    name: str
    bgsync_seconds: float
    reference: str
    reference_seconds: float
    target: str

    @property
    def ratio(self) -> float:
        return self.bgsync_seconds / self.reference_seconds if self.reference_seconds else float("inf")


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def load_orders(dsn: str, rows: int) -> None:
    load_sample_schema(dsn)
    seed_sample(dsn, orders=rows)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def backfill_figures(admin: str, rows: int, workers: int, repeat: int) -> list[Figure]:
    """Median of `repeat` rounds, each on a fresh database: a 2-core machine is noisy."""
    rounds = [backfill_round(admin, rows, workers) for _ in range(repeat)]
    return [median_figure([r[i] for r in rounds]) for i in range(len(rounds[0]))]


def median_figure(samples: list[Figure]) -> Figure:
    ordered = sorted(samples, key=lambda f: f.ratio)
    return ordered[len(ordered) // 2]


def backfill_round(admin: str, rows: int, workers: int) -> list[Figure]:
    """bgsync backfill vs one INSERT INTO green SELECT ... (and the same indexes built after it)."""
    dsn = create_database(admin, "bench_backfill")
    load_orders(dsn, rows)
    options = Options(dsn=dsn)
    commands.prepare(options, PLAN)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_ref (LIKE orders_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        conn.execute("ALTER TABLE orders_ref ADD PRIMARY KEY (id)")
        conn.execute("CHECKPOINT")
        copy_reference = timed(lambda: conn.execute(
            """INSERT INTO orders_ref (id, customer_id, total_amount, status, note, created_at)
               SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM orders"""))
        index_reference = timed(lambda: (
            conn.execute("CREATE INDEX ON orders_ref (customer_id)"),
            conn.execute("CREATE INDEX ON orders_ref (status) WHERE status <> 'void'")))
        conn.execute("CHECKPOINT")
    started = time.perf_counter()
    commands.backfill(options, PLAN, workers=workers)
    total = time.perf_counter() - started
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM bgsync.chunks
                WHERE migration = 'orders_v2'""").fetchone()
        copy_seconds = float(row[0]) if row and row[0] is not None else total
        copied = conn.execute("SELECT count(*) FROM orders_v2").fetchone()
        assert copied is not None and copied[0] == rows, copied
    drop_database(admin, "bench_backfill")
    return [
        Figure(f"backfill copy, {rows:,} rows ({workers} workers)", copy_seconds,
               "one INSERT INTO green SELECT ...", copy_reference, "<= 1.0x (stretch 0.8x)"),
        Figure(f"backfill incl. deferred indexes, {rows:,} rows", total,
               "INSERT ... SELECT + CREATE INDEX", copy_reference + index_reference, "<= 1.0x"),
    ]


def markdown(figures: list[Figure], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| figure | bgsync (s) | reference | reference (s) | ratio | target |",
             "|---|---:|---|---:|---:|---|"]
    for f in figures:
        lines.append(f"| {f.name} | {f.bgsync_seconds:.2f} | {f.reference} | {f.reference_seconds:.2f} "
                     f"| {f.ratio:.2f}x | {f.target} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure; the median is reported")
    parser.add_argument("--dsn", help="an existing server (superuser) instead of an embedded one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server()).dsn
        with psycopg.connect(admin) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        machine += f", PostgreSQL {version[0] if version else '?'}"
        figures = backfill_figures(admin, args.rows, args.workers, args.repeat)
    table = markdown(figures, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(table)
    (args.out / "latest.json").write_text(json.dumps(
        {"machine": machine, "rows": args.rows,
         "figures": [{**asdict(f), "ratio": round(f.ratio, 3)} for f in figures]}, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
