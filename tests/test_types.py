"""Issue 5.6: NULLs in every nullable column, TOASTed text and jsonb, arrays, NaN and infinities,
timestamptz across time zones, with a uuid, a text and a composite key: backfill, verify, cutover,
rollback and cutover again all exact."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import yaml

from tests.helpers import bgsync, parity_diff

KEYS = {
    "uuid": ("k uuid PRIMARY KEY", "gen_random_uuid()", [{"name": "k", "type": "uuid", "not_null": True}]),
    "text": ("k text PRIMARY KEY", "'key-' || g || '-' || md5(g::text)",
             [{"name": "k", "type": "text", "not_null": True}]),
    "composite": ("k1 int, k2 text, PRIMARY KEY (k1, k2)", "(g % 7)::int, 'k' || g",
                  [{"name": "k1", "type": "bigint", "not_null": True},
                   {"name": "k2", "type": "text", "not_null": True}]),
}
VALUE_COLUMNS = """
    t text, big text, j jsonb, ints int[], texts text[], f8 float8, f4 real, n numeric,
    ts timestamptz, d date, b bytea, flag boolean, span interval"""
VALUES = """
    CASE WHEN g % 5 = 0 THEN NULL ELSE 't' || g END,
    CASE WHEN g % 50 = 1 THEN repeat(md5(g::text), 4000) WHEN g % 5 = 0 THEN NULL END,
    CASE WHEN g % 5 = 0 THEN NULL WHEN g % 40 = 2 THEN (SELECT jsonb_agg(x) FROM generate_series(1, 5000) x)
         ELSE jsonb_build_object('g', g, 'nested', jsonb_build_array(g, 'x', NULL)) END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY[g, NULL, -g] END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY['a,b', '"q"', NULL, ''] END,
    CASE g % 6 WHEN 0 THEN NULL WHEN 1 THEN 'NaN'::float8 WHEN 2 THEN 'Infinity' WHEN 3 THEN '-Infinity'
              WHEN 4 THEN '-0' ELSE g / 7.0 END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE (g / 3.0)::real END,
    CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN 'NaN'::numeric ELSE g / 9.0 END,
    CASE WHEN g % 5 = 0 THEN NULL
         ELSE (timestamptz '2024-03-31 01:30:00 Europe/Berlin' + g * interval '17 minutes') AT TIME ZONE
              (ARRAY['UTC', 'Asia/Kolkata', 'America/St_Johns'])[1 + g % 3] AT TIME ZONE 'UTC' END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE date '2024-02-28' + g END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE g % 2 = 0 END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE g * interval '1 minute 3 seconds' END"""
VALUE_PLAN = [{"name": n, "type": t} for n, t in (
    ("t", "text"), ("big", "text"), ("j", "jsonb"), ("ints", "int[]"), ("texts", "text[]"), ("f8", "float8"),
    ("f4", "real"), ("n", "numeric"), ("ts", "timestamptz"), ("d", "date"), ("b", "bytea"), ("flag", "boolean"),
    ("span", "interval"))]


@pytest.mark.parametrize("key", list(KEYS))
def test_awkward_values_survive_every_phase(dsn: str, tmp_path: Path, key: str) -> None:
    key_sql, key_values, key_plan = KEYS[key]
    key_names = [c["name"] for c in key_plan]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.kinds ({key_sql}, {VALUE_COLUMNS})")
        conn.execute(f"INSERT INTO public.kinds SELECT {key_values}, {VALUES} FROM generate_series(1, 3000) g")
        conn.execute("ANALYZE public.kinds")
    plan = tmp_path / "kinds.yaml"
    plan.write_text(yaml.safe_dump({"name": "kinds_v2", "source": "public.kinds", "columns": key_plan + VALUE_PLAN,
                                    "backfill": {"workers": 2, "batch_rows": 400}}))
    columns = ", ".join(key_names + [c["name"] for c in VALUE_PLAN])
    blue_cast = ", ".join([f"{k}::{c['type']}" for k, c in zip(key_names, key_plan, strict=True)]
                          + [c["name"] for c in VALUE_PLAN])

    def diff(blue: str, green: str) -> list[tuple[object, ...]]:
        return parity_diff(dsn, f"SELECT {blue_cast} FROM public.{blue}", f"SELECT {columns} FROM public.{green}")

    for command in ("prepare", "backfill"):
        result = bgsync(dsn, command, str(plan))
        assert result.code == 0, result.err
    assert diff("kinds", "kinds_v2") == []
    verified = bgsync(dsn, "verify", str(plan), env={"PGTZ": "Pacific/Chatham"})
    assert verified.code == 0, verified.out + verified.err
    assert bgsync(dsn, "cutover", str(plan)).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'America/Caracas'")
        conn.execute(f"INSERT INTO public.kinds SELECT {key_values}, {VALUES} FROM generate_series(5001, 5300) g")
        conn.execute("UPDATE public.kinds SET f8 = 'NaN', n = NULL, ts = now(), big = repeat('y', 300000) "
                     "WHERE ctid IN (SELECT ctid FROM public.kinds LIMIT 40)")
        conn.execute("DELETE FROM public.kinds WHERE ctid IN (SELECT ctid FROM public.kinds OFFSET 100 LIMIT 30)")
    assert diff("kinds_old", "kinds") == []
    assert bgsync(dsn, "rollback", str(plan)).code == 0
    assert diff("kinds", "kinds_v2") == []
    assert bgsync(dsn, "verify", str(plan)).code == 0
    assert bgsync(dsn, "cutover", str(plan)).code == 0
    assert diff("kinds_old", "kinds") == []
