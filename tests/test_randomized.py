"""Issue 8, randomized: writers at every isolation level, holding snapshots across backfill batches,
with statements that fire several events on one key (data-modifying CTEs, MERGE, INSERT ... ON
CONFLICT, key swaps) and rolled-back transactions, run through prepare, backfill, verify, cutover,
reverse writes and rollback. An independent two-way text EXCEPT ALL decides parity; verify must agree
with it, also when defects are planted directly in green.

CI runs BGSYNC_SEEDS seeds (default 20); run more on demand: BGSYNC_SEEDS=200 pytest tests/test_randomized.py
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import errors as pgerrors

from orchestrator import commands
from orchestrator.errors import ParityMismatch
from tests.helpers import scalar, scalars, text_diff

SEEDS = int(os.environ.get("BGSYNC_SEEDS", "20"))
ROWS = 4000
PROTECTED = 100        # ids 1..PROTECTED are never written by the writers: defects are planted there
SCHEMA = f"""
CREATE TABLE public.acct (id int PRIMARY KEY, v int NOT NULL, amount numeric, ratio float8, span interval,
                          note text);
INSERT INTO public.acct
SELECT g, g, g / 2.0, CASE WHEN g % 7 = 0 THEN 0 ELSE g / 3.0 END, interval '1 day' * (g % 5), 'n' || g
  FROM generate_series(1, {ROWS}) g;
