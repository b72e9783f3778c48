"""Acceptance 2: four writers (inserts, updates, deletes, key updates, multi-row statements,
rolled-back transactions) run throughout prepare and backfill; afterwards an independent
EXCEPT ALL finds no lost, resurrected or stale row."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orchestrator.workload import ORDERS, SESSIONS, TableOps, Workload
from tests.helpers import bgsync, copied_past, load_schema, plan_diff, plan_in_mode, scalar, seed

CASES = [("orders_v2", ORDERS, {"orders": 60_000}), ("sessions_v2", SESSIONS, {"sessions": 40_000})]


@pytest.mark.parametrize("mode", ["bulk", "direct"])
@pytest.mark.parametrize(("plan", "ops", "rows"), CASES, ids=[c[0] for c in CASES])
def test_writers_through_prepare_and_backfill(dsn: str, plan: str, ops: TableOps, rows: dict[str, int], mode: str,
                                              tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, **rows)
    path = plan_in_mode(plan, mode, tmp_path)
    workload = Workload(dsn, ops, writers=4, key_space=next(iter(rows.values()))).start()
    try:
        time.sleep(0.5)
        prepared = bgsync(dsn, "prepare", path)
        assert prepared.code == 0, prepared.err
        time.sleep(0.5)
        # Throttled so the copy overlaps plenty of writes.
        filled = bgsync(dsn, "backfill", path, "--batch-rows", "1000", "--workers", "3",
                        "--max-rows-per-second", "25000")
        assert filled.code == 0, filled.err
        time.sleep(0.5)
    finally:
        workload.finish()
    assert workload.errors == []
    for kind in ("insert", "insert_many", "update", "update_many", "delete", "key_update", "rollback"):
        assert workload.counts[kind] > 0, f"the workload did no {kind}: {workload.counts}"
    assert plan_diff(dsn, plan) == []
    if mode == "direct":
        # batches met ranges the trigger had already written to, and took the path that skips them
        skipped = scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE step LIKE '%%the trigger already wrote to%%'")
        assert skipped and int(skipped) > 0  # type: ignore[call-overload]
    else:
        # the writers' keys were recorded and re-read from blue, and the last ones under the switch's lock
        drained = scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE step LIKE 're-read up to%%'")
        assert drained and int(drained) > 0  # type: ignore[call-overload]
        assert scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE step LIKE 'apply every key left%%'") == 1
        assert scalar(dsn, "SELECT to_regclass('bgsync.' || %s || '_log')", [plan]) is None


def test_batch_racing_the_trigger_keeps_the_triggers_row(dsn: str, tmp_path: Path) -> None:
    """An uncommitted update puts row 5 into green while a batch copies row 5's older version:
    the batch waits, hits unique_violation, reruns ON CONFLICT DO NOTHING and keeps the update."""
    import psycopg

    from tests.helpers import spawn_bgsync

    load_schema(dsn)
    seed(dsn, orders=3_000)
    path = plan_in_mode("orders_v2", "direct", tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    with psycopg.connect(dsn) as app:
        app.execute("UPDATE public.orders SET amount = 4242 WHERE id = 5")  # left uncommitted
        proc = spawn_bgsync(dsn, "backfill", path, "--workers", "1", "--batch-rows", "1000")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                                  "'bgsync backfill%%worker%%' AND wait_event_type = 'Lock'")
            if waiting:
                break
            time.sleep(0.05)
        assert waiting == 1, "the batch never waited on the trigger's uncommitted row"
        app.commit()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert scalar(dsn, "SELECT total_amount FROM public.orders_v2 WHERE id = 5") == 4242
    assert plan_diff(dsn, "orders_v2") == []
    fallbacks = scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE step LIKE 'copy one batch, after a race%%'")
    assert fallbacks == 1


def _worker_waits_on_a_lock(dsn: str) -> bool:
    return bool(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                            "'bgsync backfill orders_v2 worker%%' AND wait_event_type = 'Lock'"))


@pytest.mark.parametrize("change", ["DELETE FROM public.orders WHERE id = 5",
                                    "UPDATE public.orders SET id = 900005 WHERE id = 5"], ids=["delete", "key change"])
def test_batch_waits_for_an_uncommitted_delete_and_never_brings_the_row_back(dsn: str, change: str,
                                                                            tmp_path: Path) -> None:
    """FOR KEY SHARE (DESIGN, "Backfill races"): the delete's trigger already ran (green had no row 5 to
    remove), so a batch that copied row 5 before the delete committed would bring it back for good. The
    batch must wait for the delete, then skip the row."""
    import psycopg

    from tests.helpers import spawn_bgsync, wait_for

    load_schema(dsn)
    seed(dsn, orders=3_000)
    path = plan_in_mode("orders_v2", "direct", tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    with psycopg.connect(dsn) as app:
        app.execute(change)                                   # uncommitted
        proc = spawn_bgsync(dsn, "backfill", path, "--workers", "1", "--batch-rows", "1000")
        # the batch of ids 1..1000 either waits for the change, or has copied past id 5 without waiting
        wait_for(lambda: _worker_waits_on_a_lock(dsn) or copied_past(dsn, 5), timeout=60)
        waited = _worker_waits_on_a_lock(dsn)
        app.commit()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert scalar(dsn, "SELECT count(*) FROM public.orders_v2 WHERE id = 5") == 0
    assert plan_diff(dsn, "orders_v2") == []
    assert waited, "the batch copied row 5 without waiting for the uncommitted change"
