"""Bulk mode (`backfill.mode: bulk`, the default): green fills without indexes while the trigger records
changed keys; the keys are re-read from blue after the copy and the trigger switches to dual write under
a short lock. These tests pin each step whose absence would lose or invent a row: rows changed after
their batch was copied, a unique index that only holds once every row is current, and a writer whose
change is still open when the switch comes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psycopg

from tests.helpers import (
    bgsync,
    copied_past,
    load_schema,
    plan_diff,
    plan_in_mode,
    scalar,
    seed,
    spawn_bgsync,
    wait_for,
)


def _at_the_switch(dsn: str) -> bool:
    """The backfill's drain session is taking the switch's lock on blue (orders_v2)."""
    return bool(scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                            "'bgsync backfill orders_v2 drain' AND query LIKE '%%LOCK TABLE%%'"))


def _drained_keys(dsn: str) -> int:
    value = scalar(dsn, "SELECT coalesce(sum((detail::jsonb->>'keys')::int), 0) FROM bgsync.events "
                        "WHERE step LIKE 're-read up to%%'")
    return int(value)  # type: ignore[call-overload]


def _slow_backfill(dsn: str, tmp_path: Path, plan: str, past_key: int, **rows: int) -> subprocess.Popen[str]:
    """Prepare `plan` in bulk mode and start a throttled one-worker backfill; return once the journal
    says the row with key `past_key` has been copied."""
    load_schema(dsn)
    seed(dsn, **rows)
    path = plan_in_mode(plan, "bulk", tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    proc = spawn_bgsync(dsn, "backfill", path, "--workers", "1", "--batch-rows", "500",
                        "--max-rows-per-second", "4000")
    wait_for(lambda: copied_past(dsn, past_key), timeout=60)
    return proc


def test_rows_changed_after_their_batch_was_copied_are_read_again(dsn: str, tmp_path: Path) -> None:
    """Green holds the old versions of rows 5..9 once their batch is copied (no row lock, no trigger
    writing green); the change log brings each one back to blue's state: an update, a delete, a re-key,
    a statement that deletes one key and moves another row onto it, and an insert below the range."""
    proc = _slow_backfill(dsn, tmp_path, "orders_v2", 10, orders=20_000)
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("UPDATE public.orders SET amount = 777, note = 'changed' WHERE id = 5")
        app.execute("DELETE FROM public.orders WHERE id = 6")
        app.execute("UPDATE public.orders SET id = 9000007 WHERE id = 7")
        app.execute("""WITH d AS (DELETE FROM public.orders WHERE id = 8 RETURNING id)
                       UPDATE public.orders SET id = 8, note = 'moved from 9'
                        WHERE id = 9 AND EXISTS (SELECT FROM d)""")
        app.execute("INSERT INTO public.orders (id, customer_id, amount, state, created_at) "
                    "VALUES (-1, 1, 1, 'new', now())")
    during = json.loads(bgsync(dsn, "status", "--json").out)["migrations"][0]
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    # status showed the keys waiting in the log while the copy went on, and shows none after the switch
    assert during["backfill_mode"] == "bulk" and during["change_log_keys"] >= 6, during
    assert json.loads(bgsync(dsn, "status", "--json").out)["migrations"][0]["change_log_keys"] is None
    assert plan_diff(dsn, "orders_v2") == []
    assert scalar(dsn, "SELECT note FROM public.orders_v2 WHERE id = 8") == "moved from 9"
    assert scalar(dsn, "SELECT count(*) FROM public.orders_v2 WHERE id IN (6, 7, 9)") == 0
    assert _drained_keys(dsn) >= 6
    # the copy took no row lock and skipped nothing: the direct-mode paths never ran
    assert scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE step LIKE '%%FOR KEY SHARE%%' "
                       "OR step LIKE '%%trigger already wrote%%'") == 0


def test_unique_index_is_built_once_every_row_is_current(dsn: str, tmp_path: Path) -> None:
    """Row 3's email moves to row 15000 after row 3 was copied and before row 15000 is: green holds the
    same email twice until the change log is drained. The unique index is built after the switch (and
    CONCURRENTLY), so it succeeds and holds; built earlier it would fail on the stale row."""
    proc = _slow_backfill(dsn, tmp_path, "accounts_v2", 3, accounts=20_000)
    with psycopg.connect(dsn) as app:
        email = scalar(dsn, "SELECT email FROM public.accounts WHERE id = 3")
        app.execute("UPDATE public.accounts SET email = 'moved-' || email WHERE id = 3")
        app.execute("UPDATE public.accounts SET email = %s WHERE id = 15000", [email])
    assert not copied_past(dsn, 15000), "the batch of row 15000 was copied before the move: raise the row count"
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert plan_diff(dsn, "accounts_v2") == []
    assert scalar(dsn, "SELECT i.indisvalid AND i.indisunique FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                       "WHERE c.relname = 'accounts_v2_email_idx'") is True
    assert scalar(dsn, "SELECT id FROM public.accounts_v2 WHERE email = %s", [email]) == 15000


def test_switch_waits_for_an_open_writer_and_applies_its_change(dsn: str, tmp_path: Path) -> None:
    """A REPEATABLE READ transaction has updated row 5 (its key is in the change log, uncommitted) when
    the backfill reaches the switch: the switch waits for it to end (a writer holds ROW EXCLUSIVE), then
    re-reads row 5 under the lock, so the committed change reaches green before the trigger turns to
    dual write and the log is dropped."""
    load_schema(dsn)
    seed(dsn, orders=3_000)
    path = plan_in_mode("orders_v2", "bulk", tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    with psycopg.connect(dsn) as app:
        app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        app.execute("SELECT count(*) FROM public.orders")            # the snapshot
        app.execute("UPDATE public.orders SET amount = 4242 WHERE id = 5")   # left open
        proc = spawn_bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "1000")
        wait_for(lambda: _at_the_switch(dsn), timeout=120)
        time.sleep(1.0)                                               # NOWAIT tries, then a queued wait
        assert proc.poll() is None, "the backfill ended while a writer of blue was still open"
        assert scalar(dsn, "SELECT to_regclass('bgsync.orders_v2_log') IS NOT NULL") is True
        app.commit()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert scalar(dsn, "SELECT total_amount FROM public.orders_v2 WHERE id = 5") == 4242
    assert scalar(dsn, "SELECT to_regclass('bgsync.orders_v2_log')") is None
    assert plan_diff(dsn, "orders_v2") == []
    # from now on the trigger writes green itself
    with psycopg.connect(dsn, autocommit=True) as app:
        app.execute("UPDATE public.orders SET amount = 99 WHERE id = 6")
    assert scalar(dsn, "SELECT total_amount FROM public.orders_v2 WHERE id = 6") == 99


def test_kill_at_the_switch_then_rerun_completes(dsn: str, tmp_path: Path) -> None:
    """kill -9 while the backfill waits at the switch (an open writer holds blue): the switch's transaction
    is gone with it, green keeps its indexes, the log its keys; the rerun skips the copy and the builds,
    drains, switches and ends exact."""
    load_schema(dsn)
    seed(dsn, orders=3_000)
    path = plan_in_mode("orders_v2", "bulk", tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    with psycopg.connect(dsn) as app:
        app.execute("UPDATE public.orders SET amount = 4343 WHERE id = 7")   # left open
        proc = spawn_bgsync(dsn, "backfill", path, "--workers", "2", "--batch-rows", "1000")
        wait_for(lambda: _at_the_switch(dsn), timeout=120)
        proc.kill()
        proc.communicate(timeout=30)
        app.commit()
    assert scalar(dsn, "SELECT to_regclass('bgsync.orders_v2_log') IS NOT NULL") is True
    assert scalar(dsn, "SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.orders_v2'::regclass "
                       "AND contype = 'p'") == 1
    # the killed process's sessions end on their own; the rerun waits for its advisory locks meanwhile
    rerun = bgsync(dsn, "backfill", path)
    assert rerun.code == 0, rerun.err
    assert "building" not in rerun.err                      # the indexes were kept
    assert scalar(dsn, "SELECT total_amount FROM public.orders_v2 WHERE id = 7") == 4343
    assert scalar(dsn, "SELECT to_regclass('bgsync.orders_v2_log')") is None
    assert plan_diff(dsn, "orders_v2") == []
