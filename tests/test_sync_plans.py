"""The sync's statements run in linear time whatever the session ran before.

PL/pgSQL caches a trigger function's plans at their first execution in a session, planned for the
transition tables of that statement: an application's pooled session that first updated one row plans
for one row, and keeps that plan for its next statement of 100,000 rows. A join between two transition
tables planned for one row is a nested loop that reads the inner table once per outer row: quadratic (a
3,000-row UPDATE took 0.5 s, a 100,000-row UPDATE more than 10 minutes on PostgreSQL 15). Each test warms
a session up with single-row statements, then runs large ones in it, and reads the plans PostgreSQL
actually ran (auto_explain, nested statements, ANALYZE): no transition table and no CTE may be read more
than once by a statement of bgsync's functions. Every phase whose sync differs is covered: bulk mode's
key log, the forward sync, the two-way window (on blue and on green) and the reverse sync."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.helpers import scalar, text_diff
from tests.test_exactness import DOC, DOC_BLUE, DOC_GREEN, DOC_PLAN, run_ok, setup, write_plan

ROWS = 1500
RESCANNED = ("Named Tuplestore Scan", "CTE Scan")


def warm_up(conn: psycopg.Connection[Any], table: str) -> None:
    """One row per event: the session caches the sync function's plans for one-row transition tables."""
    conn.execute(f"UPDATE public.{table} SET n = n WHERE id = 1")
    conn.execute(f"UPDATE public.{table} SET id = -1 WHERE id = 2")
    conn.execute(f"UPDATE public.{table} SET id = 2 WHERE id = -1")
    conn.execute(f"INSERT INTO public.{table} (id, body, n) VALUES (-5, 'warm', 0)")
    conn.execute(f"DELETE FROM public.{table} WHERE id = -5")


LARGE = (
    "UPDATE public.{t} SET n = n + 1 WHERE id <= {rows}",                       # no key changes
    "UPDATE public.{t} SET id = id + 1000000 WHERE id <= {rows}",               # every key changes
    "UPDATE public.{t} SET id = id - 1000000 WHERE id > 1000000",
    "INSERT INTO public.{t} (id, body, n) SELECT -g, 'new', g FROM generate_series(1, {rows}) g",
    "DELETE FROM public.{t} WHERE id < 0",
)


def sync_plans(conn: psycopg.Connection[Any], statement: str) -> list[dict[str, Any]]:
    """The plans of the statements the triggers ran for `statement`, as auto_explain logged them."""
    logged: list[str] = []

    def keep(diagnostic: psycopg.errors.Diagnostic) -> None:
        logged.append(diagnostic.message_primary or "")

    conn.add_notice_handler(keep)
    try:
        conn.execute(statement)
    finally:
        conn.remove_notice_handler(keep)
    plans = [json.loads(message.split("plan:", 1)[1]) for message in logged if "plan:" in message]
    return [plan for plan in plans if plan["Query Text"].strip() != statement]


def rescans(plan: dict[str, Any]) -> Iterator[str]:
    """Each node of `plan` that read a transition table or a CTE more than once."""
    def walk(node: dict[str, Any]) -> Iterator[str]:
        if node["Node Type"] in RESCANNED and node.get("Actual Loops", 1) > 1:
            yield f"{node['Node Type']} {node.get('Alias') or node.get('CTE Name')} read {node['Actual Loops']} times"
        for child in node.get("Plans", []):
            yield from walk(child)
    return walk(plan["Plan"])


def explained(conn: psycopg.Connection[Any]) -> None:
    """auto_explain on in this session: every statement's plan as it ran, nested ones included."""
    conn.execute("LOAD 'auto_explain'")
    for setting, value in (("log_min_duration", "0"), ("log_nested_statements", "on"),
                           ("log_analyze", "on"), ("log_timing", "off"), ("log_format", "json")):
        conn.execute(f"SET auto_explain.{setting} = {value}")
    conn.execute("SET client_min_messages = log")


def whole_reads(plan: dict[str, Any], tables: set[str]) -> Iterator[str]:
    """Each node of `plan` that read more rows of a table than a per-key probe does, and JIT (compiled
    again at every run of a cached plan: milliseconds for a one-row statement)."""
    if "JIT" in plan:
        yield f"JIT compiled {plan['JIT'].get('Functions')} functions"

    def walk(node: dict[str, Any]) -> Iterator[str]:
        read = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) + node.get("Rows Removed by Filter", 0)
        if node.get("Relation Name") in tables and (node["Node Type"] == "Seq Scan" or read > 10):
            yield f"{node['Node Type']} on {node['Relation Name']}: {read} rows"
        if node["Node Type"] in ("Hash Join", "Merge Join"):
            yield node["Node Type"]
        for child in node.get("Plans", []):
            yield from walk(child)
    yield from walk(plan["Plan"])