ANALYZE public.acct;
"""
PLAN = {
    "name": "acct_v2", "source": "public.acct",
    "columns": [{"name": "id", "type": "bigint", "not_null": True}, {"name": "v", "type": "bigint", "not_null": True},
                {"name": "amount", "type": "numeric"}, {"name": "ratio", "type": "float8"},
                {"name": "span", "type": "interval"}, {"name": "note", "type": "text"}],
    "backfill": {"workers": 2, "batch_rows": 250},
    "verify": {"workers": 2, "snapshot_wait": "2min"},
    "cutover": {"lock_timeout": "1s", "attempts": 30},
}
BLUE = "SELECT id::bigint, v::bigint, amount, ratio, span, note FROM public.{}"
GREEN = "SELECT id, v, amount, ratio, span, note FROM public.{}"
ISOLATION = [psycopg.IsolationLevel.READ_COMMITTED, psycopg.IsolationLevel.REPEATABLE_READ,
             psycopg.IsolationLevel.SERIALIZABLE]
EXPECTED_ERRORS = (pgerrors.SerializationFailure, pgerrors.DeadlockDetected, pgerrors.UniqueViolation,
                   pgerrors.LockNotAvailable)
# Defects planted directly in green, on rows no writer touches: (statement, keys it makes differ)
DEFECTS = [
    ("UPDATE public.acct_v2 SET v = CASE id WHEN 11 THEN 12 ELSE 11 END WHERE id IN (11, 12)", {"11", "12"}),
    ("UPDATE public.acct_v2 SET note = CASE id WHEN 13 THEN 'n14' ELSE 'n13' END WHERE id IN (13, 14)",
     {"13", "14"}),
    ("UPDATE public.acct_v2 SET span = '24:00:00' WHERE id = 16", {"16"}),          # blue: '1 day'
    ("UPDATE public.acct_v2 SET amount = 8.50 WHERE id = 17", {"17"}),              # blue: 8.5
    ("UPDATE public.acct_v2 SET ratio = '-0' WHERE id = 21", {"21"}),               # blue: 0
    ("DELETE FROM public.acct_v2 WHERE id = 22", {"22"}),
    ("INSERT INTO public.acct_v2 VALUES (-5, 1, 1, 1, '1 day', 'ghost')", {"-5"}),
]


class _Rollback(Exception):
    pass


@dataclass
class Writers:
    dsn: str
    seed: int
    count: int = 3
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    keys: itertools.count[int] = field(default_factory=lambda: itertools.count(1_000_000))
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)
    # each committed transaction that wrote: when it began (the server's now()) and every key it named
    committed: list[tuple[datetime, set[int]]] = field(default_factory=list)

    def start(self) -> Writers:
        for n in range(self.count):
            thread = threading.Thread(target=self.run, args=(n,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def new_key(self) -> int:
        with self.lock:
            return next(self.keys)

    def run(self, number: int) -> None:
        rng = random.Random(self.seed * 100 + number)
        with psycopg.connect(self.dsn, prepare_threshold=None, application_name=f"random writer {number}") as conn:
            while not self.stop.is_set():
                conn.isolation_level = rng.choice(ISOLATION)
                kinds: list[str] = []
                keys: set[int] = set()
                try:
                    with conn.transaction():
                        if conn.isolation_level != psycopg.IsolationLevel.READ_COMMITTED and rng.random() < 0.6:
                            conn.execute("SELECT count(*) FROM public.acct WHERE id <= 10")   # the snapshot
                            self.stop.wait(rng.uniform(0, 0.6))                               # held across batches
                        for _ in range(rng.randint(1, 3)):
                            kinds.append(self.statement(conn, rng, keys))
                        if rng.random() < 0.1:
                            raise _Rollback
                        started = conn.execute("SELECT now()").fetchone()[0]  # type: ignore[index]
                    with self.lock:
                        self.counts.update(kinds)
                        self.committed.append((started, keys))
                except _Rollback:
                    with self.lock:
                        self.counts["rolled back"] += 1
                except EXPECTED_ERRORS as error:
                    with self.lock:
                        self.expected[type(error).__name__] += 1
                except psycopg.Error as error:
                    with self.lock:
                        self.errors.append(f"{kinds}: {type(error).__name__}: {error}")
                self.stop.wait(0.002)

    def pick(self, conn: psycopg.Connection[tuple[object, ...]], rng: random.Random) -> int:
        row = conn.execute("SELECT id FROM public.acct WHERE id >= %s ORDER BY id LIMIT 1",
                           [rng.randint(PROTECTED + 1, ROWS)]).fetchone()
        return int(row[0]) if row else self.new_key()   # type: ignore[call-overload]

    def statement(self, conn: psycopg.Connection[tuple[object, ...]], rng: random.Random, keys: set[int]) -> str:
        kind = rng.choice(["insert", "update", "update_many", "delete", "rekey", "cte_reinsert", "cte_move",
                           "merge", "upsert", "swap"])
        k, k2, new = self.pick(conn, rng), self.pick(conn, rng), self.new_key()
        keys.update({k, k2, new, -k, -k2}, range(k, k + 21) if kind == "update_many" else ())
        run = conn.execute
        if kind == "insert":
            run("INSERT INTO public.acct VALUES (%s, 1, 1.5, 0.5, '2 days', 'ins')", [new])
        elif kind == "update":
            run("UPDATE public.acct SET v = v + 1, amount = amount + 0.25, note = 'u' || v WHERE id = %s", [k])
        elif kind == "update_many":
            run("UPDATE public.acct SET ratio = ratio * 2, span = span + interval '1 hour' "
                "WHERE id BETWEEN %s AND %s + 20", [k, k])
        elif kind == "delete":
            run("DELETE FROM public.acct WHERE id = %s", [k])
        elif kind == "rekey":
            run("UPDATE public.acct SET id = %s WHERE id = %s", [new, k])
        elif kind == "cte_reinsert":
            run("""WITH d AS (DELETE FROM public.acct WHERE id = %s RETURNING *)
                   INSERT INTO public.acct SELECT id, v + 100, amount, ratio, span, 'reborn' FROM d""", [k])
        elif kind == "cte_move" and k != k2:
            run("""WITH d AS (DELETE FROM public.acct WHERE id = %s RETURNING id)
                   UPDATE public.acct SET id = %s, note = 'moved' WHERE id = %s AND EXISTS (SELECT FROM d)""",
                [k, k, k2])
        elif kind == "merge" and k != k2:      # two source rows for one target row are an error
            run("""MERGE INTO public.acct AS t
                   USING (VALUES (%s::int, 1), (%s::int, 2), (%s::int, 3)) AS s(id, op) ON t.id = s.id
                   WHEN MATCHED AND s.op = 1 THEN DELETE
                   WHEN MATCHED THEN UPDATE SET v = t.v * 2, note = 'merged'
                   WHEN NOT MATCHED THEN INSERT VALUES (s.id, 0, 0, 0, '0', 'merge-ins')""", [k, k2, new])
        elif kind == "upsert":
            run("""INSERT INTO public.acct VALUES (%s, 7, 7, 7, '7 days', 'ups'), (%s, 8, 8, 8, '8 days', 'ups')
                   ON CONFLICT (id) DO UPDATE SET note = 'upserted', amount = EXCLUDED.amount""", [k, new])
        elif kind == "swap" and k != k2:
            run("UPDATE public.acct SET id = -id WHERE id IN (%s, %s)", [k, k2])
            run("UPDATE public.acct SET id = CASE id WHEN %s THEN %s ELSE %s END WHERE id IN (%s, %s)",
                [-k, k2, k, -k, -k2])
        return kind


def _verify(options: commands.Options, plan: Path, *, repair: bool = False) -> bool:
    try:
        commands.verify(options, plan, as_json=True, repair=repair)
        return True
    except ParityMismatch:
        return False


def _unexplained(dsn: str, writers: Writers) -> set[int]:
    """The keys the last verify found different that no committed writer transaction begun before
    bgsync's last write to green named."""
    horizon = scalar(dsn, "SELECT green_written_at FROM bgsync.migrations")
    differing = {int(str(key)) for key in scalars(dsn, "SELECT m->'key'->>0 FROM bgsync.verify_runs r, "
                                                       "jsonb_array_elements(r.result->'mismatches') m "
                                                       "WHERE r.id = (SELECT max(id) FROM bgsync.verify_runs)")}
    assert differing and isinstance(horizon, datetime)
    with writers.lock:
        named = set().union(*(keys for started, keys in writers.committed if started < horizon))
    return differing - named


