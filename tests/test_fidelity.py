"""Issue 10: a migration changes what the plan says and nothing else. Everything around the table
follows the live name through cutover and rollback, and `validate` refuses, before anything runs,
a plan that would fail later for a reason it can see."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import errors as pgerrors

from orchestrator import commands
from tests.helpers import ROOT, bgsync, scalar, scalars, text_diff

SHOP = (ROOT / "tests" / "shop_schema.sql").read_text()
SHOP_PLAN: dict[str, Any] = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [
        {"name": "id", "type": "bigint", "not_null": True},
        {"name": "customer_id", "type": "bigint", "not_null": True},
        {"name": "amount", "type": "numeric(12,2)", "not_null": True, "default": "0",
         "from": "amount_cents / 100.0", "reverse": "(amount * 100)::integer", "reverse_column": "amount_cents"},
        {"name": "status", "type": "text", "not_null": True},
        {"name": "note", "type": "text"},
        {"name": "fts", "type": "tsvector"},
        {"name": "tenant", "type": "text", "not_null": True},
        {"name": "updated_at", "type": "timestamptz", "not_null": True},
    ],
    "indexes": [
        {"name": "orders_v2_customer_idx", "definition": "USING btree (customer_id)"},
        {"name": "orders_v2_fts_idx", "definition": "USING gin (fts)"},
        {"name": "orders_v2_open_status_idx",
         "definition": "USING btree (lower(status) text_pattern_ops) INCLUDE (id) WHERE (status <> 'void'::text)"},
    ],
    "checks": [{"name": "orders_amount_nonneg", "expression": "amount >= 0"}],
    "views": [{"name": "public.big_orders",
               "query": "SELECT id, customer_id, (amount * 100)::integer AS amount_cents FROM public.orders "
                        "WHERE amount > 1500"}],
    "backfill": {"workers": 2, "batch_rows": 500},
    "cutover": {"lock_timeout": "500ms", "attempts": 50},
}
BLUE = "SELECT id, customer_id, amount_cents, status, note, fts, tenant, updated_at FROM public.{}"
GREEN = "SELECT id, customer_id, (amount * 100)::integer, status, note, fts, tenant, updated_at FROM public.{}"


def write_plan(tmp_path: Path, plan: dict[str, Any], name: str = "shop.yaml") -> Path:
    file = tmp_path / name
    file.write_text(yaml.safe_dump(plan, sort_keys=False))
    return file


def run_ok(dsn: str, *args: str) -> str:
    result = bgsync(dsn, *args)
    assert result.code == 0, (args, result.out, result.err)
    return result.out


@dataclass
class ShopWriters:
    """Application writers, including child-then-parent transactions (an order item, then the order)."""

    dsn: str
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    deadlocks: int = 0
    longest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, writers: int = 3) -> ShopWriters:
        for n in range(writers):
            thread = threading.Thread(target=self.run, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def run(self, number: int) -> None:
        rng = random.Random(number)
        with psycopg.connect(self.dsn, prepare_threshold=None, application_name=f"shop writer {number}") as conn:
            while not self.stop.is_set():
                kind = rng.choice(["child_then_parent", "child_then_parent", "insert", "update", "delete"])
                row = conn.execute("SELECT id FROM public.orders WHERE id >= %s ORDER BY id LIMIT 1",
                                   [rng.randint(1, 3000)]).fetchone()
                conn.commit()
                if row is None:
                    continue
                order = row[0]
                started = time.perf_counter()
                try:
                    with conn.transaction():
                        if kind == "child_then_parent":
                            # the child first (no lock on the parent yet), then the parent: the order in
                            # which a cutover that locks the parent, then the child, could deadlock it
                            conn.execute("UPDATE public.order_items SET qty = qty + 1 WHERE id = "
                                         "(SELECT min(id) FROM public.order_items)")
                            self.stop.wait(0.02)
                            conn.execute("INSERT INTO public.order_items (order_id, qty) VALUES (%s, 1)", [order])
                            conn.execute("UPDATE public.orders SET note = 'item added' WHERE id = %s", [order])
                        elif kind == "insert":
                            conn.execute("INSERT INTO public.orders (customer_id, status, note) "
                                         "VALUES (%s, 'new', 'w')", [1 + order % 50])
                        elif kind == "update":
                            conn.execute("UPDATE public.orders SET status = 'paid' WHERE id = %s", [order])
                        else:
                            # only an order a writer inserted (it has no items): a child writer never picks one,
                            # so no child insert meets a parent another writer just deleted
                            conn.execute("DELETE FROM public.orders WHERE id = (SELECT max(id) FROM public.orders "
                                         "WHERE note = 'w')")
                    with self.lock:
                        self.counts[kind] += 1
                except pgerrors.DeadlockDetected:
                    with self.lock:
                        self.deadlocks += 1
                except psycopg.Error as error:
                    with self.lock:
                        self.failures.append(f"{kind}: {type(error).__name__}: {error}")
                with self.lock:
                    self.longest = max(self.longest, time.perf_counter() - started)
                self.stop.wait(0.003)


def live_oid(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT 'public.orders'::regclass::oid").fetchone()
    assert row is not None
    return int(row[0])


def check_around_the_table(dsn: str, *, green_live: bool) -> None:
    """Every object around `orders` reads the live table, works, and fires exactly once per write."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        live = live_oid(conn)
        relname = conn.execute("SELECT relname FROM pg_class WHERE oid = %s", [live]).fetchone()
        assert relname == ("orders",)
        # views and the materialized view read the live table
        for view in ("public.big_orders", "public.open_orders", "public.order_counts"):
            reads = conn.execute(
                """SELECT DISTINCT d.refobjid FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                    WHERE d.classid = 'pg_rewrite'::regclass AND r.ev_class = %s::regclass
                      AND d.refobjid IN (SELECT oid FROM pg_class WHERE relname LIKE 'orders%%'
                                            AND relkind IN ('r', 'p', 'v'))""", [view]).fetchall()
            assert reads == [(live,)], (view, reads, live)
        assert conn.execute("SELECT count(*) FROM public.open_order_notes").fetchone()[0] > 0  # type: ignore[index]
        # the view keeps its column default, comment, grants and INSTEAD OF trigger
        assert conn.execute("SELECT obj_description('public.open_orders'::regclass)").fetchone() == (
            "orders that are not closed",)
        assert conn.execute("SELECT col_description('public.open_orders'::regclass, 4)").fetchone() == (
            "the customer's note",)
        assert conn.execute("SELECT has_table_privilege('shop_reader', 'public.open_orders', 'SELECT')"
                            ).fetchone() == (True,)
        assert conn.execute("SELECT reloptions FROM pg_class WHERE oid = 'public.open_orders'::regclass"
                            ).fetchone() == (["security_barrier=true"],)
        inserted = conn.execute("INSERT INTO public.open_orders (customer_id, note) VALUES (1, 'via view') "
                                "RETURNING id, status").fetchone()
        assert inserted is not None and inserted[1] == "new"          # the view's column default
        assert conn.execute("SELECT count(*) FROM public.orders WHERE id = %s", [inserted[0]]).fetchone() == (1,)
        # the AFTER trigger fired exactly once for that write (not also on the other table)
        assert conn.execute("SELECT count(*) FROM public.order_events WHERE order_id = %s",
                            [inserted[0]]).fetchone() == (1,)
        # the BEFORE trigger ran on the live table
        assert conn.execute("SELECT fts IS NOT NULL FROM public.orders WHERE id = %s",
                            [inserted[0]]).fetchone() == (True,)
        # the materialized view: refreshable, indexed, commented, granted
        conn.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY public.order_counts")
        assert conn.execute("SELECT obj_description('public.order_counts'::regclass)").fetchone() == (
            "orders per customer",)
        assert conn.execute("SELECT has_table_privilege('shop_reader', 'public.order_counts', 'SELECT')"
                            ).fetchone() == (True,)
        # functions: the row type is the live table's, the SQL-standard body writes the live table
        assert conn.execute("SELECT prorettype = (SELECT reltype FROM pg_class WHERE oid = %s) FROM pg_proc "
                            "WHERE proname = 'orders_of'", [live]).fetchone() == (True,)
        assert conn.execute("SELECT count(*) > 0 FROM public.orders_of(1)").fetchone() == (True,)
        conn.execute("SELECT public.set_note(%s, 'set by function')", [inserted[0]])
        assert conn.execute("SELECT note FROM public.orders WHERE id = %s", [inserted[0]]).fetchone() == (
            "set by function",)
        assert conn.execute("SELECT has_function_privilege('shop_writer', 'public.set_note(bigint, text)', "
                            "'EXECUTE'), has_function_privilege('shop_reader', 'public.set_note(bigint, text)', "
                            "'EXECUTE')").fetchone() == (True, False)
        assert conn.execute("SELECT obj_description('public.orders_of(bigint)'::regprocedure)").fetchone() == (
            "a customer's orders",)
        # table properties
        props = conn.execute(
            """SELECT obj_description(c.oid, 'pg_class'), c.reloptions, c.relreplident, c.relrowsecurity,
                      (SELECT attstattarget FROM pg_attribute WHERE attrelid = c.oid AND attname = 'note'),
                      (SELECT attstorage FROM pg_attribute WHERE attrelid = c.oid AND attname = 'note'),
                      c.reltuples > 0
                 FROM pg_class c WHERE c.oid = %s""", [live]).fetchone()
        assert props is not None
        assert props[0] == "customer orders"
        assert sorted(props[1]) == ["autovacuum_vacuum_scale_factor=0.05", "fillfactor=90"]
        assert props[2:] == ("f", True, 500, "e", True)
        # RLS still filters
        with conn.transaction():
            conn.execute("SET LOCAL ROLE shop_reader")
            conn.execute("SELECT set_config('shop.tenant', 'b', true)")
            seen = conn.execute("SELECT count(*), count(*) FILTER (WHERE tenant <> 'b') FROM public.orders").fetchone()
        assert seen is not None and seen[0] > 0 and seen[1] == 0
        # publication membership follows the live table
        published = {r[0] for r in conn.execute(
            "SELECT prrelid FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid "
            "WHERE p.pubname = 'shop_pub'")}
        assert live in published and len(published) == 2
        # inbound foreign keys (one from a partitioned table) and the outbound one
        inbound: dict[str, set[int]] = {}
        for child, referenced, valid in conn.execute(
                "SELECT conrelid::regclass::text, confrelid, convalidated FROM pg_constraint WHERE contype = 'f' "
                "AND conparentid = 0 AND conrelid::regclass::text IN ('order_items', 'shipments')"):
            assert valid, (child, referenced)
            inbound.setdefault(child, set()).add(referenced)
        assert all(live in referenced for referenced in inbound.values()) and len(inbound) == 2, (inbound, live)
        assert conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = %s "
                            "AND confrelid = 'public.customers'::regclass AND convalidated", [live]
                            ).fetchone() == (1,)
        # the shared sequence hands out distinct ids to both tables
        ids = [conn.execute("INSERT INTO public.orders (customer_id, status) VALUES (1, 'new') RETURNING id"
                            ).fetchone()[0],   # type: ignore[index]
               conn.execute("INSERT INTO public.legacy_orders (note) VALUES ('x') RETURNING id"
                            ).fetchone()[0]]   # type: ignore[index]
        assert ids[0] != ids[1]
        assert conn.execute("SELECT count(*) FROM public.legacy_orders l JOIN public.orders o USING (id)"
                            ).fetchone() == (0,)
    del green_live


