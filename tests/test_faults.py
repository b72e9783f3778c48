"""Issue 5.2-5.4 and 5.7: kill -9 at every kind of point, PostgreSQL restarted during backfill,
lock fights, two bgsync processes on one plan. After each, the rerun completes or refuses with a
message saying what to do, and the journal matches the catalog (`status` finds no drift)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from tests.helpers import PLANS, Result, bgsync, load_schema, plan_diff, scalar, scalars, seed, spawn_bgsync, wait_for

PLAN = PLANS / "orders_numeric.yaml"
DIFF_BLUE = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM public.orders"
DIFF_GREEN = "SELECT id, customer_id, amount, state, note, created_at FROM public.orders_v2"


def plan_with(tmp_path: Path, **cutover: object) -> Path:
    data = yaml.safe_load(PLAN.read_text())
    data["cutover"] = {**data["cutover"], **cutover}
    file = tmp_path / "plan.yaml"
    file.write_text(yaml.safe_dump(data))
    return file


def verified(dsn: str, plan: Path, *, load: bool = True) -> Path:
    """A migration ready for cutover: (sample data,) prepare, backfill, verify."""
    if load:
        load_schema(dsn)
        seed(dsn, orders=3_000)
    for command in ("prepare", "backfill", "verify"):
        result = bgsync(dsn, command, str(plan))
        assert result.code == 0, (command, result.err)
    return plan


def no_drift(dsn: str) -> dict[str, object]:
    """`status` finds the journal and the catalog in agreement (exit 0, no drift listed)."""
    result = bgsync(dsn, "status", "--json")
    assert result.code == 0, result.err
    report: dict[str, object] = json.loads(result.out)
    assert all(m["drift"] == [] for m in report["migrations"]), report  # type: ignore[attr-defined]
    return report


def kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun_until_done(dsn: str, *args: str, tries: int = 40) -> list[Result]:
    """Rerun a command after a kill: each attempt completes, or refuses saying what to do."""
    results = []
    for _ in range(tries):
        result = bgsync(dsn, *args)
        results.append(result)
        if result.code == 0:
            return results
        assert result.code in (1, 3), result.err
        assert "FAILED:" in result.err and "Traceback" not in result.err
        assert any(hint in result.err for hint in ("busy", "holds its lock", "lock", "rerun", "wait")), result.err
        time.sleep(0.5)
    raise AssertionError(f"{args} never completed: {results[-1].err}")


def waiting_on_lock(dsn: str, verb: str) -> bool:
    return bool(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                            "AND wait_event_type = 'Lock'", [f"bgsync {verb}%"]))


def test_kill_during_prepare_leaves_nothing(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=2_000)
    plan = plan_with(tmp_path, lock_timeout="5s", attempts=1)
    with psycopg.connect(dsn) as holder:
        holder.execute("UPDATE orders SET note = 'held' WHERE id = 1")  # blocks CREATE TRIGGER
        proc = spawn_bgsync(dsn, "prepare", str(plan))
        wait_for(lambda: waiting_on_lock(dsn, "prepare"))
        kill(proc)
        holder.rollback()
    # the killed prepare was one transaction: nothing of it remains
    wait_for(lambda: not waiting_on_lock(dsn, "prepare"))
    assert scalar(dsn, "SELECT to_regclass('public.orders_v2')") is None
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    rerun_until_done(dsn, "prepare", str(plan))
    assert no_drift(dsn)["migrations"]


BACKFILL_WORKERS = ("SELECT state FROM pg_stat_activity "
                    "WHERE application_name LIKE 'bgsync backfill orders_numeric worker%'")


def kill_backfill_when(dsn: str, proc: subprocess.Popen[str], where: str, delay: float) -> list[str]:
    """SIGKILL the backfill the first time, `delay` seconds after its workers connected, that they are seen
    `where`: 'inside' a batch (a worker's session active, or idle in the batch's transaction) or 'between'
    batches (every worker's session idle, no transaction open). Returns the states seen before the kill."""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while not watcher.execute(BACKFILL_WORKERS).fetchall() and proc.poll() is None:
            time.sleep(0.01)                              # the process starts and its workers connect
        time.sleep(delay)
        while time.monotonic() < deadline and proc.poll() is None:
            states = [str(state) for (state,) in watcher.execute(BACKFILL_WORKERS)]
            inside = any(state in ("active", "idle in transaction") for state in states)
            between = bool(states) and all(state == "idle" for state in states)
            if (where == "inside" and inside) or (where == "between" and between):
                kill(proc)
                return states
            time.sleep(0.002)
    raise AssertionError(f"the backfill ended before its workers were seen {where} a batch")


@pytest.mark.parametrize("seed_value", [1, 2, 3])
def test_kill_backfill_at_random_points_then_resume(dsn: str, seed_value: int) -> None:
    """Two SIGKILLs per seed, one inside a batch and one between batches, in a random order, after a
    random delay, with a random batch size; the rerun then completes and nothing drifts."""
    load_schema(dsn)
    seed(dsn, orders=40_000)
    assert bgsync(dsn, "prepare", str(PLAN)).code == 0
    rng = random.Random(seed_value)
    landed: list[tuple[str, list[str]]] = []
    for where in rng.sample(["inside", "between"], 2):
        # two workers, paced after the first second's burst: both kinds of moment come often
        proc = spawn_bgsync(dsn, "backfill", str(PLAN), "--batch-rows", str(rng.choice([300, 1000, 4000])),
                            "--workers", "2", "--max-rows-per-second", "10000")
        landed.append((where, kill_backfill_when(dsn, proc, where, rng.uniform(0.0, 0.4))))
    assert {where for where, _ in landed} == {"inside", "between"}
    for where, states in landed:
        if where == "inside":
            assert any(s in ("active", "idle in transaction") for s in states), states
        else:
            assert states and set(states) == {"idle"}, states
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "backfilling", "a killed backfill completed"
    rerun_until_done(dsn, "backfill", str(PLAN))
    assert plan_diff(dsn, "orders_numeric") == []
    assert no_drift(dsn)["migrations"]


def test_kill_during_verify_then_rerun(dsn: str) -> None:
    """SIGKILL while verify's worker is seen comparing (its session active on a checksum query): the
    killed run records nothing, the migration stays backfilled, the rerun passes and nothing drifts."""
    load_schema(dsn)
    seed(dsn, orders=60_000)
    for command in ("prepare", "backfill"):
        assert bgsync(dsn, command, str(PLAN)).code == 0
    proc = spawn_bgsync(dsn, "verify", str(PLAN), "--workers", "1")
    seen = ""
    with psycopg.connect(dsn, autocommit=True) as watcher:
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline and proc.poll() is None:
            row = watcher.execute("SELECT query FROM pg_stat_activity WHERE state = 'active' "
                                  "AND application_name = 'bgsync verify orders_numeric worker 0'").fetchone()
            if row is not None and "hash_record_extended" in str(row[0]):   # not the read of a piece's bounds
                seen = str(row[0])
                kill(proc)
            time.sleep(0.002)
    assert "hash_record_extended" in seen, f"verify was never seen comparing before it ended: {seen!r}"
    assert proc.returncode == -signal.SIGKILL
    assert scalar(dsn, "SELECT count(*) FROM bgsync.verify_runs") == 0, "the killed run recorded a result"
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "backfilled"
    rerun_until_done(dsn, "verify", str(PLAN))
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "verified"
    assert scalars(dsn, "SELECT passed FROM bgsync.verify_runs") == [True]
    assert no_drift(dsn)["migrations"]


def test_kill_inside_cutover_transaction(dsn: str, tmp_path: Path) -> None:
    plan = verified(dsn, plan_with(tmp_path, lock_timeout="3s", attempts=1))
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT count(*) FROM orders_v2")          # ACCESS SHARE on green
        proc = spawn_bgsync(dsn, "cutover", str(plan))
        # cutover holds blue's ACCESS EXCLUSIVE lock and waits for green's
        wait_for(lambda: waiting_on_lock(dsn, "cutover"))
        kill(proc)
        holder.rollback()
    results = rerun_until_done(dsn, "cutover", str(plan))
    assert results[-1].code == 0
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
    assert scalar(dsn, "SELECT relname FROM pg_class WHERE oid = 'public.orders'::regclass") == "orders"
    assert scalar(dsn, "SELECT count(*) FROM public.orders_old") == 3_000
    no_drift(dsn)


def test_postgres_restart_during_backfill_resumes(dsn: str, restart_server: Callable[[], None]) -> None:
    load_schema(dsn)
    seed(dsn, orders=60_000)
    assert bgsync(dsn, "prepare", str(PLAN)).code == 0
    proc = spawn_bgsync(dsn, "backfill", str(PLAN), "--batch-rows", "1000", "--max-rows-per-second", "30000")
    wait_for(lambda: int(scalar(dsn, "SELECT coalesce(sum(rows_copied), 0) FROM bgsync.chunks") or 0) > 5_000)  # type: ignore[call-overload]
    restart_server()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "rerun to resume" in err and "Traceback" not in err
    rerun_until_done(dsn, "backfill", str(PLAN))
    assert plan_diff(dsn, "orders_numeric") == []
    assert no_drift(dsn)["migrations"]


def test_access_exclusive_holder_blocks_prepare_and_cutover_cleanly(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=2_000)
    plan = plan_with(tmp_path, lock_timeout="150ms", attempts=3)
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        refused = bgsync(dsn, "prepare", str(plan))
        holder.rollback()
    # prepare's first read of blue gave up at the plan's lock_timeout while the holder kept its lock
    assert refused.code == 3 and "nothing was changed" in refused.err, refused.err
    assert "canceling statement due to lock timeout" in refused.err and "lock_timeout 150ms" in refused.err
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    verified(dsn, plan, load=False)
    with psycopg.connect(dsn) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT * FROM orders WHERE id = 1 FOR UPDATE")   # a long transaction on blue
        cut = bgsync(dsn, "cutover", str(plan))
        holder.rollback()
    assert cut.code == 3 and "lock_timeout 150ms" in cut.err
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "verified"
    no_drift(dsn)
    assert bgsync(dsn, "cutover", str(plan)).code == 0


def test_second_process_on_the_same_phase_refuses_naming_the_holder(dsn: str, tmp_path: Path) -> None:
    plan = verified(dsn, plan_with(tmp_path, lock_timeout="20s", attempts=1))
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT count(*) FROM orders_v2")
        first = spawn_bgsync(dsn, "cutover", str(plan))
        wait_for(lambda: waiting_on_lock(dsn, "cutover"))
        second = bgsync(dsn, "cutover", str(plan))
        rollback = bgsync(dsn, "rollback", str(plan))
        holder.rollback()
    _, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    for result in (second, rollback):
        assert result.code == 1, result.err
        assert "is busy" in result.err and "bgsync cutover" in result.err and "pid" in result.err
    assert scalar(dsn, "SELECT count(*) FROM bgsync.migrations") == 1
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
    no_drift(dsn)
