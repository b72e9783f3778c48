"""Acceptance 3: a backfill killed with SIGKILL resumes on rerun; no batch range is copied twice."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psycopg
import yaml

from orchestrator.workload import ORDERS, Workload
from tests.helpers import PLANS, bgsync, load_schema, plan_diff, scalar, scalars, seed, spawn_bgsync, wait_for


def no_drift(dsn: str) -> bool:
    """`status` finds the journal and the catalog in agreement (exit 0, no drift listed)."""
    result = bgsync(dsn, "status", "--json")
    assert result.code == 0, result.err
    return all(m["drift"] == [] for m in json.loads(result.out)["migrations"])


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
        wait_for(lambda: bool(scalar(dsn, "SELECT to_regclass('bgsync.chunks')")) and _copied(dsn) > 15_000)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # the killed process's server sessions end (a batch they were in rolls back) before we look
        wait_for(lambda: _backfill_sessions(dsn) == 0)
        unfinished = scalar(dsn, "SELECT count(*) FROM bgsync.chunks WHERE NOT done")
        assert unfinished and unfinished > 0, "the backfill finished before it was killed"
        copied_at_kill = _copied(dsn)
        last_event_of_killed_run = int(scalar(dsn, "SELECT max(id) FROM bgsync.events"))  # type: ignore[arg-type]

        resumed = bgsync(dsn, "backfill", path, "--batch-rows", "500")
        assert resumed.code == 0, resumed.err
        assert "resuming" in resumed.err
    finally:
        workload.finish()
    assert workload.errors == []
    assert plan_diff(dsn, "orders_v2") == []
    assert _copied(dsn) > copied_at_kill
    assert no_drift(dsn)

    # Every committed batch is in the event log with its key range, committed with its rows: per
    # partition the ranges follow each other from its lower to its upper bound, across the kill, with no
    # gap and no range copied twice.
    with psycopg.connect(dsn) as conn:
        events = [(i, json.loads(d)) for i, d in conn.execute(
            "SELECT id, detail FROM bgsync.events WHERE migration = 'orders_v2' AND phase = 'backfill'"
            " AND outcome = 'ok' AND detail IS NOT NULL AND detail::jsonb ? 'chunk' ORDER BY id")]
        chunks = {no: (lo, hi) for no, lo, hi in conn.execute(
            "SELECT chunk_no, lo, hi FROM bgsync.chunks WHERE migration = 'orders_v2'")}
    killed_run = {e["worker"] for i, e in events if i <= last_event_of_killed_run}
    assert killed_run == {0, 1}, "both workers of the killed run committed batches"
    assert any(i > last_event_of_killed_run for i, _ in events), "the rerun copied nothing"
    by_chunk: dict[int, list[tuple[int | None, int | None]]] = {}
    for _, e in events:
        lower = int(e["lower"][0]) if e["lower"] else None
        upper = int(e["upper"][0]) if e["upper"] else None      # the last partition is open-ended
        by_chunk.setdefault(e["chunk"], []).append((lower, upper))
    assert set(by_chunk) == set(chunks), "a partition has no batch in the event log"
    for chunk_no, ranges in by_chunk.items():
        lo, hi = chunks[chunk_no]
        expected_lower = int(lo[0]) if lo else None
        for lower, upper in ranges:
            assert lower == expected_lower, f"partition {chunk_no}: batch ({lower}, {upper}] overlaps or skips"
            expected_lower = upper
        assert expected_lower == (int(hi[0]) if hi else None)


# -- a partition whose row lock another session holds (issue 9) -------------------------------------
def _backfill_sessions(dsn: str) -> int:
    return int(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "  # type: ignore[arg-type]
                           "'bgsync backfill orders_v2%%'"))


def _partitions_planned_then_killed(dsn: str, path: str) -> None:
    """A first backfill plans the partitions, copies a few throttled batches and is killed; its sessions
    are gone afterwards (a batch they were in rolled back)."""
    load_schema(dsn)
    seed(dsn, orders=12_000)
    assert bgsync(dsn, "prepare", path).code == 0
    first = spawn_bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "500",
                         "--max-rows-per-second", "1000")
    wait_for(lambda: bool(scalar(dsn, "SELECT to_regclass('bgsync.chunks')")) and _copied(dsn) >= 1_000)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    wait_for(lambda: _backfill_sessions(dsn) == 0)


def _hold_last_partition(holder: psycopg.Connection[tuple[object, ...]]) -> int:
    row = holder.execute("SELECT chunk_no FROM bgsync.chunks WHERE migration = 'orders_v2' AND NOT done "
                         "ORDER BY chunk_no DESC LIMIT 1 FOR UPDATE").fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def _waiting_events(dsn: str) -> list[str]:
    return [str(d) for d in scalars(dsn, "SELECT detail FROM bgsync.events WHERE migration = 'orders_v2' "
                                         "AND phase = 'backfill' AND outcome = 'waiting' ORDER BY id")]


def test_resumed_backfill_waits_for_a_held_partition_then_completes(dsn: str) -> None:
    """The window of the hang: a killed backfill's server session still holds a partition's row lock.
    The rerun copies everything else, says who holds the rest (journal and stderr), and finishes
    once the lock is released; it never waits for a partition that no worker will claim."""
    path = str(PLANS / "orders_v2.yaml")
    _partitions_planned_then_killed(dsn, path)
    with psycopg.connect(dsn) as holder:
        held = _hold_last_partition(holder)
        pid = holder.info.backend_pid
        resumed = spawn_bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "500")
        try:
            wait_for(lambda: any(f"pid {pid} " in d for d in _waiting_events(dsn)), timeout=30)
            # every other partition is copied; only the held one is left
            assert scalars(dsn, "SELECT chunk_no FROM bgsync.chunks WHERE NOT done") == [held]
            assert resumed.poll() is None, "the backfill gave up instead of waiting"
        except BaseException:
            resumed.kill()
            raise
        finally:
            holder.rollback()           # the holder goes away: the partition is free
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    # named when the set of holders changes (a poll under load may briefly see the lock without its pid)
    events = _waiting_events(dsn)
    assert events and all(f"partition(s) {held} " in e for e in events), events
    assert any(f"pid {pid} " in e and "idle in transaction" in e for e in events), events
    assert f"pid {pid} " in err and "waiting for" in err, err
    assert scalar(dsn, "SELECT count(*) FROM bgsync.chunks WHERE NOT done") == 0
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "backfilled"
    assert plan_diff(dsn, "orders_v2") == []
    assert no_drift(dsn)


def test_held_partition_without_progress_gives_up_naming_the_holder(dsn: str, tmp_path: Path) -> None:
    """Held past backfill.held_partition_wait with no progress: exit 3, the holder named, what to do."""
    data = yaml.safe_load((PLANS / "orders_v2.yaml").read_text())
    data["backfill"]["held_partition_wait"] = "1s"
    plan = tmp_path / "orders_v2.yaml"
    plan.write_text(yaml.safe_dump(data))
    _partitions_planned_then_killed(dsn, str(plan))
    with psycopg.connect(dsn) as holder:
        held = _hold_last_partition(holder)
        pid = holder.info.backend_pid
        refused = bgsync(dsn, "backfill", str(plan), "--workers", "2", "--batch-rows", "500", timeout=120)
        holder.rollback()
    assert refused.code == 3, refused.err
    assert "Traceback" not in refused.err
    message = refused.err.split("FAILED:", 1)[1]
    assert f"partition(s) {held} " in message and f"pid {pid} " in message, message
    assert f"SELECT pg_terminate_backend({pid})" in message and "rerun" in message, message
    assert any(f"pid {pid} " in d for d in _waiting_events(dsn))
    assert scalars(dsn, "SELECT chunk_no FROM bgsync.chunks WHERE NOT done") == [held]
    # once the holder is gone, a rerun finishes the job
    done = bgsync(dsn, "backfill", str(plan))
    assert done.code == 0, done.err
    assert plan_diff(dsn, "orders_v2") == []
    assert no_drift(dsn)


# -- progress commits with its rows; SIGTERM ----------------------------------------------------------
AHEAD_OF_GREEN = """
SELECT c.chunk_no FROM bgsync.chunks AS c
 WHERE c.cursor IS NOT NULL
   AND EXISTS (SELECT FROM public.orders AS o
                WHERE o.id > coalesce(c.lo[1]::bigint, -1) AND o.id <= c.cursor[1]::bigint
                  AND NOT EXISTS (SELECT FROM public.orders_v2 AS g WHERE g.id = o.id))