def test_shop_migrates_with_everything_around_the_table(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SHOP)
    plan = write_plan(tmp_path, SHOP_PLAN)
    checked = run_ok(dsn, "validate", str(plan))
    for name in ("big_orders", "open_orders", "open_order_notes", "order_counts", "orders_of", "set_note",
                 "orders_touch", "orders_audit", "orders_tenant", "shop_pub", "order_items", "shipments",
                 "customers", "orders_id_seq"):
        assert name in checked, (name, checked)
    writers = ShopWriters(dsn).start()
    try:
        for command in ("prepare", "backfill", "verify", "cutover"):
            run_ok(dsn, command, str(plan))
        time.sleep(0.3)
        check_around_the_table(dsn, green_live=True)
        assert text_diff(dsn, BLUE.format("orders_old"), GREEN.format("orders")) == []
        run_ok(dsn, "rollback", str(plan))
        time.sleep(0.3)
        check_around_the_table(dsn, green_live=False)
        assert text_diff(dsn, BLUE.format("orders"), GREEN.format("orders_v2")) == []
        for command in ("verify", "cutover"):
            run_ok(dsn, command, str(plan))
        time.sleep(0.3)
        check_around_the_table(dsn, green_live=True)
    finally:
        writers.finish()
    assert text_diff(dsn, BLUE.format("orders_old"), GREEN.format("orders")) == []
    run_ok(dsn, "finalize", str(plan), "--yes")
    assert scalar(dsn, "SELECT to_regclass('public.orders_old')") is None
    assert scalar(dsn, "SELECT count(*) FROM pg_class WHERE relname LIKE '%%bgsync%%'") == 0
    # the twins took over the inbound foreign keys' names, and nothing else references the live table
    assert scalars(dsn, "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conparentid = 0 "
                        "AND confrelid = 'public.orders'::regclass ORDER BY 1") == [
        "order_items_order_id_fkey", "shipments_order_id_fkey"]
    check_around_the_table(dsn, green_live=True)
    assert writers.failures == [], writers.failures[:5]
    assert writers.deadlocks == 0
    assert writers.counts["child_then_parent"] > 10, writers.counts