def _fresh_plan(dsn: str, plan: Path, seed: int, **fields: object) -> str:
    """A fresh acct table (nothing of an earlier run left) and its plan; odd seeds run the backfill in
    bulk mode (change log, then the switch), even seeds in direct mode. The mode."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS bgsync CASCADE")
        conn.execute("DROP TABLE IF EXISTS public.acct, public.acct_v2, public.acct_old")
        conn.execute(SCHEMA)
    mode = "bulk" if seed % 2 else "direct"
    plan.write_text(yaml.safe_dump({**PLAN, "backfill": {**PLAN["backfill"], "mode": mode}, **fields}))
    return mode


def _lifecycle(dsn: str, tmp_path: Path, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    plan = tmp_path / f"acct-{seed}.yaml"
    mode = _fresh_plan(dsn, plan, seed)
    options = commands.Options(dsn=dsn)
    writers = Writers(dsn, seed).start()
    facts: dict[str, object] = {"seed": seed, "mode": mode}
    try:
        time.sleep(rng.uniform(0.05, 0.3))
        commands.prepare(options, plan)
        commands.backfill(options, plan, max_rows_per_second=rng.choice([8000.0, 20000.0, 0.0]))
        passed = _verify(options, plan)
        facts["repaired after backfill"] = not passed
        if not passed:
            # only a transaction that began before bgsync's last write to green may leave a difference
            # (README, "Isolation levels"): verify waits for those still open, and one that ended before
            # verify began has left its difference already. Each differing key is one such a transaction named.
            unexplained = _unexplained(dsn, writers)
            assert not unexplained, f"verify found differences no older transaction explains: {unexplained}"
            assert _verify(options, plan, repair=True), "verify --repair did not restore parity"
        assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == [], "a passing verify, a diff"

        statement, keys = rng.choice(DEFECTS)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)
        assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) != []
        assert not _verify(options, plan), f"verify missed a planted defect: {statement}"
        found = {str(k) for k in scalars(dsn, "SELECT m->'key'->>0 FROM bgsync.verify_runs r, "
                                              "jsonb_array_elements(r.result->'mismatches') m "
                                              "WHERE r.id = (SELECT max(id) FROM bgsync.verify_runs)")}
        assert keys <= found, (statement, found)
        assert _verify(options, plan, repair=True)
        assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == []

        commands.cutover(options, plan)
        assert text_diff(dsn, BLUE.format("acct_old"), GREEN.format("acct")) == [], "after cutover"
        time.sleep(rng.uniform(0.2, 0.6))        # writes through the live table, mirrored to blue
        commands.rollback(options, plan)
        assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == [], "after rollback"
        time.sleep(rng.uniform(0.1, 0.3))
    finally:
        writers.finish()
    assert writers.errors == [], writers.errors[:5]
    assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == [], "at the end"
    facts.update(writes=dict(writers.counts), expected_errors=dict(writers.expected))
    return facts


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, SEEDS + 1))
def test_randomized_writers_through_every_phase(dsn: str, tmp_path: Path, seed: int) -> None:
    facts = _lifecycle(dsn, tmp_path, seed)
    writes = facts["writes"]
    assert isinstance(writes, dict) and sum(writes.values()) > 20, facts
    print(f"[seed {seed}] {facts}")


WINDOW_SEEDS = max(1, SEEDS // 5)      # 4 in CI; BGSYNC_SEEDS=200 runs 40


class _OnTable:
    """A connection whose statements name another table in place of public.acct."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], table: str) -> None:
        self.conn, self.table = conn, table

    def execute(self, query: str, params: list[object] | None = None) -> psycopg.Cursor[tuple[object, ...]]:
        return self.conn.execute(re.sub(r"public\.acct\b", f"public.{self.table}", query), params)


