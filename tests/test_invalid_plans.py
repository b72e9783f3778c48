"""Acceptance 4: invalid plans exit 2 with a message naming the field or object, and leave the
database untouched (no bgsync schema, no green table, blue intact)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.helpers import PLANS, bgsync, load_schema, seed

BASE: dict[str, Any] = yaml.safe_load((PLANS / "orders_v2.yaml").read_text())


def _variant(**changes: Any) -> dict[str, Any]:
    plan = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        target = plan
        parts = path.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value
    return plan


def _with_column(column: dict[str, Any]) -> dict[str, Any]:
    plan = _variant()
    plan["columns"].append(column)
    return plan


CASES: list[tuple[str, Any, str]] = [
    ("malformed yaml", "name: x\ncolumns: [\n  - {name: id", "(yaml): malformed YAML at line"),
    ("not a mapping", "- just\n- a list\n", "the plan must be a YAML mapping"),
    ("unknown field", _variant(columns__1={"name": "customer_id", "type": "bigint", "colour": "red"}),
     "columns[1].colour: unknown field"),
    ("unknown top-level field", {**_variant(), "tablespace": "fast"}, "tablespace: unknown field"),
    ("bad name", _variant(name="Orders-V2"), "name: String should match pattern"),
    ("bad duration", _variant(cutover__lock_timeout="2 parsecs"), "cutover.lock_timeout: not a PostgreSQL duration"),
    ("missing source", _variant(source="public.no_such_table"), "source: table public.no_such_table does not exist"),
    ("unicode source that does not exist", _variant(source='public."ördérs"'),
     'source: table public."ördérs" does not exist'),
    ("source with semicolon unquoted", _variant(source="public.orders; DROP TABLE public.orders"),
     "source: not a valid SQL name"),
    ("source with quotes and semicolon", _variant(source='public."orders; DROP TABLE public.orders; --"'),
     "does not exist"),
    ("no key", _variant(source="public.keyless", target="public.keyless_v2",
                        columns=[{"name": "a", "type": "int"}], key=None, indexes=[], checks=[]),
     "key: source public.keyless has no primary key"),
    ("from does not type-check", _variant(columns__2={"name": "total_amount", "type": "numeric(12,2)",
                                                      "from": "created_at", "reverse": "1",
                                                      "reverse_column": "amount"}),
     "columns[2].from: column \"total_amount\" is of type numeric but expression is of type timestamp"),
    ("from names a missing column", _variant(columns__2={"name": "total_amount", "type": "numeric",
                                                        "from": "amount * no_such_column", "reverse": "1",
                                                        "reverse_column": "amount"}),
     "columns[2].from: column \"no_such_column\" does not exist"),
    ("reverse does not type-check", _variant(columns__2={"name": "total_amount", "type": "numeric(12,2)",
                                                        "from": "amount", "reverse": "now()",
                                                        "reverse_column": "amount"}),
     "columns[2].reverse: column \"amount\" is of type integer but expression is of type timestamp"),
    ("bad type", _variant(columns__4={"name": "note", "type": "txet"}),
     "columns[4].type: type \"txet\" does not exist"),
    ("bad check", _variant(checks=[{"name": "c1", "expression": "total_amount > 'abc'"}]),
     "checks[0].expression: invalid input syntax"),
    ("bad index predicate", _variant(indexes=[{"columns": ["status"], "where": "now() > created_at"}]),
     "indexes[0]: functions in index predicate must be marked IMMUTABLE"),
    ("injection through an expression", _variant(columns__4={"name": "note", "type": "text",
                                                            "from": "note); DROP TABLE public.orders; --"}),
     "columns[4].from:"),
    ("column name with quotes and semicolons", _with_column(
        {"name": 'x"; DROP TABLE public.orders; --', "type": "int", "not_null": True}),
     "columns[6]: 'x\"; DROP TABLE public.orders; --' is NOT NULL but has no `from`"),
    ("target taken", _variant(target="public.accounts"), "target: public.accounts already exists"),
    ("blue column left without a value", _variant(columns__2={"name": "total_amount", "type": "numeric(12,2)",
                                                             "not_null": True, "from": "amount * 2"}),
     "blue column 'amount' is read by columns[2] (total_amount) but nothing feeds it after cutover"),
    ("key from an expression", _variant(columns__0={"name": "id", "type": "bigint", "not_null": True,
                                                    "from": "id + 0"}),
     "key[0]: key column id must be copied unchanged from blue (it identifies each row in both tables): "
     "remove `from`, or change `key`"),
]


@pytest.mark.parametrize(("case", "plan", "message"), CASES, ids=[c[0] for c in CASES])
def test_invalid_plan_exits_2_and_changes_nothing(dsn: str, tmp_path: Path, case: str, plan: Any,
                                                  message: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.keyless (a int)")
    file = tmp_path / "plan.yaml"
    file.write_text(plan if isinstance(plan, str) else yaml.safe_dump(plan, allow_unicode=True))
    for command in (["validate"], ["prepare"], ["sql", "--phase", "all"]):
        result = bgsync(dsn, *command, str(file))
        assert result.code == 2, (command, result.out, result.err)
        assert message in result.err, (command, result.err)
        assert "Traceback" not in result.err
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('bgsync')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM public.orders").fetchone() == (100,)
        assert conn.execute("SELECT to_regclass('public.orders_v2')").fetchone() == (None,)
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal").fetchone()
        assert triggers == (0,)
