"""Acceptance 1: every example plan validates, prepares and backfills; green then equals blue."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import yaml

from tests.helpers import PLANS, PROJECTIONS, bgsync, load_schema, parity_diff, plan_diff, scalar, scalars, seed

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


def test_composite_integer_key_backfills_in_key_order(dsn: str, tmp_path: Path) -> None:
    """Sampled partition boundaries and batch bounds must follow the key's order, not its text."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""CREATE TABLE public.readings (site int, seq int, value numeric, PRIMARY KEY (site, seq));
                        INSERT INTO public.readings SELECT g % 37, g, g * 1.5 FROM generate_series(1, 30000) g;
                        ANALYZE public.readings""")
    plan = {"name": "readings_v2", "source": "public.readings",
            "columns": [{"name": "site", "type": "bigint", "not_null": True},
                        {"name": "seq", "type": "bigint", "not_null": True},
                        {"name": "value", "type": "numeric(14,2)"}]}
    file = tmp_path / "readings.yaml"
    file.write_text(yaml.safe_dump(plan))
    assert bgsync(dsn, "prepare", str(file)).code == 0
    filled = bgsync(dsn, "backfill", str(file), "--batch-rows", "700", "--workers", "3")
    assert filled.code == 0, filled.err
    assert parity_diff(dsn, "SELECT site::bigint, seq::bigint, value::numeric(14,2) FROM public.readings",
                       "SELECT site, seq, value FROM public.readings_v2") == []
    # batches were about batch_rows each, i.e. the bounds followed the key order
    sizes = [int(r) for r in scalars(dsn, "SELECT (detail::jsonb->>'rows') FROM bgsync.events "
                                          "WHERE detail IS NOT NULL")]
    assert max(sizes) <= 701 and len(sizes) >= 30000 // 701
    assert bgsync(dsn, "verify", str(file)).code == 0
