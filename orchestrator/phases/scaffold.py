"""init: a starting plan written from the live catalog (every column, same types)."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import yaml

from orchestrator import catalog
from orchestrator.errors import PlanError
from orchestrator.names import QualifiedName

Conn = psycopg.Connection[Any]


def plan_yaml(conn: Conn, table: str) -> str:
    oid = catalog.regclass_oid(conn, table)
    if oid is None:
        raise PlanError([f"TABLE: table {table} does not exist"])
    info = catalog.load_table(conn, oid)
    if info.relkind != "r":
        raise PlanError([f"TABLE: {info.name} is not a plain table"])
    name = re.sub(r"[^a-z0-9_]", "_", info.name.name.lower()).strip("_") or "migration"
    if not name[0].isalpha():
        name = "m_" + name
    columns: list[dict[str, Any]] = []
    for col in info.columns:
        column_type = col.type
        if col.own_collation and col.collation:
            column_type += " COLLATE " + col.collation.removeprefix('"pg_catalog".')
        entry: dict[str, Any] = {"name": col.name, "type": column_type}
        if col.not_null:
            entry["not_null"] = True
        columns.append(entry)
    indexes = []
    for row in conn.execute(
            """SELECT ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                             ORDER BY k.o)::text[],
                      i.indisunique, pg_get_expr(i.indpred, i.indrelid)
                 FROM pg_index i
                WHERE i.indrelid = %s AND NOT i.indisprimary AND i.indexprs IS NULL
                ORDER BY i.indexrelid""", [oid]):
        index: dict[str, Any] = {"columns": list(row[0])}
        if row[1]:
            index["unique"] = True
        if row[2]:
            index["where"] = row[2]
        indexes.append(index)
    checks = [{"name": r[0], "expression": r[1]} for r in conn.execute(
        """SELECT conname, regexp_replace(pg_get_constraintdef(oid), '^CHECK \\((.*)\\)( NOT VALID)?$', '\\1')
             FROM pg_constraint WHERE conrelid = %s AND contype = 'c' ORDER BY conname""", [oid])]
    plan: dict[str, Any] = {"name": f"{name}_v2"[:40], "source": str(info.name),
                            "target": str(QualifiedName(info.name.schema, f"{info.name.name}_v2"))}
    if info.primary_key is None:
        plan["key"] = ["<set me: a unique, NOT NULL key>"]
    plan["columns"] = columns
    plan["indexes"] = indexes
    plan["checks"] = checks
    plan["backfill"] = {"workers": 4, "batch_rows": 10000, "max_rows_per_second": 0}
    plan["verify"] = {"workers": 4}
    plan["cutover"] = {"mode": "rename", "retired_name": f"{info.name.name}_old"[:63], "lock_timeout": "2s",
                       "attempts": 10}
    header = (f"# bgsync plan scaffolded from {info.name} ({len(columns)} columns).\n"
              "# Edit the columns (type, from, reverse, default) to describe green, then run\n"
              "# `bgsync validate` on this file.\n")
    return header + yaml.safe_dump(plan, sort_keys=False, allow_unicode=True, width=100)
