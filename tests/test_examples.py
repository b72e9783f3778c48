"""Acceptance 1: every example plan validates, prepares and backfills; green then equals blue."""

from __future__ import annotations

import pytest

from tests.helpers import PLANS, PROJECTIONS, bgsync, load_schema, plan_diff, scalar, seed

EXAMPLES = sorted(p.stem for p in PLANS.glob("*.yaml"))


def test_every_example_plan_has_an_independent_projection() -> None:
    assert EXAMPLES and set(EXAMPLES) == set(PROJECTIONS)


@pytest.mark.parametrize("plan", EXAMPLES)
def test_example_plan_validates_prepares_and_backfills(dsn: str, plan: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=25_000, accounts=12_000, sessions=15_000)
    path = str(PLANS / f"{plan}.yaml")

    validated = bgsync(dsn, "validate", path)
    assert validated.code == 0, validated.err
    assert f"plan {plan} is valid" in validated.out

    prepared = bgsync(dsn, "prepare", path)
    assert prepared.code == 0, prepared.err
    again = bgsync(dsn, "prepare", path)
    assert again.code == 0 and "already prepared" in again.err

    filled = bgsync(dsn, "backfill", path, "--batch-rows", "3000")
    assert filled.code == 0, filled.err
    assert plan_diff(dsn, plan) == []
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations WHERE name = %s", [plan]) == "backfilled"
    # deferred indexes exist and are valid
    invalid = scalar(dsn, """SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
                             WHERE c.relname = %s AND NOT i.indisvalid""", [f"{plan.removesuffix('_v2')}_v2"])
    assert invalid == 0
    # a rerun of a finished backfill copies nothing and succeeds
    rerun = bgsync(dsn, "backfill", path)
    assert rerun.code == 0, rerun.err
    assert "this run copied 0 rows" in rerun.err
