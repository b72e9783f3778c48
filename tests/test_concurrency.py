"""Acceptance 2: four writers (inserts, updates, deletes, key updates, multi-row statements,
rolled-back transactions) run throughout prepare and backfill; afterwards an independent
EXCEPT ALL finds no lost, resurrected or stale row."""

from __future__ import annotations

import time

import pytest

from tests.helpers import PLANS, bgsync, load_schema, plan_diff, seed
from tests.workload import ORDERS, SESSIONS, TableOps, Workload

CASES = [("orders_v2", ORDERS, {"orders": 60_000}), ("sessions_v2", SESSIONS, {"sessions": 40_000})]


@pytest.mark.parametrize(("plan", "ops", "rows"), CASES, ids=[c[0] for c in CASES])
def test_writers_through_prepare_and_backfill(dsn: str, plan: str, ops: TableOps, rows: dict[str, int]) -> None:
    load_schema(dsn)
    seed(dsn, **rows)
    path = str(PLANS / f"{plan}.yaml")
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
