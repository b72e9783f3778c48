"""Acceptance 3: a backfill killed with SIGKILL resumes on rerun; no batch range is copied twice."""

from __future__ import annotations

import json
import os
import signal
import time

import psycopg

from orchestrator.workload import ORDERS, Workload
from tests.helpers import PLANS, bgsync, load_schema, plan_diff, scalar, seed, spawn_bgsync


def _copied(dsn: str) -> int:
    value = scalar(dsn, "SELECT coalesce(sum(rows_copied), 0) FROM bgsync.chunks WHERE migration = 'orders_v2'")
    return int(value)  # type: ignore[call-overload]


def test_sigkill_mid_backfill_then_resume(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=80_000)
    path = str(PLANS / "orders_v2.yaml")
    workload = Workload(dsn, ORDERS, writers=4, key_space=80_000).start()
    try:
        assert bgsync(dsn, "prepare", path).code == 0
        proc = spawn_bgsync(dsn, "backfill", path, "--batch-rows", "500", "--workers", "2",
                            "--max-rows-per-second", "20000")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if scalar(dsn, "SELECT to_regclass('bgsync.chunks')") and _copied(dsn) > 15_000:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        unfinished = scalar(dsn, "SELECT count(*) FROM bgsync.chunks WHERE NOT done")
        assert unfinished and unfinished > 0, "the backfill finished before it was killed"
        copied_at_kill = _copied(dsn)

        resumed = bgsync(dsn, "backfill", path, "--batch-rows", "500")
        assert resumed.code == 0, resumed.err
        assert "resuming" in resumed.err
        time.sleep(0.3)
    finally:
        workload.finish()
    assert workload.errors == []
    assert plan_diff(dsn, "orders_v2") == []
    assert _copied(dsn) > copied_at_kill

    # Every committed batch is in the event log with its key range: per partition, the ranges
    # must follow each other without overlap (no range copied twice across the kill).
    with psycopg.connect(dsn) as conn:
        events = [json.loads(d) for (d,) in conn.execute(
            "SELECT detail FROM bgsync.events WHERE migration = 'orders_v2' AND phase = 'backfill'"
            " AND outcome = 'ok' AND detail IS NOT NULL ORDER BY id")]
        chunks = {no: (lo, hi) for no, lo, hi in conn.execute(
            "SELECT chunk_no, lo, hi FROM bgsync.chunks WHERE migration = 'orders_v2'")}
    assert len({e["worker"] for e in events}) >= 1 and events
    by_chunk: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        lower = int(e["lower"][0]) if e["lower"] else None
        by_chunk.setdefault(e["chunk"], []).append((lower, int(e["upper"][0])))  # type: ignore[arg-type]
    for chunk_no, ranges in by_chunk.items():
        lo, hi = chunks[chunk_no]
        expected_lower = int(lo[0]) if lo else None
        for lower, upper in ranges:
            assert lower == expected_lower, f"partition {chunk_no}: batch ({lower}, {upper}] overlaps or skips"
            expected_lower = upper
        assert expected_lower == int(hi[0])
