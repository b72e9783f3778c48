"""Issue 5.1: mixed writers (single and multi-row statements, key updates, rolled-back transactions,
COPY) through prepare, backfill, verify, cutover, reverse sync, rollback, cutover again and
finalize; the independent EXCEPT ALL diff is empty at every phase boundary and at the end."""

from __future__ import annotations

import time

from orchestrator.workload import ORDERS, Workload
from tests.helpers import PLANS, bgsync, load_schema, parity_diff, scalar, seed

BLUE = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM public.{}"
GREEN = "SELECT id, customer_id, amount, state, note, created_at FROM public.{}"


def test_mixed_writers_through_every_phase(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=30_000)
    plan = str(PLANS / "orders_numeric.yaml")
    workload = Workload(dsn, ORDERS, writers=4, key_space=30_000).start()
    boundaries: dict[str, int] = {}

    def step(*args: str) -> None:
        result = bgsync(dsn, *args)
        assert result.code == 0, (args, result.err)
        time.sleep(0.3)

    def check(label: str, blue: str, green: str) -> None:
        # One statement, one snapshot: the trigger wrote both sides in each writer's transaction.
        boundaries[label] = len(parity_diff(dsn, BLUE.format(blue), GREEN.format(green)))

    try:
        time.sleep(0.3)
        step("prepare", plan)
        step("backfill", plan, "--batch-rows", "2000", "--max-rows-per-second", "40000")
        check("after backfill", "orders", "orders_v2")
        step("verify", plan)
        check("after verify", "orders", "orders_v2")
        step("cutover", plan)
        check("after cutover (reverse sync)", "orders_old", "orders")
        step("rollback", plan)
        check("after rollback", "orders", "orders_v2")
        step("verify", plan)
        step("cutover", plan)
        check("after cutover again", "orders_old", "orders")
    finally:
        workload.finish()
    check("at the end", "orders_old", "orders")
    step("finalize", plan, "--yes")
    assert boundaries == {label: 0 for label in boundaries}, boundaries
    assert workload.errors == []
    for kind in ("insert", "insert_many", "update", "update_many", "delete", "key_update", "rollback", "copy"):
        assert workload.counts[kind] > 0, (kind, workload.counts)
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "finalized"
    assert bgsync(dsn, "status", "--json").code == 0
