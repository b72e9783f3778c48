"""Acceptance 1: every example plan validates, prepares and backfills; green then equals blue."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import yaml

from tests.helpers import PLANS, PROJECTIONS, bgsync, load_schema, parity_diff, plan_diff, scalar, seed

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
    # batches were no larger than their target (batch_rows to start with, adapting up to twice that),
    # i.e. the bounds followed the key order
    batches = [(int(r), int(t)) for r, t in scalars_pairs(dsn)]
    assert all(rows <= target <= 2 * 700 for rows, target in batches), batches
    assert len(batches) >= 30000 // 1400
    assert bgsync(dsn, "verify", str(file)).code == 0


def scalars_pairs(dsn: str) -> list[tuple[str, str]]:
    """(rows, target) of every batch in the journal."""
    with psycopg.connect(dsn) as conn:
        return [(r, t) for r, t in conn.execute(
            "SELECT detail::jsonb->>'rows', detail::jsonb->>'target' FROM bgsync.events "
            "WHERE detail LIKE '{%%' AND detail::jsonb ? 'chunk'")]


def catalog_columns(dsn: str, table: str) -> list[tuple[object, ...]]:
    """(name, type, NOT NULL) of each column, in order, read from the catalog."""
    with psycopg.connect(dsn) as conn:
        return [tuple(r) for r in conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a
                WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
            [table])]


@pytest.mark.parametrize("table", ["public.orders", "public.accounts", "public.sessions"])
def test_init_writes_a_plan_that_validates_runs_and_round_trips(dsn: str, tmp_path: Path, table: str) -> None:
    """`bgsync init` scaffolds every column of the live table with its type (read here from the catalog
    independently), the plan validates, parses back to itself, prepares, backfills and verifies, and
    `plan show` prints the file back."""
    from orchestrator import commands
    from orchestrator.plan import load_plan, parse_plan

    load_schema(dsn)
    seed(dsn, orders=2_000, accounts=1_000, sessions=1_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders ADD CONSTRAINT orders_amount_nonneg CHECK (amount >= 0)")
        conn.execute("CREATE INDEX orders_open_idx ON public.orders (state) WHERE state <> 'void'")
    file = tmp_path / "scaffold.yaml"
    written = bgsync(dsn, "init", table, "-o", str(file))
    assert written.code == 0, written.err
    assert f"wrote {file}" in written.err
    validated = bgsync(dsn, "validate", str(file))
    assert validated.code == 0, validated.err
    plan = load_plan(file)
    blue = catalog_columns(dsn, table)
    assert [(c.name, c.type, c.not_null) for c in plan.columns] == blue
    if table == "public.orders":
        # init writes each index exactly as the catalog defines it (method, opclasses, predicate)
        assert {i.definition for i in plan.indexes} == {"USING btree (customer_id)",
                                                       "USING btree (state) WHERE (state <> 'void'::text)"}
        assert [(c.name, c.expression) for c in plan.checks] == [("orders_amount_nonneg", "(amount >= 0)")]
    dumped = yaml.safe_dump(plan.model_dump(mode="json", by_alias=True, exclude_none=True))
    assert parse_plan(yaml.safe_load(dumped)) == plan
    options = commands.Options(dsn=dsn)
    commands.prepare(options, file)
    commands.backfill(options, file)
    assert commands.verify(options, file).passed
    assert catalog_columns(dsn, f"{table}_v2") == blue
    shown = bgsync(dsn, "plan", "show", plan.name)
    assert shown.code == 0 and shown.out == file.read_text()