# -- validate refuses what it can see -------------------------------------------------------------------
RENAMED = """
CREATE TABLE public.orders (id bigint PRIMARY KEY, amount_cents integer NOT NULL, note text);
INSERT INTO public.orders SELECT g, g * 100, 'n' || g FROM generate_series(1, 200) g;
"""
RENAME_PLAN: dict[str, Any] = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "amount", "type": "numeric(12,2)", "not_null": True, "from": "amount_cents / 100.0",
                 "reverse": "(amount * 100)::integer", "reverse_column": "amount_cents"},
                {"name": "note", "type": "text"}],
}


def _validate(dsn: str, tmp_path: Path, plan: dict[str, Any]) -> tuple[int, str]:
    result = bgsync(dsn, "validate", str(write_plan(tmp_path, plan, "case.yaml")))
    return result.code, result.out + result.err


@pytest.mark.parametrize("kind", ["view", "materialized view"])
def test_a_view_reading_a_renamed_column_needs_its_new_query_in_the_plan(dsn: str, tmp_path: Path, kind: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RENAMED)
        conn.execute(f"CREATE {kind.upper()} public.rich AS SELECT id, amount_cents FROM public.orders "
                     "WHERE amount_cents > 15000")
    code, text = _validate(dsn, tmp_path, RENAME_PLAN)
    assert code == 2, text
    assert "public.rich" in text and "amount_cents" in text and "views" in text
    fixed = {**RENAME_PLAN, "views": [{"name": "public.rich", "query":
                                       "SELECT id, (amount * 100)::integer AS amount_cents FROM public.orders "
                                       "WHERE amount > 150"}]}
    code, text = _validate(dsn, tmp_path, fixed)
    assert code == 0, text
    plan = write_plan(tmp_path, fixed, "fixed.yaml")
    for command in ("prepare", "backfill", "verify", "cutover"):
        run_ok(dsn, command, str(plan))
    assert scalar(dsn, "SELECT count(*) FROM public.rich") == 50
    run_ok(dsn, "rollback", str(plan))
    assert scalar(dsn, "SELECT count(*) FROM public.rich") == 50
    # rollback restores the original definition
    assert "amount_cents > 15000" in str(scalar(dsn, "SELECT pg_get_viewdef('public.rich'::regclass)"))


