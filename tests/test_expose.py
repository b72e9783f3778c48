"""Issue 11: two releases of the application side by side. `expose` turns on both directions of sync
and creates a schema per release with a writable view of its shape under the live name; an old-release
writer (versions.blue) and a new-release writer (versions.green) run at once through expose, cutover,
rollback, expose and cutover again, and finalize, and lose nothing."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import errors as pgerrors

from orchestrator import commands
from tests.helpers import bgsync, scalar, scalars, text_diff

SHOP = """
DO $$ BEGIN CREATE ROLE shop_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE public.orders (
    id           bigserial PRIMARY KEY,
    customer_id  bigint NOT NULL,
    amount_cents integer NOT NULL DEFAULT 0,
    note         text,
    kind         text NOT NULL DEFAULT 'order',
    touched      integer NOT NULL DEFAULT 0
);
GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO shop_app;
GRANT USAGE ON SEQUENCE public.orders_id_seq TO shop_app;
INSERT INTO public.orders (customer_id, amount_cents, note)
SELECT g % 40, g * 10, 'n' || g FROM generate_series(1, 3000) g;
"""
PLAN: dict[str, Any] = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "customer_id", "type": "bigint", "not_null": True},
                {"name": "amount", "type": "numeric(12,2)", "not_null": True, "default": "0",
                 "from": "amount_cents / 100.0",
                 "reverse": "(amount * 100)::integer", "reverse_column": "amount_cents"},
                {"name": "note", "type": "text"},
                {"name": "kind", "type": "text", "not_null": True},
                {"name": "touched", "type": "integer", "not_null": True}],
    "versions": {"blue": "app_v1", "green": "app_v2"},
    "backfill": {"workers": 2, "batch_rows": 500},
    "cutover": {"lock_timeout": "1s", "attempts": 30},
}
BLUE = "SELECT id, customer_id, amount_cents, note, kind, touched FROM public.{}"
GREEN = "SELECT id, customer_id, (amount * 100)::integer, note, kind, touched FROM public.{}"
RETRIED = (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)


def write_plan(tmp_path: Path, plan: dict[str, Any] = PLAN) -> Path:
    file = tmp_path / "plan.yaml"
    file.write_text(yaml.safe_dump(plan, sort_keys=False))
    return file


def run_ok(dsn: str, *args: str) -> str:
    result = bgsync(dsn, *args)
    assert result.code == 0, (args, result.out, result.err)
    return result.out


@dataclass
class Release:
    """An application release writing through its version schema, each keeping a model of the rows it
    committed (its own keys only): at the end the live table must hold exactly that."""

    dsn: str
    schema: str
    amount_column: str           # amount_cents (old shape) or amount (new shape)
    seed: int
    stop: threading.Event = field(default_factory=threading.Event)
    model: dict[int, int] = field(default_factory=dict)     # id -> amount in cents, as committed
    counts: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def value(self, cents: int) -> str:
        return str(cents) if self.amount_column == "amount_cents" else f"{cents / 100:.2f}"

    def start(self) -> Release:
        self.stop.clear()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)

    def run(self) -> None:
        rng = random.Random(self.seed)
        amount = self.amount_column
        with psycopg.connect(self.dsn, prepare_threshold=None, autocommit=True,
                             options=f"-c search_path={self.schema},public") as conn:
            while not self.stop.is_set():
                kind = rng.choice(["insert", "insert", "update", "rekey", "delete", "upsert"])
                mine = list(self.model)
                key = rng.choice(mine) if mine else None
                cents = rng.randint(0, 10**6)
                try:
                    with conn.transaction():
                        if kind == "insert" or key is None:
                            kind = "insert"
                            row = conn.execute(f"INSERT INTO orders (customer_id, {amount}, note) "
                                               f"VALUES (1, {self.value(cents)}, %s) RETURNING id",
                                               [self.schema]).fetchone()
                            assert row is not None
                            change = {int(row[0]): cents}
                            gone: list[int] = []
                        elif kind == "update":
                            conn.execute(f"UPDATE orders SET {amount} = {self.value(cents)} WHERE id = %s", [key])
                            change, gone = {key: cents}, []
                        elif kind == "rekey":
                            row = conn.execute("UPDATE orders SET id = nextval('public.orders_id_seq') WHERE id = %s "
                                               "RETURNING id", [key]).fetchone()
                            assert row is not None
                            change, gone = {int(row[0]): self.model[key]}, [key]
                        elif kind == "delete":
                            conn.execute("DELETE FROM orders WHERE id = %s", [key])
                            change, gone = {}, [key]
                        else:
                            conn.execute(f"INSERT INTO orders (id, customer_id, {amount}) VALUES (%s, 2, "
                                         f"{self.value(cents)}) ON CONFLICT (id) DO UPDATE SET "
                                         f"{amount} = EXCLUDED.{amount}", [key])
                            change, gone = {key: cents}, []
                    for old in gone:
                        self.model.pop(old, None)
                    self.model.update(change)
                    self.counts[kind] += 1
                except RETRIED as error:
                    self.retried[type(error).__name__] += 1
                except psycopg.Error as error:
                    self.errors.append(f"{kind}: {type(error).__name__}: {error}")
                self.stop.wait(0.003)


def in_sync(dsn: str, blue: str, green: str) -> None:
    assert text_diff(dsn, BLUE.format(blue), GREEN.format(green)) == [], (blue, green)


def check_models(dsn: str, *releases: Release) -> None:
    live = {int(k): int(v) for k, v in psycopg.connect(dsn).execute(
        "SELECT id, (amount * 100)::integer FROM public.orders").fetchall()}
    for release in releases:
        wrong = {k: (v, live.get(k)) for k, v in release.model.items() if live.get(k) != v}
        assert not wrong, (release.schema, list(wrong.items())[:5])


def test_old_and_new_release_write_side_by_side_through_every_phase(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SHOP)
    plan = write_plan(tmp_path)
    checked = run_ok(dsn, "validate", str(plan))
    assert "app_v1" in checked and "amount_cents" in checked     # old names: the old release needs versions.blue
    for command in ("prepare", "backfill", "verify", "expose"):
        run_ok(dsn, command, str(plan))
    # each version schema shows its shape under the live name, with the table's owner and grants
    assert scalars(dsn, "SELECT attname FROM pg_attribute WHERE attrelid = 'app_v1.orders'::regclass AND attnum > 0 "
                        "ORDER BY attnum") == ["id", "customer_id", "amount_cents", "note", "kind", "touched"]
    assert scalars(dsn, "SELECT attname FROM pg_attribute WHERE attrelid = 'app_v2.orders'::regclass AND attnum > 0 "
                        "ORDER BY attnum") == ["id", "customer_id", "amount", "note", "kind", "touched"]
    assert scalar(dsn, "SELECT has_table_privilege('shop_app', 'app_v2.orders', 'INSERT')") is True
    status = json.loads(run_ok(dsn, "status", "--json"))
    assert status["migrations"][0]["phase"] == "exposed"
    old = Release(dsn, "app_v1", "amount_cents", 1).start()
    new = Release(dsn, "app_v2", "amount", 2).start()
    try:
        old.stop.wait(0.5)
        in_sync(dsn, "orders", "orders_v2")
        run_ok(dsn, "cutover", str(plan))
        old.stop.wait(0.5)
        in_sync(dsn, "orders_old", "orders")
    finally:
        old.finish()
        new.finish()
    in_sync(dsn, "orders_old", "orders")
    check_models(dsn, old, new)
    run_ok(dsn, "rollback", str(plan))
    assert scalar(dsn, "SELECT to_regnamespace('app_v1')") is None
    in_sync(dsn, "orders", "orders_v2")
    for command in ("verify", "expose"):
        run_ok(dsn, command, str(plan))
    old.start()
    new.start()
    try:
        old.stop.wait(0.4)
        run_ok(dsn, "cutover", str(plan))
        old.stop.wait(0.4)
    finally:
        old.finish()
        new.finish()
    in_sync(dsn, "orders_old", "orders")
    check_models(dsn, old, new)
    run_ok(dsn, "finalize", str(plan), "--yes")
    assert scalar(dsn, "SELECT to_regnamespace('app_v1')") is None
    assert scalar(dsn, "SELECT to_regclass('public.orders_old')") is None
    # the new release's view now reads the live table, and still takes writes
    new.start()
    new.stop.wait(0.3)
    new.finish()
    check_models(dsn, old, new)
    for release in (old, new):
        assert release.errors == [], release.errors[:5]
        for kind in ("insert", "update", "rekey", "delete", "upsert"):
            assert release.counts[kind] > 0, (release.schema, release.counts)
    print(f"[two releases] old: {dict(old.counts)} retried {dict(old.retried)}; "
          f"new: {dict(new.counts)} retried {dict(new.retried)}")


TRIGGERS = """
CREATE FUNCTION public.orders_fee() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.kind = 'order' THEN
        -- written for either shape: it names no column the plan renames
        INSERT INTO public.orders (customer_id, note, kind) VALUES (NEW.customer_id, NEW.id, 'fee');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER orders_fee AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION public.orders_fee();
