"""Issue 14's figures: a whole migration against pg_repack, a backfill against the fastest plain copy,
rows/s from 1M to N rows, the client's memory, and an exact verify against one EXCEPT ALL on a wide
table. bgsync runs through its public API in a child process (bench/phases.py), whatever its
backfill does inside (row by row with green's indexes, or a bulk copy and a drained change log)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from bench.figures import Figure, ratio_figure, run_phases, timed
from orchestrator import log
from orchestrator.embedded import create_database, drop_database

# The shape of issue 14: a bigint key, 5 columns, one secondary index; the migration widens the
# indexed integer column to bigint.
ITEMS_DDL = """
CREATE TABLE public.items (
    id         bigint PRIMARY KEY,
    account_id integer NOT NULL,
    qty        integer NOT NULL,
    label      text,
    created_at timestamptz NOT NULL
)"""
ITEMS_ROWS = """
INSERT INTO public.items
SELECT g, g % 100003, g % 1000, CASE WHEN g % 7 = 0 THEN NULL ELSE 'item ' || g END,
       timestamptz '2024-01-01' + g * interval '1 second'
  FROM generate_series(1, %s) g"""
ITEMS_PLAN = """# bench: issue 14's shape, an indexed integer column widened to bigint
name: items_bigint
source: public.items
target: public.items_v2
columns:
  - {name: id, type: bigint, not_null: true}
  - {name: account_id, type: bigint, not_null: true}
  - {name: qty, type: integer, not_null: true}
  - {name: label, type: text}
  - {name: created_at, type: timestamptz, not_null: true}
indexes:
  - {columns: [account_id]}
backfill: {workers: 2, batch_rows: 10000}
cutover: {mode: rename, retired_name: items_old, lock_timeout: 2s, attempts: 10}
"""

# A wide row: text, jsonb, text[] and a numeric expression computed from blue's integer cents.
WIDE_DDL = """
CREATE TABLE public.wide (
    id         bigint PRIMARY KEY,
    title      text NOT NULL,
    doc        jsonb,
    tags       text[],
    cents      bigint NOT NULL,
    updated_at timestamptz NOT NULL
)"""
WIDE_ROWS = """
INSERT INTO public.wide
SELECT g, 'title ' || g || ' ' || repeat('x', g % 40),
       CASE WHEN g % 11 = 0 THEN NULL
            ELSE jsonb_build_object('n', g, 'kind', 'k' || g % 100, 'list', jsonb_build_array(g, g % 7, 'v')) END,
       CASE WHEN g % 13 = 0 THEN NULL ELSE ARRAY['t' || g % 10, 'u' || g % 17, 'w'] END,
       (g * 37) % 1000003, timestamptz '2024-01-01' + g * interval '1 second'
  FROM generate_series(1, %s) g"""
WIDE_PLAN = """# bench: a wide row for the verify figure
name: wide_v2
source: public.wide
target: public.wide_v2
columns:
  - {name: id, type: bigint, not_null: true}
  - {name: title, type: text, not_null: true}
  - {name: doc, type: jsonb}
  - {name: tags, type: "text[]"}
  - name: price
    type: "numeric(14,2)"
    not_null: true
    from: "cents / 100.0"
    reverse: "(price * 100)::bigint"
    reverse_column: cents
  - {name: updated_at, type: timestamptz, not_null: true}
