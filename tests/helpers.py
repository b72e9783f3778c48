"""Shared test helpers: run the CLI as a user would, load the example schema, diff blue and green."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
PLANS = ROOT / "plans"

# Independent projections of blue and green per example plan, written by hand (not by bgsync),
# for the EXCEPT ALL parity check.
PROJECTIONS = {
    "orders_v2": (
        "SELECT id::bigint, customer_id, amount::numeric(12,2), state, note, created_at FROM public.orders",
        "SELECT id, customer_id, total_amount, status, note, created_at FROM public.orders_v2",
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
    """Run `bgsync` in a subprocess, exactly as a DBA would."""
    full_env = {**os.environ, "BGSYNC_DSN": dsn, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def spawn_bgsync(dsn: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "BGSYNC_DSN": dsn, "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def load_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((PLANS / "schema.sql").read_text())


def seed(dsn: str, orders: int = 0, accounts: int = 0, sessions: int = 0) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if orders:
            conn.execute(
                """INSERT INTO orders (customer_id, amount, state, note, created_at)
                   SELECT g %% 997, g %% 5000, (ARRAY['new','paid','void','shipped'])[1 + g %% 4],
                          CASE WHEN g %% 3 = 0 THEN NULL ELSE 'note ' || g END,
                          timestamptz '2024-01-01' + g * interval '1 minute'
                     FROM generate_series(1, %s) g""", [orders])
        if accounts:
            conn.execute("""INSERT INTO accounts (email, name)
                            SELECT 'user' || g || '@example.com', CASE WHEN g %% 5 = 0 THEN NULL ELSE 'n' || g END
                              FROM generate_series(1, %s) g""", [accounts])
        if sessions:
            conn.execute("""INSERT INTO sessions (token, account_id, payload)
                            SELECT gen_random_uuid(), g,
                                   CASE WHEN g %% 4 = 0 THEN NULL ELSE jsonb_build_object('n', g) END
                              FROM generate_series(1, %s) g""", [sessions])
        conn.execute("ANALYZE")


def parity_diff(dsn: str, blue_sql: str, green_sql: str) -> list[tuple[object, ...]]:
    """(green EXCEPT ALL blue) UNION ALL (blue EXCEPT ALL green): empty means parity."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"(({green_sql}) EXCEPT ALL ({blue_sql})) UNION ALL (({blue_sql}) EXCEPT ALL ({green_sql}))"
        ).fetchall()


def plan_diff(dsn: str, plan: str) -> list[tuple[object, ...]]:
    blue_sql, green_sql = PROJECTIONS[plan]
    return parity_diff(dsn, blue_sql, green_sql)


def scalar(dsn: str, query: str, params: list[object] | None = None) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None
