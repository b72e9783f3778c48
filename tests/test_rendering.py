"""Rendering tier: generated SQL compared with reviewed expected text (acceptance 6)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from orchestrator.catalog import ColumnInfo, Grant, TableInfo, UniqueIndex
from orchestrator.executor import Executor
from orchestrator.names import QualifiedName, parse_qualified_name
from orchestrator.phases.prepare import prepare_units
from orchestrator.plan import load_plan
from orchestrator.render import as_server_text
from orchestrator.spec import build_spec
from tests.helpers import PLANS, bgsync, load_schema

EXPECTED = Path(__file__).parent / "expected"
REGENERATE = os.environ.get("BGSYNC_REGENERATE_EXPECTED") == "1"


def _compare(actual: str, name: str) -> None:
    path = EXPECTED / name
    if REGENERATE:
        path.write_text(actual)
    assert actual == path.read_text(), f"rendered SQL differs from {path}"


def orders_catalog() -> TableInfo:
    """public.orders as plans/schema.sql creates it, written out by hand."""
    cols = [
        ColumnInfo("id", "bigint", True, "nextval('orders_id_seq'::regclass)", "", "", "orders_id_seq"),
        ColumnInfo("customer_id", "bigint", True, None, "", "", None),
        ColumnInfo("amount", "integer", True, None, "", "", None),
        ColumnInfo("state", "text", True, "'new'::text", "", "", None),
        ColumnInfo("note", "text", False, None, "", "", None),
        ColumnInfo("created_at", "timestamp with time zone", True, "now()", "", "", None),
    ]
    return TableInfo(oid=1, name=QualifiedName("public", "orders"), relkind="r", owner="postgres", columns=cols,
                     unique_indexes=[UniqueIndex("orders_pkey", ("id",), True, True)],
                     grants=[Grant("app_rw", "INSERT", False), Grant("app_rw", "SELECT", False)],
                     row_security=False, estimated_rows=0)


def test_prepare_sql_offline_matches_expected() -> None:
    plan = load_plan(PLANS / "orders_v2.yaml")
    spec, problems = build_spec(plan, orders_catalog())
    assert problems == [] and spec is not None
    out = io.StringIO()
    printer = Executor(None, dry_run=True, out=out)
    for unit in prepare_units(plan, spec, "postgres"):
        printer.run(unit)
    _compare(out.getvalue(), "orders_v2.prepare.offline.sql")


def test_sql_phase_all_matches_expected(dsn: str) -> None:
    load_schema(dsn)
    result = bgsync(dsn, "sql", str(PLANS / "orders_v2.yaml"), "--phase", "all")
    assert result.code == 0, result.err
    _compare(result.out, "orders_v2.all.sql")
    # the reviewed file holds every phase, in order, each with its statements
    reviewed = (EXPECTED / "orders_v2.all.sql").read_text()
    phases = [line.removeprefix("-- phase: ") for line in reviewed.splitlines() if line.startswith("-- phase: ")]
    assert phases == ["prepare", "backfill", "verify", "expose", "cutover", "rollback", "finalize"]
    cutover, rollback, finalize = (reviewed.split(f"-- phase: {phase}\n", 1)[1]
                                   for phase in ("cutover", "rollback", "finalize"))
    assert 'ALTER TABLE "public"."orders" RENAME TO "orders_old";' in cutover
    assert 'ALTER TABLE "public"."orders_old" RENAME TO "orders";' in rollback
    assert 'DROP TABLE "public"."orders_old";' in finalize


def test_build_spec_reports_every_problem_by_field() -> None:
    plan = load_plan(PLANS / "orders_v2.yaml")
    table = orders_catalog()
    table.columns = [c for c in table.columns if c.name != "state"]
    spec, problems = build_spec(plan, table)
    assert spec is None
    assert any(p.startswith("columns[3].from: blue table public.orders has no column 'state'") for p in problems)


@pytest.mark.parametrize(("text", "parts"), [
    ("public.orders", ("public", "orders")),
    ("orders", (None, "orders")),
    ('billing."Invoices"', ("billing", "Invoices")),
    ('"we""ird"."a.b"', ('we"ird', "a.b")),
    ("Public.ORDERS", ("public", "orders")),
    ("ünï.tä", ("ünï", "tä")),
])
def test_qualified_names_parse_like_regclass(text: str, parts: tuple[str | None, str]) -> None:
    assert parse_qualified_name(text) == parts


@pytest.mark.parametrize("text", ["public.orders; drop table x", "a.b.c", '"unterminated', "", "public.", ".x",
                                  "a b"])
def test_malformed_qualified_names_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_qualified_name(text)


def test_server_text_numbers_placeholders_and_unescapes_percent() -> None:
    assert as_server_text("SELECT a %% 2 FROM t WHERE k > %s AND k <= %s") == \
        "SELECT a % 2 FROM t WHERE k > $1 AND k <= $2"


def test_plan_json_schema_names_every_field() -> None:
    result = bgsync("", "schema")
    assert result.code == 0
    schema = json.loads(result.out)
    assert set(schema["properties"]) == {"name", "source", "target", "key", "columns", "indexes", "checks",
                                         "backfill", "verify", "cutover", "views", "versions"}
    assert {"definition", "columns", "name", "unique", "where"} <= set(schema["$defs"]["Index"]["properties"])
    column = schema["$defs"]["Column"]["properties"]
    assert {"from", "reverse", "reverse_column", "default", "not_null", "type", "name"} <= set(column)
    assert schema["$defs"]["Column"]["additionalProperties"] is False


def test_readme_plan_reference_covers_the_json_schema() -> None:
    from orchestrator.plan import plan_json_schema

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Plan file reference", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            field = line.split("`")[1]
            documented |= {field, field.removesuffix("[]")}
    schema = plan_json_schema()
    expected = {f"{name}" for name in schema["properties"]}
    expected |= {f"columns[].{name}" for name in schema["$defs"]["Column"]["properties"]}
    missing = {e for e in expected if e not in documented}
    assert not missing, f"README plan reference lacks {sorted(missing)}"
    for nested in ("Index", "Check", "Backfill", "Verify", "Cutover", "ViewQuery", "Versions"):
        for name in schema["$defs"][nested]["properties"]:
            assert name in section, f"README plan reference lacks {nested}.{name}"