"""


def test_a_failed_batch_records_no_progress(dsn: str) -> None:
    """Progress commits in the transaction of its rows: a batch that fails (a green CHECK that one blue
    row violates) leaves its partition's cursor where it was, so no key the journal calls copied is
    missing from green, and the rerun after the fix copies the whole batch."""
    load_schema(dsn)
    seed(dsn, orders=6_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET amount = -5 WHERE id = 4321")   # breaks orders_total_amount_nonneg
    path = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", path).code == 0
    failed = bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "500")
    assert failed.code == 3, failed.err
    assert "orders_total_amount_nonneg" in failed.err and "rerun to resume" in failed.err, failed.err
    assert scalars(dsn, AHEAD_OF_GREEN) == []
    assert scalar(dsn, "SELECT count(*) FROM public.orders_v2 WHERE id = 4321") == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.orders SET amount = 5 WHERE id = 4321")     # the trigger writes it to green
    resumed = bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "500")
    assert resumed.code == 0, resumed.err
    assert plan_diff(dsn, "orders_v2") == []
    assert no_drift(dsn)


def test_sigterm_stops_the_backfill_with_130_and_a_rerun_resumes(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=20_000)
    path = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", path).code == 0
    proc = spawn_bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "500", "--max-rows-per-second",
                        "4000")
    wait_for(lambda: bool(scalar(dsn, "SELECT to_regclass('bgsync.chunks')")) and _copied(dsn) >= 2_000)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun `bgsync backfill` to resume" in err and "Traceback" not in err, err
    copied = _copied(dsn)
    assert 0 < copied < 20_000
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "backfilling"
    resumed = bgsync(dsn, "backfill", path)
    assert resumed.code == 0, resumed.err
    assert "resuming" in resumed.err and f"{copied:,} rows already copied" in resumed.err, resumed.err
    assert _copied(dsn) == 20_000            # every row copied exactly once across the two runs
    assert plan_diff(dsn, "orders_v2") == []
    assert no_drift(dsn)
