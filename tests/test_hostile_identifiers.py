"""Identifiers with quotes, semicolons, mixed case, unicode and reserved words work end to end
when they are real names, and cannot inject SQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import yaml

from tests.helpers import bgsync, parity_diff

SCHEMA = 'Sch"ema; DROP TABLE public.canary; --'
TABLE = "Ördërs; DROP TABLE public.canary"
SETUP = '''
CREATE TABLE public.canary (x int);
CREATE SCHEMA "Sch""ema; DROP TABLE public.canary; --";
CREATE TABLE "Sch""ema; DROP TABLE public.canary; --"."Ördërs; DROP TABLE public.canary" (
    "select"      integer PRIMARY KEY,
    "Mixed Case"  text NOT NULL,
    "a""b"        numeric,
    "ünï; --"     text
);
INSERT INTO "Sch""ema; DROP TABLE public.canary; --"."Ördërs; DROP TABLE public.canary"
SELECT g, 'v' || g, g / 3.0, CASE WHEN g % 2 = 0 THEN 'ü' || g END FROM generate_series(1, 5000) g;
'''


def test_hostile_names_end_to_end(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SETUP)
    quoted_schema = '"' + SCHEMA.replace('"', '""') + '"'
    plan = {
        "name": "hostile_v2",
        "source": f'{quoted_schema}."{TABLE}"',
        "target": f'{quoted_schema}."Grëen ""v2""; DROP TABLE public.canary"',
        "columns": [
            {"name": "select", "type": "bigint", "not_null": True},
            {"name": "Mixed Case", "type": "varchar(20)", "not_null": True},
            {"name": "from", "type": "numeric(10,2)", "from": '"a""b"', "reverse": '"from"'},
            {"name": "ünï; --", "type": "text"},
        ],
        "indexes": [{"columns": ["Mixed Case"], "name": 'ix "mc"; DROP TABLE public.canary'}],
        "checks": [{"name": 'ck "x"', "expression": '"select" > 0'}],
        "cutover": {"retired_name": 'old"; DROP TABLE public.canary'},
    }
    file = tmp_path / "hostile.yaml"
    file.write_text(yaml.safe_dump(plan, allow_unicode=True))
    for command in ("validate", "prepare", "backfill"):
        result = bgsync(dsn, command, str(file))
        assert result.code == 0, (command, result.err)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'UPDATE {quoted_schema}."{TABLE}" SET "a""b" = 1.5 WHERE "select" <= 10')
        conn.execute(f'DELETE FROM {quoted_schema}."{TABLE}" WHERE "select" BETWEEN 20 AND 30')
        assert conn.execute("SELECT to_regclass('public.canary')").fetchone() != (None,)
        index = conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s",
                             ['ix "mc"; DROP TABLE public.canary']).fetchone()
        assert index == (1,)
    green = f'{quoted_schema}."Grëen ""v2""; DROP TABLE public.canary"'
    blue_sql = (f'SELECT "select"::bigint, "Mixed Case"::varchar(20), "a""b"::numeric(10,2), "ünï; --" '
                f'FROM {quoted_schema}."{TABLE}"')
    green_sql = f'SELECT "select", "Mixed Case", "from", "ünï; --" FROM {green}'
    assert parity_diff(dsn, blue_sql, green_sql) == []
    # ... and through the rest of the lifecycle: the names stay names, the canary lives.
    retired = f'{quoted_schema}."old""; DROP TABLE public.canary"'
    live = f'{quoted_schema}."{TABLE}"'
    green_after = (f'SELECT "select", "Mixed Case", "from", "ünï; --" FROM {live}')
    blue_after = (f'SELECT "select"::bigint, "Mixed Case"::varchar(20), "a""b"::numeric(10,2), "ünï; --" '
                  f'FROM {retired}')
    for command in ("verify", "cutover"):
        result = bgsync(dsn, command, str(file))
        assert result.code == 0, (command, result.err)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'INSERT INTO {live} ("select", "Mixed Case", "from") VALUES (900001, \'new\', 2.5)')
        conn.execute(f'DELETE FROM {live} WHERE "select" = 40')
    assert parity_diff(dsn, blue_after, green_after) == []
    for command in ("rollback", "verify", "cutover"):
        result = bgsync(dsn, command, str(file))
        assert result.code == 0, (command, result.err)
    assert parity_diff(dsn, blue_after, green_after) == []
    assert bgsync(dsn, "finalize", str(file), "--yes").code == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('public.canary')").fetchone() != (None,)
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s",
                            ['old"; DROP TABLE public.canary']).fetchone() == (0,)
