"""init: a starting plan written from the live catalog (every column, same types)."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import yaml

from orchestrator import catalog, origin
from orchestrator.errors import UsageError
from orchestrator.names import QualifiedName, parse_qualified_name
from orchestrator.spec import fit_name

Conn = psycopg.Connection[Any]


def plan_target_name(info: catalog.TableInfo) -> str:
    return f"{info.name.name}_v2"


def plan_yaml(conn: Conn, table: str) -> str:
    try:
        schema, _ = parse_qualified_name(table)
    except ValueError as error:
        raise UsageError(f"TABLE: {error}") from None
    oid = catalog.regclass_oid(conn, table)
    if oid is None:
        hint = ""
        if schema is None:
            row = conn.execute("SELECT array_to_string(current_schemas(false), ', ')").fetchone()
            hint = f" (searched schemas: {(row[0] if row else '') or 'none'}); give schema.table"
        raise UsageError(f"table {table} does not exist in {origin.describe(conn)}{hint}")
    info = catalog.load_table(conn, oid)
    if info.relkind != "r":
        raise UsageError(f"{info.name.display()} is not a plain table; bgsync migrates plain tables")
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
    for index in catalog.secondary_indexes(conn, oid):
        entry_index: dict[str, Any] = {"name": fit_name(f"{plan_target_name(info)}_{index.name}", ""),
                                       "definition": index.definition}
        if index.unique:
            entry_index["unique"] = True
        indexes.append(entry_index)
    checks = [{"name": r[0], "expression": r[1]} for r in conn.execute(
        """SELECT conname, regexp_replace(pg_get_constraintdef(oid), '^CHECK \\((.*)\\)( NOT VALID)?$', '\\1')
             FROM pg_constraint WHERE conrelid = %s AND contype = 'c' ORDER BY conname""", [oid])]
    plan: dict[str, Any] = {"name": f"{name}_v2"[:40], "source": info.name.display(),
                            "target": QualifiedName(info.name.schema, f"{info.name.name}_v2").display()}
    if info.primary_key is None:
        plan["key"] = ["<set me: a unique, NOT NULL key>"]
    plan["columns"] = columns
    plan["indexes"] = indexes
    plan["checks"] = checks
    plan["backfill"] = {"workers": 4, "batch_rows": 10000, "max_rows_per_second": 0}
    plan["verify"] = {"workers": 4}
    plan["cutover"] = {"mode": "rename", "retired_name": f"{info.name.name}_old"[:63], "lock_timeout": "2s",
                       "attempts": 10}
    header = (f"# bgsync plan scaffolded from {info.name.display()} ({len(columns)} columns).\n"
              "# Edit the columns (type, from, reverse, default) to describe green, then run\n"
              "# `bgsync validate` on this file.\n")
    return header + yaml.safe_dump(plan, sort_keys=False, allow_unicode=True, width=100)
