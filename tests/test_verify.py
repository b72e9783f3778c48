"""Issue 3, acceptance 1: verify is exact under load, finds each planted defect by key and column,
and --repair restores parity while writers keep writing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from orchestrator import commands
from orchestrator.workload import ORDERS, SESSIONS, TableOps, Workload
from tests.helpers import PLANS, bgsync, load_schema, plan_diff, seed

LOADED = [("orders_v2", ORDERS, {"orders": 30_000}), ("sessions_v2", SESSIONS, {"sessions": 20_000})]


@pytest.mark.parametrize(("plan", "ops", "rows"), LOADED, ids=[c[0] for c in LOADED])
def test_no_false_mismatch_in_20_runs_under_load(dsn: str, plan: str, ops: TableOps, rows: dict[str, int]) -> None:
    load_schema(dsn)
    seed(dsn, **rows)
    path = PLANS / f"{plan}.yaml"
    assert bgsync(dsn, "prepare", str(path)).code == 0
    assert bgsync(dsn, "backfill", str(path)).code == 0
    workload = Workload(dsn, ops, writers=4, key_space=next(iter(rows.values())), pause=0.001).start()
    try:
        options = commands.Options(dsn=dsn)
        reports = [commands.verify(options, path, workers=2, as_json=True) for _ in range(20)]
    finally:
        workload.finish()
    assert all(r.passed for r in reports)
    assert sum(workload.counts.values()) > 200, workload.counts
    assert workload.errors == []
    assert plan_diff(dsn, plan) == []


def test_planted_defects_are_found_by_key_and_column_then_repaired_under_load(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=20_000)
    path = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", path).code == 0
    assert bgsync(dsn, "backfill", path).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Green is written directly (it has no triggers before cutover), so blue does not follow.
        conn.execute("DELETE FROM orders_v2 WHERE id = 101")
        conn.execute("INSERT INTO orders_v2 (id, customer_id, total_amount, status, note, created_at) "
                     "VALUES (90000001, 1, 1, 'new', NULL, now())")
        conn.execute("UPDATE orders_v2 SET total_amount = total_amount + 1 WHERE id = 202")
        conn.execute("UPDATE orders SET note = NULL WHERE id = 303")
        conn.execute("UPDATE orders_v2 SET note = '' WHERE id = 303")
    result = bgsync(dsn, "verify", path, "--json")
    assert result.code == 1, result.err
    report = json.loads(result.out)
    found = {(m["kind"], tuple(m["key"]), tuple(m["columns"])) for m in report["mismatches"]}
    assert found == {
        ("missing_in_green", ("101",), ()),
        ("extra_in_green", ("90000001",), ()),
        ("different", ("202",), ("total_amount",)),
        ("different", ("303",), ("note",)),
    }
    note = next(m for m in report["mismatches"] if m["key"] == ["303"])
    assert note["blue"] == {"note": None} and note["green"] == {"note": ""}

    workload = Workload(dsn, ORDERS, writers=4, key_space=20_000).start()
    try:
        time.sleep(0.3)
        repaired = bgsync(dsn, "verify", path, "--repair", "--json")
        time.sleep(0.3)
    finally:
        workload.finish()
    assert repaired.code == 0, repaired.err
    final = json.loads(repaired.out)
    assert final["passed"] is True and final["repaired"]["mismatched_rows"] == 4
    assert workload.errors == []
    assert plan_diff(dsn, "orders_v2") == []


METRICS = """
CREATE TABLE public.metrics (id int PRIMARY KEY, amount numeric, ratio float8, at timestamptz, a text, b text,
                             j json);
INSERT INTO public.metrics
SELECT g, g / 2.0, CASE WHEN g = 2 THEN 0 ELSE g / 3.0 END, timestamptz '2025-03-30 01:30:00+00' + g * interval '1h',
       CASE WHEN g = 4 THEN NULL ELSE 'a' || g END, CASE WHEN g = 6 THEN NULL ELSE 'b' || g END,
       json_build_object('g', g)
  FROM generate_series(1, 500) g;
"""


def test_values_that_read_differently_are_differences_and_the_same_instant_is_not(
        dsn: str, tmp_path: Path) -> None:
    """Parity is text in one session (DESIGN, "Exact verify"): 0.5 and 0.50000 in an unconstrained
    numeric, 0 and -0 differ; one instant written from two time zones does not."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(METRICS)
    plan = {"name": "metrics_v2", "source": "public.metrics",
            "columns": [{"name": "id", "type": "int", "not_null": True}, {"name": "amount", "type": "numeric"},
                        {"name": "ratio", "type": "float8"}, {"name": "at", "type": "timestamptz"},
                        {"name": "a", "type": "text"}, {"name": "b", "type": "text"},
                        {"name": "j", "type": "json"},
                        {"name": "rem", "type": "int", "from": "id % 7"}]}   # a `%` in SQL run with parameters
    file = tmp_path / "metrics.yaml"
    file.write_text(yaml.safe_dump(plan))
    assert bgsync(dsn, "prepare", str(file)).code == 0
    assert bgsync(dsn, "backfill", str(file)).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE metrics_v2 SET amount = 0.50000 WHERE id = 1")           # 0.5 vs 0.50000
        conn.execute("UPDATE metrics_v2 SET ratio = '-0' WHERE id = 2")               # 0 vs -0
        conn.execute("SET TimeZone = 'Asia/Kathmandu'")
        conn.execute("UPDATE metrics_v2 SET at = '2025-03-30 10:15:00+05:45' WHERE id = 3")  # same instant
        conn.execute("UPDATE metrics_v2 SET a = 'NULL' WHERE id = 4")                 # NULL vs 'NULL'
        conn.execute("UPDATE metrics_v2 SET a = b, b = a WHERE id = 5")               # swapped columns
        conn.execute("UPDATE metrics_v2 SET b = '' WHERE id = 6")                     # NULL vs ''
        conn.execute("""UPDATE metrics_v2 SET j = '{"g": 7}' WHERE id = 7""")      # json has no hash: as text
    result = bgsync(dsn, "verify", str(file), "--json", env={"PGTZ": "America/New_York"})
    assert result.code == 1, result.err
    found = {(tuple(m["key"]), tuple(m["columns"])) for m in json.loads(result.out)["mismatches"]}
    assert found == {(("1",), ("amount",)), (("2",), ("ratio",)), (("4",), ("a",)), (("5",), ("a", "b")),
                     (("6",), ("b",)), (("7",), ("j",))}


def test_verify_refuses_before_backfill(dsn: str) -> None:
    load_schema(dsn)
    path = PLANS / "orders_v2.yaml"
    assert bgsync(dsn, "prepare", str(path)).code == 0
    result = bgsync(dsn, "verify", str(path))
    assert result.code == 1 and "verify refused" in result.err and "not backfilled yet" in result.err
    assert f"run `bgsync backfill {path}`" in result.err