def test_functions_follow_the_live_table_or_are_refused_with_the_reason(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RENAMED)
        conn.execute("CREATE FUNCTION public.all_orders() RETURNS SETOF public.orders LANGUAGE sql STABLE "
                     "AS $$ SELECT * FROM public.orders $$")
        conn.execute("CREATE FUNCTION public.touch(o bigint) RETURNS void LANGUAGE sql "
                     "BEGIN ATOMIC UPDATE public.orders SET note = 'touched' WHERE id = o; END")
        conn.execute("CREATE FUNCTION public.cents(o bigint) RETURNS integer LANGUAGE sql STABLE "
                     "BEGIN ATOMIC SELECT amount_cents FROM public.orders WHERE id = o; END")
    code, text = _validate(dsn, tmp_path, RENAME_PLAN)
    assert code == 2, text
    assert "public.cents(bigint)" in text and "amount_cents" in text
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP FUNCTION public.cents(bigint)")
    code, text = _validate(dsn, tmp_path, RENAME_PLAN)
    assert code == 0, text
    assert "public.all_orders()" in text and "public.touch(bigint)" in text
    plan = write_plan(tmp_path, RENAME_PLAN, "ok.yaml")
    for command in ("prepare", "backfill", "verify", "cutover"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT public.touch(7)")
        assert conn.execute("SELECT note FROM public.orders WHERE id = 7").fetchone() == ("touched",)
        assert conn.execute("SELECT note FROM public.orders_old WHERE id = 7").fetchone() == ("touched",)
        assert conn.execute("SELECT count(*), min(amount) FROM public.all_orders()").fetchone() == (200, 1)
    run_ok(dsn, "finalize", str(plan), "--yes")      # nothing depends on the retired table any more
    assert scalar(dsn, "SELECT count(*) FROM public.all_orders()") == 200


def test_a_policy_reading_a_renamed_column_is_refused(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(RENAMED)
        conn.execute("ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY")
        conn.execute("CREATE POLICY small ON public.orders USING (amount_cents < 10000)")
    code, text = _validate(dsn, tmp_path, RENAME_PLAN)
    assert code == 2, text
    assert "policy small" in text and "amount_cents" in text


# -- init reproduces every index ----------------------------------------------------------------------------
INDEXED = """
CREATE TABLE public.docs (id int PRIMARY KEY, title text NOT NULL, body text, tags text[], fts tsvector,
                          code text COLLATE "C", score numeric, at timestamptz);
CREATE INDEX docs_fts ON public.docs USING gist (fts);
CREATE INDEX docs_tags ON public.docs USING gin (tags);
CREATE INDEX docs_title_lower ON public.docs (lower(title) text_pattern_ops DESC NULLS LAST) INCLUDE (id);
CREATE INDEX docs_code ON public.docs (code COLLATE "POSIX" varchar_pattern_ops);
CREATE UNIQUE INDEX docs_title_unique ON public.docs (title) NULLS NOT DISTINCT WHERE score > 0;
CREATE INDEX docs_at_hash ON public.docs USING hash (at);
CREATE INDEX docs_brin ON public.docs USING brin (at) WITH (pages_per_range = 16);
INSERT INTO public.docs SELECT g, 't' || g, 'b', ARRAY['x' || g % 5], to_tsvector('simple', 'w' || g), 'c' || g,
                               g % 3, now() FROM generate_series(1, 500) g;
"""


def test_init_reproduces_every_index_exactly(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(INDEXED)
    plan = tmp_path / "docs.yaml"
    run_ok(dsn, "init", "public.docs", "-o", str(plan))
    assert "definition:" in plan.read_text()
    for command in ("prepare", "backfill"):
        run_ok(dsn, command, str(plan))

    def definitions(table: str) -> list[str]:
        return sorted(str(d).split(" USING ", 1)[1] for d in scalars(
            dsn, "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass", [table]))

    assert definitions("public.docs_v2") == definitions("public.docs")


# -- locks: the application is never the deadlock victim; finalize does not hold the live table ----------
FLIP = """
CREATE TABLE public.customers (id bigint PRIMARY KEY);
CREATE TABLE public.orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES public.customers (id),
                            status text NOT NULL DEFAULT 'new', note text);
CREATE SEQUENCE public.orders_id_seq OWNED BY public.orders.id START 5000;
ALTER TABLE public.orders ALTER COLUMN id SET DEFAULT nextval('public.orders_id_seq');
CREATE TABLE public.order_items (id bigserial PRIMARY KEY, qty int NOT NULL,
                                 order_id bigint NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE);
INSERT INTO public.customers SELECT g FROM generate_series(1, 50) g;
INSERT INTO public.orders SELECT g, 1 + g % 50, 'new', 'n' FROM generate_series(1, 3000) g;
INSERT INTO public.order_items (order_id, qty) SELECT g, 1 FROM generate_series(1, 3000, 7) g;
"""
FLIP_PLAN: dict[str, Any] = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "customer_id", "type": "bigint", "not_null": True},
                {"name": "status", "type": "text", "not_null": True}, {"name": "note", "type": "text"}],
    "cutover": {"lock_timeout": "2s", "attempts": 50},
}