@dataclass
class GreenWriters(Writers):
    """The same random writers, on green (the second release's table in the window of expose)."""

    def statement(self, conn: psycopg.Connection[tuple[object, ...]], rng: random.Random, keys: set[int]) -> str:
        return super().statement(_OnTable(conn, "acct_v2"), rng, keys)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, WINDOW_SEEDS + 1))
def test_randomized_writers_on_both_sides_of_the_two_way_window(dsn: str, tmp_path: Path, seed: int) -> None:
    """Writers at every isolation level on blue and on green at once, in the window of expose: an
    independent EXCEPT ALL, taken while they write, is empty every time; then cutover and rollback."""
    plan = tmp_path / f"window-{seed}.yaml"
    _fresh_plan(dsn, plan, seed, versions={"blue": "v_blue", "green": "v_green"})   # rollback drops the schemas
    options = commands.Options(dsn=dsn)
    commands.prepare(options, plan)
    commands.backfill(options, plan)
    assert _verify(options, plan) or _verify(options, plan, repair=True)
    commands.expose(options, plan)
    blue = Writers(dsn, seed).start()
    green = GreenWriters(dsn, seed + 1000, keys=itertools.count(5_000_000)).start()
    try:
        for check in range(8):
            time.sleep(0.5)
            assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == [], f"check {check}"
    finally:
        blue.finish()
        green.finish()
    assert blue.errors == [] and green.errors == [], (blue.errors[:3], green.errors[:3])
    assert sum(blue.counts.values()) > 20 and sum(green.counts.values()) > 20, (blue.counts, green.counts)
    assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == []
    commands.cutover(options, plan)
    assert text_diff(dsn, BLUE.format("acct_old"), GREEN.format("acct")) == []
    commands.rollback(options, plan)
    assert text_diff(dsn, BLUE.format("acct"), GREEN.format("acct_v2")) == []
    print(f"[window seed {seed}] blue {dict(blue.counts)} {dict(blue.expected)}; "
          f"green {dict(green.counts)} {dict(green.expected)}")