backfill: {workers: 2, batch_rows: 10000}
cutover: {mode: rename, retired_name: wide_old, lock_timeout: 2s, attempts: 10}
"""
WIDE_BLUE = "SELECT id, title, doc, tags, (cents / 100.0)::numeric(14,2), updated_at FROM public.wide"
WIDE_GREEN = "SELECT id, title, doc, tags, price, updated_at FROM public.wide_v2"


def plan_file(text: str, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="bgsync-bench-plan-")) / f"{name}.yaml"
    path.write_text(text)
    return path


def load(dsn: str, ddl: str, rows_sql: str, rows: int, index: str | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl)
        conn.execute(rows_sql.replace("%s", str(int(rows))))
        if index:
            conn.execute(index)
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def checkpoint(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM")
        conn.execute("CHECKPOINT")


# -- pg_repack: measured where it is, never installed by the bench --------------------------------
def repack_binary(dsn: str) -> str | None:
    """The pg_repack client of the server's major version: on PATH, or beside the Debian package's
    other binaries of that version."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()
    major = row[0] if row else 0
    for candidate in (shutil.which("pg_repack"), f"/usr/lib/postgresql/{major}/bin/pg_repack"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def repack_ready(dsn: str) -> tuple[str | None, str]:
    """(binary, what) when pg_repack can be measured on this server, else (None, why not). The
    extension is created only in the bench's own throwaway database, and only where the server
    already has it (`pg_available_extensions`)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT default_version, installed_version FROM pg_available_extensions "
                           "WHERE name = 'pg_repack'").fetchone()
        if row is None:
            return None, "the pg_repack extension is not available on this server (pg_available_extensions)"
        binary = repack_binary(dsn)
        if binary is None:
            return None, "the pg_repack extension is available but its client binary is not found"
        if row[1] is None:
            conn.execute("CREATE EXTENSION pg_repack")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    return binary, f"{version} (extension {row[0]})"


def run_repack(binary: str, dsn: str, table: str) -> float:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    command = [binary, "--table", table, "--dbname", str(params.get("dbname", "postgres"))]
    for flag, key in (("--host", "host"), ("--port", "port"), ("--username", "user")):
        if params.get(key):
            command += [flag, str(params[key])]
    env = dict(os.environ)
    if params.get("password"):
        env["PGPASSWORD"] = str(params["password"])
    seconds = timed(lambda: subprocess.run(command, capture_output=True, text=True, check=True, env=env))
    return seconds


# -- the sections --------------------------------------------------------------------------------
def migration_figures(admin: str, rows: int, workers: int, repeat: int, notes: list[str]) -> list[Figure]:
    """Figures 1, 2 and 5: the whole migration of `items` against pg_repack (and a blocking ALTER
    TABLE, for information), its backfill against the fastest plain copy, rows/s at N against a
    smaller table, and the peak RSS of the process that ran bgsync."""
    plan = plan_file(ITEMS_PLAN, "items_bigint")
    figures: list[Figure] = []
    repack: list[float] = []
    plain: list[float] = []
    alter: list[float] = []
    ctas: list[float] = []
    phases: list[dict[str, float]] = []
    rss: list[int] = []
    repack_what = ""
    binary: str | None = None
    for _ in range(repeat):
        dsn = create_database(admin, "bench_items")
        load(dsn, ITEMS_DDL, ITEMS_ROWS, rows, "CREATE INDEX items_account_id_idx ON public.items (account_id)")
        with psycopg.connect(dsn, autocommit=True) as conn:
            # the fastest plain copy of green: no index during the copy, then its key and index built
            conn.execute("CREATE TABLE items_ref (id bigint NOT NULL, account_id bigint NOT NULL, qty integer NOT "
                         "NULL, label text, created_at timestamptz NOT NULL)")
            conn.execute("CHECKPOINT")
            plain.append(timed(lambda: (
                conn.execute("INSERT INTO items_ref SELECT * FROM items"),
                conn.execute("ALTER TABLE items_ref ADD PRIMARY KEY (id)"),
                conn.execute("CREATE INDEX ON items_ref (account_id)"))))
            # for information: the blocking rewrite a DBA would otherwise run (on the copy, same shape)
            conn.execute("ALTER TABLE items_ref ALTER COLUMN account_id TYPE integer")
            conn.execute("CHECKPOINT")
            alter.append(timed(lambda: conn.execute("ALTER TABLE items_ref ALTER COLUMN account_id TYPE bigint")))
            conn.execute("DROP TABLE items_ref")
            conn.execute("CHECKPOINT")
            # for information: pg_repack's own way to copy, CREATE TABLE AS (a bulk-insert ring buffer,
            # no free-space map lookups), then the key and index
            ctas.append(timed(lambda: (
                conn.execute("CREATE TABLE items_ctas AS SELECT id, account_id::bigint AS account_id, qty, label, "
                             "created_at FROM items"),
                conn.execute("ALTER TABLE items_ctas ADD PRIMARY KEY (id)"),
                conn.execute("CREATE INDEX ON items_ctas (account_id)"))))
            conn.execute("DROP TABLE items_ctas")
            conn.execute("CHECKPOINT")
        binary, repack_what = repack_ready(dsn)
        if binary is not None:
            log.info(f"pg_repack --table public.items ({rows:,} rows)")
            repack.append(run_repack(binary, dsn, "public.items"))
            checkpoint(dsn)
        log.info(f"bgsync prepare, backfill, verify, cutover, finalize ({rows:,} rows)")
        child = run_phases(dsn, plan, ["prepare", "backfill", "verify", "cutover", "finalize"], workers)
        assert not child.mismatch, "verify found differences on a quiet table"
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*), pg_typeof(max(account_id))::text FROM public.items").fetchone()
        assert row is not None and row[0] == rows and row[1] == "bigint", row
        phases.append(child.seconds)
        said = [line for line in child.log if line.startswith(("backfilled", "building", "cut over"))]
        rss.append(max(child.maxrss_kb, child.wait4_maxrss_kb))
        drop_database(admin, "bench_items")

    def total(p: dict[str, float], verify: bool) -> float:
        return sum(s for phase, s in p.items() if verify or phase != "verify")

    no_verify = [total(p, False) for p in phases]
    with_verify = [total(p, True) for p in phases]
    backfill = [p["backfill"] for p in phases]
    shape = f"{rows:,} rows, bigint key, 5 columns, 1 index, int -> bigint"
    if repack:
        figures.append(ratio_figure(f"whole migration, no verify (prepare+backfill+cutover+finalize), {shape}",
                                    no_verify, "pg_repack --table", repack, 1.2))
        figures.append(ratio_figure("whole migration with verify", with_verify, "pg_repack --table", repack, 1.5))
    else:
        for name, ours, target in (("whole migration, no verify (prepare+backfill+cutover+finalize), " + shape,
                                    no_verify, "<= 1.20x"), ("whole migration with verify", with_verify, "<= 1.50x")):
            figures.append(Figure(name, f"{min(ours):.2f} s", f"pg_repack skipped: {repack_what}", None, target,
                                  None))
        notes.append(f"pg_repack skipped: {repack_what}")
    figures.append(ratio_figure("backfill incl. indexes (items)", backfill,
                                "INSERT ... SELECT into a table without indexes, then PK + index", plain, 1.0))
    figures.append(ratio_figure("for information: whole migration with verify", with_verify,
                                "blocking ALTER TABLE ... TYPE bigint", alter, float("inf")))
    figures[-1].target, figures[-1].met = "-", None
    figures.append(ratio_figure("for information: backfill incl. indexes (items)", backfill,
                                "CREATE TABLE AS SELECT, then PK + index", ctas, float("inf")))
    figures[-1].target, figures[-1].met = "-", None
    last = phases[-1]
    notes.append("bgsync phases on items (" + f"{rows:,} rows): " +
                 ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in last.items()) +
                 (f"; pg_repack --table {repack[-1]:.2f} s ({repack_what})" if repack else ""))
    notes += [f"bgsync said: {line}" for line in said]

    # rows/s at a smaller table (1M, or a tenth of N when N is below 10M) against N
    small = min(1_000_000, max(rows // 10, 1000))
    dsn = create_database(admin, "bench_items_small")
    load(dsn, ITEMS_DDL, ITEMS_ROWS, small, "CREATE INDEX items_account_id_idx ON public.items (account_id)")
    small_runs = []
    for _ in range(repeat):
        child = run_phases(dsn, plan, ["prepare", "backfill"], workers)
        small_runs.append(child.seconds["backfill"])
        rss.append(max(child.maxrss_kb, child.wait4_maxrss_kb))
        run_phases(dsn, plan, ["rollback"])
        checkpoint(dsn)
    drop_database(admin, "bench_items_small")
    small_rate = small / min(small_runs)
    big_rate = rows / min(backfill)
    scale = big_rate / small_rate
    figures.append(Figure(f"backfill rows/s at {rows:,} vs at {small:,} rows", f"{big_rate:,.0f} rows/s",
                          f"{small:,} rows: {small_rate:,.0f} rows/s", round(scale, 3), "within 15% (0.85-1.15x)",
                          0.85 <= scale <= 1.15))
    peak = max(rss) / 1024
    figures.append(Figure(f"client memory: peak RSS of the bgsync process, {rows:,} rows", f"{peak:.0f} MB", "-",
                          None, "< 200 MB", peak < 200))
    return figures


def wide_verify_figure(admin: str, rows: int, workers: int, repeat: int, notes: list[str]) -> Figure:
    """Figure 3: exact verify (bgsync's own, planted differences found by key) against one one-way
    EXCEPT ALL on a wide table."""
    plan = plan_file(WIDE_PLAN, "wide_v2")
    dsn = create_database(admin, "bench_wide")
    load(dsn, WIDE_DDL, WIDE_ROWS, rows)
    log.info(f"wide table: prepare and backfill ({rows:,} rows)")
    run_phases(dsn, plan, ["prepare", "backfill"], workers)
    planted = sorted({7, rows // 3 + 1, rows * 4 // 5 + 2})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM public.wide_v2 WHERE id = %s", [planted[0]])
        conn.execute("UPDATE public.wide_v2 SET doc = doc || '{\"planted\": 1}' WHERE id = %s", [planted[1]])
        conn.execute("UPDATE public.wide_v2 SET price = price + 0.01 WHERE id = %s", [planted[2]])
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
    ours, theirs = [], []
    for _ in range(repeat):
        child = run_phases(dsn, plan, ["verify"], workers)
        assert child.mismatch, "verify missed the planted differences"
        ours.append(child.seconds["verify"])
        with psycopg.connect(dsn) as conn:
            theirs.append(timed(lambda: conn.execute(
                f"SELECT count(*) FROM (({WIDE_BLUE}) EXCEPT ALL ({WIDE_GREEN})) d").fetchall()))
            found = conn.execute("SELECT result FROM bgsync.verify_runs ORDER BY id DESC LIMIT 1").fetchone()
        keys = sorted(int(m["key"][0]) for m in found[0]["mismatches"]) if found else []
        assert keys == planted, (keys, planted)
    drop_database(admin, "bench_wide")
    notes.append(f"wide verify: {rows:,} rows of (bigint, text, jsonb, text[], numeric from cents / 100.0, "
                 f"timestamptz), {len(planted)} planted differences found by key")
    return ratio_figure(f"exact verify, wide table, {rows:,} rows", ours, "one one-way SELECT ... EXCEPT ALL ...",
                        theirs, 1.0)