def assert_per_key(dsn: str, table: str, tables: set[str]) -> None:
    """A session whose first statements were large caches plans sized for them; its next single-row
    statements must still probe each table by key, not read it whole, and compile nothing."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET jit_above_cost = 0")       # where the server has JIT: any plan the sync keeps uses it
        for statement in LARGE:
            conn.execute(statement.format(t=table, rows=ROWS))
        explained(conn)
        seen = 0
        for statement in (f"UPDATE public.{table} SET n = n + 1 WHERE id = 7",
                          f"UPDATE public.{table} SET id = -7 WHERE id = 8",
                          f"INSERT INTO public.{table} (id, body, n) VALUES (-9, 'one', 9)",
                          f"DELETE FROM public.{table} WHERE id IN (-7, -9)"):
            plans = sync_plans(conn, statement)
            seen += len(plans)
            found = [(plan["Query Text"].strip().splitlines()[0], what) for plan in plans
                     for what in whole_reads(plan, tables)]
            assert found == [], (statement, found)
        assert seen >= 4, "auto_explain logged none of the sync's statements"


def assert_linear(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        warm_up(conn, table)
        explained(conn)
        seen = 0
        for statement in LARGE:
            text = statement.format(t=table, rows=ROWS)
            plans = sync_plans(conn, text)
            seen += len(plans)
            found = [(plan["Query Text"].strip().splitlines()[0], what) for plan in plans for what in rescans(plan)]
            assert found == [], (text, found)
        assert seen >= len(LARGE), "auto_explain logged none of the sync's statements"


@pytest.mark.parametrize("mode", ["bulk", "direct"])
def test_a_session_that_wrote_one_row_first_syncs_large_statements_in_linear_time(
        dsn: str, tmp_path: Path, mode: str) -> None:
    setup(dsn, DOC)
    plan = write_plan(tmp_path, {**DOC_PLAN, "backfill": {**DOC_PLAN["backfill"], "mode": mode},
                                 "versions": {"blue": "doc_old_release", "green": "doc_new_release"}})
    run_ok(dsn, "prepare", str(plan))
    if mode == "bulk":                                   # the trigger only logs keys until the switch
        assert_linear(dsn, "doc")
        assert scalar(dsn, "SELECT count(*) > 0 FROM bgsync.doc_v2_log") is True
    run_ok(dsn, "backfill", str(plan))
    run_ok(dsn, "verify", str(plan))
    assert_linear(dsn, "doc")                            # forward sync
    assert text_diff(dsn, DOC_BLUE.format("doc"), DOC_GREEN.format("doc_v2")) == []
    run_ok(dsn, "expose", str(plan))
    assert_linear(dsn, "doc")                            # the window, written on blue
    assert_linear(dsn, "doc_v2")                         # and on green
    assert text_diff(dsn, DOC_BLUE.format("doc"), DOC_GREEN.format("doc_v2")) == []
    run_ok(dsn, "rollback", str(plan))
    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "cutover", str(plan))
    assert_linear(dsn, "doc")                            # the reverse sync: green is live under the name
    assert text_diff(dsn, DOC_BLUE.format("doc_old"), DOC_GREEN.format("doc")) == []


@pytest.mark.parametrize("mode", ["bulk", "direct"])
def test_a_session_that_wrote_many_rows_first_syncs_single_rows_by_key(dsn: str, tmp_path: Path, mode: str) -> None:
    """The other order (seen in the window at 1M rows: a session's single-row UPDATEs took 76 ms each after
    its first statement had updated 100,000 rows, 0.5 ms otherwise; 6 ms of it was JIT compiling the
    cached plan at every run): plans cached for large transition tables must not scan whole tables."""
    setup(dsn, DOC)
    plan = write_plan(tmp_path, {**DOC_PLAN, "backfill": {**DOC_PLAN["backfill"], "mode": mode},
                                 "versions": {"blue": "doc_old_release", "green": "doc_new_release"}})
    tables = {"doc", "doc_v2"}
    run_ok(dsn, "prepare", str(plan))
    if mode == "bulk":                                   # the trigger logs keys, probing blue for old keys
        assert_per_key(dsn, "doc", tables)
    run_ok(dsn, "backfill", str(plan))
    run_ok(dsn, "verify", str(plan))
    assert_per_key(dsn, "doc", tables)                   # forward sync
    run_ok(dsn, "expose", str(plan))
    assert_per_key(dsn, "doc", tables)                   # the window, written on blue
    assert_per_key(dsn, "doc_v2", tables)                # and on green
    assert text_diff(dsn, DOC_BLUE.format("doc"), DOC_GREEN.format("doc_v2")) == []
    run_ok(dsn, "rollback", str(plan))
    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "cutover", str(plan))
    assert_per_key(dsn, "doc", tables | {"doc_old"})     # the reverse sync: green is live under the name
    assert text_diff(dsn, DOC_BLUE.format("doc_old"), DOC_GREEN.format("doc")) == []
