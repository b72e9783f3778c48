"""A mixed writer workload on a blue table: inserts, updates, deletes, key updates, multi-row
statements and rolled-back transactions, from several threads each on its own connection.
The demo, the benchmark and the tests use it to keep an application writing."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors as pgerrors

RETRIED = (pgerrors.DeadlockDetected, pgerrors.SerializationFailure, pgerrors.LockNotAvailable)


@dataclass(frozen=True)
class TableOps:
    """SQL for each kind of write; `%(k)s` is an existing key picked at random."""

    pick_key: str
    insert: str
    insert_many: str
    update: str
    update_many: str
    delete: str
    key_update: str
    copy: str = ""               # COPY ... FROM STDIN of `copy_rows` rows (empty: no COPY writes)
    copy_rows: tuple[tuple[object, ...], ...] = ()


ORDERS = TableOps(
    pick_key="SELECT id FROM public.orders WHERE id >= %(r)s ORDER BY id LIMIT 1",
    insert="INSERT INTO public.orders (customer_id, amount, state, note) "
           "VALUES (%(r)s %% 997, %(r)s %% 5000, 'new', 'w')",
    insert_many="""INSERT INTO public.orders (customer_id, amount, state, note)
                   SELECT g, g * 3, 'paid', NULL FROM generate_series(1, 5) g""",
    update="UPDATE public.orders SET amount = amount + 1, state = 'paid', note = 'u' || %(r)s WHERE id = %(k)s",
    update_many="UPDATE public.orders SET note = NULL, amount = amount + 2 WHERE id BETWEEN %(k)s AND %(k)s + 5",
    delete="DELETE FROM public.orders WHERE id = %(k)s",
    key_update="UPDATE public.orders SET id = nextval('public.orders_id_seq') WHERE id = %(k)s",
    copy="COPY public.orders (customer_id, amount, state, note) FROM STDIN",
    copy_rows=((1, 10, "copied", None), (2, 20, "copied", "tab\there"), (3, 30, "copied", "")),
)

def unqualified(ops: TableOps) -> TableOps:
    """The same writes naming the table without its schema: an application release that finds its shape
    on the search_path (a version schema of `expose`)."""
    fields: dict[str, Any] = {name: value.replace("public.orders ", "orders ") if isinstance(value, str) else value
                              for name, value in vars(ops).items()}
    return TableOps(**{**fields, "copy": ""})    # PostgreSQL refuses COPY into a view


SESSIONS = TableOps(
    pick_key="SELECT token FROM public.sessions WHERE token >= md5(%(r)s::text)::uuid ORDER BY token LIMIT 1",
    insert="INSERT INTO public.sessions (token, account_id, payload) VALUES (gen_random_uuid(), %(r)s, '{\"w\": 1}')",
    insert_many="""INSERT INTO public.sessions (token, account_id, payload)
                   SELECT gen_random_uuid(), g, NULL FROM generate_series(1, 5) g""",
    update="UPDATE public.sessions SET account_id = account_id + 1, payload = '{\"u\": 2}' WHERE token = %(k)s",
    update_many="""UPDATE public.sessions SET payload = NULL
                   WHERE token IN (SELECT token FROM public.sessions WHERE token >= %(k)s ORDER BY token LIMIT 5)""",
    delete="DELETE FROM public.sessions WHERE token = %(k)s",
    key_update="UPDATE public.sessions SET token = gen_random_uuid() WHERE token = %(k)s",
)

ACCOUNTS = TableOps(
    pick_key="SELECT id FROM public.accounts WHERE id >= %(r)s ORDER BY id LIMIT 1",
    insert="INSERT INTO public.accounts (email, name) VALUES (gen_random_uuid() || '@example.com', 'w' || %(r)s)",
    insert_many="""INSERT INTO public.accounts (email, name)
                   SELECT gen_random_uuid() || '@example.com', NULL FROM generate_series(1, 5) g""",
    update="UPDATE public.accounts SET name = 'u' || %(r)s, email = email || '.u' WHERE id = %(k)s",
    update_many="UPDATE public.accounts SET name = NULL WHERE id BETWEEN %(k)s AND %(k)s + 5",
    delete="DELETE FROM public.accounts WHERE id = %(k)s",
    key_update="UPDATE public.accounts SET id = DEFAULT WHERE id = %(k)s",
)


@dataclass
class Workload:
    dsn: str
    ops: TableOps
    writers: int = 4
    key_space: int = 100_000
    pause: float = 0.002
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    retried: int = 0
    longest_stall: float = 0.0
    options: str = ""            # libpq options of each writer's connection, e.g. "-c search_path=app_v1,public"
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Workload:
        for i in range(self.writers):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, number: int) -> None:
        rng = random.Random(number)
        with psycopg.connect(self.dsn, application_name=f"test writer {number}", options=self.options) as conn:
            while not self.stop.is_set():
                kind = rng.choice(["insert", "insert_many", "update", "update_many", "delete", "key_update",
                                   "rollback", "update", "insert", *(["copy"] if self.ops.copy else [])])
                params: dict[str, object] = {"r": rng.randrange(1, self.key_space)}
                started = time.perf_counter()
                try:
                    with conn.transaction():
                        row = conn.execute(self.ops.pick_key, params).fetchone()
                        if row is None and kind not in ("insert", "insert_many"):
                            continue
                        params["k"] = row[0] if row else None
                        if kind == "copy":
                            with conn.cursor().copy(self.ops.copy) as copy:
                                for values in self.ops.copy_rows:
                                    copy.write_row(values)
                        elif kind == "rollback":
                            conn.execute(self.ops.update, params)
                            conn.execute(self.ops.insert, params)
                            conn.execute(self.ops.delete, params)
                            raise _Rollback
                        else:
                            conn.execute(getattr(self.ops, kind), params)
                    with self._lock:
                        self.counts[kind] += 1
                except _Rollback:
                    with self._lock:
                        self.counts["rollback"] += 1
                except RETRIED:
                    with self._lock:
                        self.retried += 1
                except pgerrors.FeatureNotSupported as error:
                    # A cutover that changes a column's type invalidates server-side prepared statements
                    # once per session; drivers re-prepare on retry, as this one does.
                    if "cached plan must not change result type" not in str(error):
                        raise
                    with self._lock:
                        self.retried += 1
                except psycopg.Error as error:
                    with self._lock:
                        self.errors.append(f"{kind}: {type(error).__name__}: {error}")
                stall = time.perf_counter() - started
                if stall > self.longest_stall:
                    with self._lock:
                        self.longest_stall = max(self.longest_stall, stall)
                time.sleep(self.pause)


class _Rollback(Exception):
    pass


def load_sample_schema(dsn: str) -> None:
    """The sample blue tables (orders, accounts, sessions) the example plans change."""
    from orchestrator.render import TEMPLATE_DIR

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((TEMPLATE_DIR / "sample_schema.sql").read_text())


def seed_sample(dsn: str, orders: int = 0, accounts: int = 0, sessions: int = 0) -> None:
    """Realistic-looking rows: NULLs, several states, a spread of timestamps."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if orders:
            conn.execute(
                """INSERT INTO orders (customer_id, amount, state, note, created_at)
                   SELECT g %% 9973, g %% 5000, (ARRAY['new','paid','void','shipped'])[1 + g %% 4],
                          CASE WHEN g %% 3 = 0 THEN NULL ELSE 'note ' || g END,
                          timestamptz '2024-01-01' + g * interval '1 second'
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
        conn.execute("VACUUM ANALYZE")
