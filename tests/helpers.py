"""Shared test helpers: run the CLI as a user would, load the example schema, diff blue and green."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from orchestrator.workload import load_sample_schema, seed_sample
from tests import forked_cli

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "plans"

# Independent projections of blue and green per example plan, written by hand (not by bgsync),
# for the EXCEPT ALL parity check.
PROJECTIONS = {
    "orders_v2": (
        "SELECT id::bigint, customer_id, amount::numeric(12,2), state, note, created_at FROM public.orders",
        "SELECT id, customer_id, total_amount, status, note, created_at FROM public.orders_v2",
    ),
    "orders_numeric": (
        "SELECT id::bigint, customer_id, amount::numeric(12,2), state, note, created_at FROM public.orders",
        "SELECT id, customer_id, amount, state, note, created_at FROM public.orders_v2",
    ),
    "accounts_v2": (
        "SELECT id::bigint, email, name, created_at FROM public.accounts",
        "SELECT id, email, name, created_at FROM public.accounts_v2",
    ),
    "sessions_v2": (
        "SELECT token, account_id::bigint, payload::text, started_at FROM public.sessions",
        "SELECT token, account_id, payload, started_at FROM public.sessions_v2",
    ),
}


@dataclass
class Result:
    code: int
    out: str
    err: str


def bgsync(dsn: str, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Result:
    """Run `bgsync` in a process of its own, as a DBA would (forked from a server with the libraries
    already imported; `spawn_bgsync` and BGSYNC_TEST_SUBPROCESS=1 start a real `python -m orchestrator`)."""
    return Result(*forked_cli.run(list(args), cli_env(dsn, env), ROOT, timeout))


def spawn_bgsync(dsn: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(dsn, env), cwd=ROOT)


def cli_env(dsn: str, env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a bgsync command in the tests: ours, the DSN, a wide console, the test's own."""
    return {**os.environ, "BGSYNC_DSN": dsn, "COLUMNS": "200", **(env or {})}


def load_schema(dsn: str) -> None:
    load_sample_schema(dsn)


def seed(dsn: str, orders: int = 0, accounts: int = 0, sessions: int = 0) -> None:
    seed_sample(dsn, orders=orders, accounts=accounts, sessions=sessions)


def parity_diff(dsn: str, blue_sql: str, green_sql: str) -> list[tuple[object, ...]]:
    """(green EXCEPT ALL blue) UNION ALL (blue EXCEPT ALL green): empty means parity."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"(({green_sql}) EXCEPT ALL ({blue_sql})) UNION ALL (({blue_sql}) EXCEPT ALL ({green_sql}))"
        ).fetchall()


def text_diff(dsn: str, blue_sql: str, green_sql: str) -> list[tuple[object, ...]]:
    """Two-way EXCEPT ALL of whole rows as text, in one session: values that are `=` but read
    differently (1.5 and 1.50, '1 day' and '24:00:00', -0 and 0) count as differences."""
    return parity_diff(dsn, f"SELECT (q.*)::text FROM ({blue_sql}) AS q", f"SELECT (q.*)::text FROM ({green_sql}) AS q")


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll until `condition` holds; fail the test when it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def plan_diff(dsn: str, plan: str) -> list[tuple[object, ...]]:
    blue_sql, green_sql = PROJECTIONS[plan]
    return parity_diff(dsn, blue_sql, green_sql)


def scalar(dsn: str, query: str, params: list[object] | None = None) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def scalars(dsn: str, query: str, params: list[object] | None = None) -> list[object]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(query, params).fetchall()]


def plan_in_mode(plan: str, mode: str, directory: Path) -> str:
    """A copy of an example plan (by name) whose backfill runs in `mode` (bulk or direct)."""
    import yaml

    data = yaml.safe_load((PLANS / f"{plan}.yaml").read_text(encoding="utf-8"))
    data["backfill"] = {**data.get("backfill", {}), "mode": mode}
    path = directory / f"{plan}.{mode}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


def copied_past(dsn: str, key: int) -> bool:
    """The journal says the backfill partition holding integer `key` has been copied past it."""
    if not scalar(dsn, "SELECT to_regclass('bgsync.chunks')"):
        return False
    return bool(scalar(dsn, "SELECT count(*) FROM bgsync.chunks WHERE coalesce(lo[1]::bigint, -1) < %s "
                            "AND cursor[1]::bigint >= %s", [key, key]))