CREATE FUNCTION public.orders_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.touched := coalesce(NEW.touched, 0) + 1;
    RETURN NEW;
END $$;
CREATE TRIGGER orders_touch BEFORE INSERT OR UPDATE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION public.orders_touch();
"""


@pytest.mark.parametrize("after_cutover", [False, True], ids=["before-cutover", "after-cutover"])
def test_user_trigger_writes_are_mirrored_once(dsn: str, tmp_path: Path, after_cutover: bool) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SHOP)
        conn.execute(TRIGGERS)
    plan = write_plan(tmp_path)
    for command in ("prepare", "backfill", "verify", "expose", *(["cutover"] if after_cutover else [])):
        run_ok(dsn, command, str(plan))
    blue, green = ("orders_old", "orders") if after_cutover else ("orders", "orders_v2")
    for schema, amount in (("app_v1", "amount_cents"), ("app_v2", "amount")):
        with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema},public") as conn:
            row = conn.execute(f"INSERT INTO orders (customer_id, {amount}, note) VALUES (7, 5, %s) RETURNING id",
                               [schema]).fetchone()
            assert row is not None
            conn.execute("UPDATE orders SET note = note || '!' WHERE id = %s", [row[0]])
        # one order and one fee row on each side, not zero and not more; the BEFORE trigger's value too
        for table in (blue, green):
            assert scalars(dsn, f"SELECT kind || ':' || touched FROM public.{table} WHERE id = %s "
                                f"OR note = %s ORDER BY kind", [row[0], str(row[0])]) == ["fee:1", "order:2"], table
        in_sync(dsn, blue, green)


COMMITS_PER_WRITER = 15


def test_one_key_changed_through_both_shapes_never_diverges(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SHOP)
    plan = write_plan(tmp_path)
    for command in ("prepare", "backfill", "verify", "expose"):
        run_ok(dsn, command, str(plan))
    stop = threading.Event()
    counting = threading.Lock()
    outcome: Counter[str] = Counter()
    failures: list[str] = []

    def hammer(schema: str, amount: str, seed: int) -> None:
        # a fixed number of commits per writer, not a time window: deadlock detection waits
        # deadlock_timeout (1 s) per cycle, so a loaded machine commits little in any fixed time
        rng = random.Random(seed)
        committed = 0
        with psycopg.connect(dsn, autocommit=True, options=f"-c search_path={schema},public") as conn:
            while committed < COMMITS_PER_WRITER and not stop.is_set():
                keys = sorted(rng.sample(range(1, 30), 3), reverse=seed % 2 == 0)
                try:
                    with conn.transaction():
                        for key in keys:
                            conn.execute(f"UPDATE orders SET {amount} = {amount} + 1, note = %s WHERE id = %s",
                                         [schema, key])
                    committed += 1
                    with counting:
                        outcome["committed"] += 1
                except RETRIED as error:
                    with counting:
                        outcome[type(error).__name__] += 1
                except psycopg.Error as error:
                    failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=hammer, args=(s, a, i), daemon=True)
               for i, (s, a) in enumerate([("app_v1", "amount_cents"), ("app_v2", "amount")] * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop.set()
    assert failures == [], failures[:5]
    assert outcome["committed"] == COMMITS_PER_WRITER * len(threads), outcome
    in_sync(dsn, "orders", "orders_v2")
    print(f"[same keys, both shapes] {dict(outcome)}")


def test_expose_needs_a_passing_verify_and_run_goes_through_it(dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SHOP)
    plan = write_plan(tmp_path)
    run_ok(dsn, "prepare", str(plan))
    refused = bgsync(dsn, "expose", str(plan))
    assert refused.code == 1 and "verify" in refused.err, refused.err
    printed = run_ok(dsn, "sql", str(plan), "--phase", "expose")
    assert "CREATE VIEW" in printed and '"app_v1"."orders"' in printed
    run_ok(dsn, "run", str(plan), "--through", "expose")
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "exposed"
    again = bgsync(dsn, "expose", str(plan))
    assert again.code == 0 and "already" in again.err
    options = commands.Options(dsn=dsn)
    commands.rollback(options, plan)
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "reverted"
    assert scalar(dsn, "SELECT to_regnamespace('app_v2')") is None