def test_twenty_flips_never_abort_an_application_transaction(dsn: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FLIP)
    plan = write_plan(tmp_path, FLIP_PLAN, "flip.yaml")
    options = commands.Options(dsn=dsn)
    for command in ("prepare", "backfill"):
        run_ok(dsn, command, str(plan))
    writers = ShopWriters(dsn).start(writers=4)
    try:
        # at least 10 cutovers and 10 rollbacks, and on until the writers have crossed them with more than 50
        # child-then-parent transactions (a fast machine flips 10 times before the writers did that many)
        flips = 0
        while flips < 10 or (writers.counts["child_then_parent"] <= 50 and flips < 40):
            commands.verify(options, plan, as_json=True)
            commands.cutover(options, plan)
            commands.rollback(options, plan)
            flips += 1
    finally:
        writers.finish()
    assert writers.failures == [], writers.failures[:5]
    assert writers.counts["child_then_parent"] > 50, writers.counts
    assert writers.deadlocks == 0, f"{writers.deadlocks} application transactions were deadlock victims"
    with capsys.disabled():
        print(f"\n[{2 * flips} flips] longest application transaction:"
              f" {writers.longest * 1000:.0f} ms; {writers.counts}")


def test_finalize_drops_the_retired_table_without_holding_the_live_one(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FLIP)
    plan = write_plan(tmp_path, {**FLIP_PLAN, "cutover": {"lock_timeout": "5s", "attempts": 3}}, "fin.yaml")
    for command in ("prepare", "backfill", "verify", "cutover"):
        run_ok(dsn, command, str(plan))
    from tests.helpers import spawn_bgsync, wait_for

    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT count(*) FROM public.orders_old")       # ACCESS SHARE on the retired table
        proc = spawn_bgsync(dsn, "finalize", str(plan), "--yes")
        wait_for(lambda: bool(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                          "LIKE 'bgsync finalize%%' AND wait_event_type = 'Lock'")))
        # finalize waits for the retired table; the live table is free for the application meanwhile
        with psycopg.connect(dsn, autocommit=True) as app:
            app.execute("SET lock_timeout = '3s'")
            app.execute("UPDATE public.orders SET note = 'during finalize' WHERE id = 1")
            app.execute("INSERT INTO public.orders VALUES (90001, 1, 'new', 'during finalize')")
        holder.rollback()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert scalar(dsn, "SELECT to_regclass('public.orders_old')") is None
    assert scalar(dsn, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.orders'::regclass "
                       "AND tgname LIKE 'bgsync%%'") == 0
