"""Issue 3: cutover in both modes with writers running, reverse sync, rollback, cutover again;
lock fights; views, foreign keys and sequences across the flips; status and run. Writer stalls are
measured by bench/, not here: these tests assert the mechanism (one transaction per flip, lock waits
ended by lock_timeout)."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from orchestrator.workload import ACCOUNTS, ORDERS, Workload
from tests.helpers import PLANS, bgsync, load_schema, parity_diff, scalar, scalars, seed, spawn_bgsync, wait_for

# Blue (retired or live) projected through the plan, against green: independent of bgsync's code.
ACCOUNTS_BLUE = "SELECT id::bigint, email, name, created_at FROM public.{blue}"
ACCOUNTS_GREEN = "SELECT id, email, name, created_at FROM public.{green}"


def accounts_plan(tmp_path: Path, mode: str, **cutover: object) -> Path:
    plan = yaml.safe_load((PLANS / "accounts_v2.yaml").read_text())
    plan["cutover"] = {**plan.get("cutover", {}), "mode": mode, **cutover}
    file = tmp_path / f"accounts_{mode}.yaml"
    file.write_text(yaml.safe_dump(plan))
    return file


def ready(dsn: str, plan: Path, rows: int = 20_000) -> None:
    load_schema(dsn)
    seed(dsn, accounts=rows)
    for command in ("prepare", "backfill", "verify"):
        result = bgsync(dsn, command, str(plan))
        assert result.code == 0, (command, result.err)


# orders with a type change but the same column names, so one workload writes before and after the flip
ORDERS_SAME_NAMES = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "customer_id", "type": "bigint", "not_null": True},
                {"name": "amount", "type": "numeric(12,2)", "not_null": True, "reverse": "round(amount)::integer"},
                {"name": "state", "type": "text", "not_null": True},
                {"name": "note", "type": "text"},
                {"name": "created_at", "type": "timestamptz", "not_null": True}],
    "indexes": [{"columns": ["customer_id"]}],
}
ORDERS_BLUE = "SELECT id, customer_id, amount::numeric(12,2), state, note, created_at FROM public.{blue}"
ORDERS_GREEN = "SELECT id, customer_id, amount, state, note, created_at FROM public.{green}"
WRITER_CASES = [("accounts", "rename"), ("orders", "rename"), ("orders", "view")]


def flip_transactions(dsn: str) -> list[list[tuple[str, str]]]:
    """The (statement, recorded duration) of each committed cutover and rollback transaction that took a
    table lock, grouped by transaction (the journal records a unit's statements inside the unit's own
    transaction, so they share its xmin)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    with psycopg.connect(dsn) as conn:
        for xmin, statement, duration in conn.execute(
                "SELECT xmin::text, statement, duration_ms::text FROM bgsync.events "
                "WHERE phase IN ('cutover', 'rollback') AND outcome = 'ok' ORDER BY id"):
            groups.setdefault(xmin, []).append((statement, duration))
    return [g for g in groups.values() if any("LOCK TABLE" in statement for statement, _ in g)]


def writers_go_on(workload: Workload, more: int = 50) -> None:
    """Wait until the writers have made `more` writes since now (none is stuck behind a lock)."""
    start = sum(workload.counts.values())
    wait_for(lambda: sum(workload.counts.values()) > start + more)


@pytest.mark.parametrize(("table", "mode"), WRITER_CASES, ids=[f"{t}-{m}" for t, m in WRITER_CASES])
def test_cutover_rollback_cutover_with_writers(dsn: str, tmp_path: Path, table: str, mode: str) -> None:
    """Each flip is one transaction under lock_timeout (locks first, journal last); the writers go on
    after each one, none fails, and reverse sync leaves the retired blue equal to the live table."""
    if table == "accounts":
        plan = accounts_plan(tmp_path, mode)
        ready(dsn, plan)
        ops, blue_sql, green_sql = ACCOUNTS, ACCOUNTS_BLUE, ACCOUNTS_GREEN
    else:
        plan = tmp_path / "orders.yaml"
        plan.write_text(yaml.safe_dump({**ORDERS_SAME_NAMES, "cutover": {"mode": mode}}))
        load_schema(dsn)
        seed(dsn, orders=20_000)
        for command in ("prepare", "backfill", "verify"):
            assert bgsync(dsn, command, str(plan)).code == 0
        # PostgreSQL refuses COPY into a view: in view mode the application cannot COPY into the live name
        ops = ORDERS if mode == "rename" else dataclasses.replace(ORDERS, copy="")
        blue_sql, green_sql = ORDERS_BLUE, ORDERS_GREEN
    green_name = table if mode == "rename" else f"{table}_v2"
    workload = Workload(dsn, ops, writers=4, key_space=20_000).start()
    try:
        writers_go_on(workload)
        for command in ("cutover", "rollback", "verify", "cutover"):
            result = bgsync(dsn, command, str(plan))
            assert result.code == 0, (command, result.err)
            writers_go_on(workload)
    finally:
        workload.finish()
    assert workload.errors == []
    flips = flip_transactions(dsn)
    assert len(flips) == 3, "cutover, rollback and cutover again: each one transaction"
    for flip, done in zip(flips, ("'cut_over'", "'reverted'", "'cut_over'"), strict=True):
        statements = [statement for statement, _ in flip]
        locks = [i for i, statement in enumerate(statements) if "LOCK TABLE" in statement]
        changes = [i for i, statement in enumerate(statements) if statement.startswith(("ALTER", "CREATE", "DROP"))]
        assert changes and max(locks) < min(changes), "the flip changes nothing before it holds its locks"
        assert all("ACCESS EXCLUSIVE" in statements[i] for i in locks)
        assert f"SET phase = {done}" in statements[-1], statements[-1]
        assert all(duration is not None for _, duration in flip)
    for kind in ("insert", "update", "delete", "key_update"):
        assert workload.counts[kind] > 0
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
    # every write through the live name reached the retired blue table (reverse sync)
    assert parity_diff(dsn, blue_sql.format(blue=f"{table}_old"), green_sql.format(green=green_name)) == []
    kind = scalar(dsn, f"SELECT relkind::text FROM pg_class WHERE oid = 'public.{table}'::regclass")
    assert kind == ("r" if mode == "rename" else "v")


def test_writes_after_cutover_reach_blue_and_rollback_loses_nothing(dsn: str, tmp_path: Path) -> None:
    plan = accounts_plan(tmp_path, "rename")
    ready(dsn, plan, rows=2_000)
    assert bgsync(dsn, "cutover", str(plan)).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        new_id = conn.execute("INSERT INTO accounts (email, is_active) VALUES ('after@x', false) RETURNING id"
                              ).fetchone()[0]  # type: ignore[index]
        conn.execute("UPDATE accounts SET name = 'renamed' WHERE id = 5")
        conn.execute("DELETE FROM accounts WHERE id = 6")
        conn.execute("UPDATE accounts SET id = DEFAULT WHERE id = 7")
        retired = {r[0]: r[1] for r in conn.execute(
            "SELECT id, name FROM accounts_old WHERE id IN (5, 6, 7) OR id = %s", [new_id])}
    assert retired[5] == "renamed" and 6 not in retired and 7 not in retired and new_id in retired
    assert parity_diff(dsn, ACCOUNTS_BLUE.format(blue="accounts_old"), ACCOUNTS_GREEN.format(green="accounts")) == []
    assert bgsync(dsn, "rollback", str(plan)).code == 0
    assert parity_diff(dsn, ACCOUNTS_BLUE.format(blue="accounts"), ACCOUNTS_GREEN.format(green="accounts_v2")) == []
    assert scalar(dsn, "SELECT count(*) FROM accounts WHERE id = %s", [new_id]) == 1
    # green is still kept in sync after the rollback: it verifies and can be cut over again
    assert bgsync(dsn, "verify", str(plan)).code == 0
    assert bgsync(dsn, "cutover", str(plan)).code == 0


def stable(status: dict[str, object]) -> list[dict[str, object]]:
    """A status report without what changes with the writers' rows (row estimate, rate, ETA)."""
    out = []
    for migration in status["migrations"]:  # type: ignore[attr-defined]
        backfill = {k: v for k, v in migration["backfill"].items()
                    if k not in ("rows_estimate", "rows_per_second", "eta_seconds")}
        out.append({**migration, "backfill": backfill})
    return out


QUEUED_BEHIND_CUTOVER = """
SELECT count(*) FROM pg_stat_activity AS w
 WHERE w.application_name = 'lock-fight writer' AND w.wait_event_type = 'Lock'
   AND EXISTS (SELECT FROM pg_stat_activity AS c
                WHERE c.pid = ANY(pg_blocking_pids(w.pid)) AND c.application_name LIKE 'bgsync cutover%')"""


def test_lock_held_on_blue_makes_cutover_give_up_cleanly(dsn: str, tmp_path: Path) -> None:
    """A long transaction on blue: each cutover attempt waits for blue's lock at most lock_timeout, and a
    writer queued behind that waiting lock request goes on when the attempt gives up; after the last
    attempt nothing has changed."""
    plan = accounts_plan(tmp_path, "rename", lock_timeout="200ms", attempts=3)
    ready(dsn, plan, rows=2_000)
    before = json.loads(bgsync(dsn, "status", "--json").out)
    inserted: list[int] = []
    errors: list[BaseException] = []
    queued: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, application_name="lock-fight writer") as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO accounts (email) VALUES (gen_random_uuid() || '@w')")
                    inserted.append(1)
                    time.sleep(0.005)
        except BaseException as error:
            errors.append(error)

    with psycopg.connect(dsn) as holder:
        holder.execute("UPDATE accounts SET name = 'held' WHERE id = 1")  # ROW EXCLUSIVE held, uncommitted
        thread = threading.Thread(target=writer)
        thread.start()
        proc = spawn_bgsync(dsn, "cutover", str(plan))
        try:
            with psycopg.connect(dsn, autocommit=True) as watcher:
                while proc.poll() is None:
                    queued.append(int(watcher.execute(QUEUED_BEHIND_CUTOVER).fetchone()[0]))  # type: ignore[index]
                    time.sleep(0.005)
            _, err = proc.communicate(timeout=60)
            writes_when_cutover_gave_up = len(inserted)
            wait_for(lambda: len(inserted) > writes_when_cutover_gave_up + 10)   # and the writer goes on
        finally:
            stop.set()
            thread.join()
            if proc.poll() is None:
                proc.kill()
        holder.rollback()
    assert proc.returncode == 3, err
    assert "within lock_timeout 200ms after 3 attempt(s)" in err, err
    assert errors == []
    assert any(queued), "the writer was never seen queued behind the cutover's lock request"
    # each attempt ended because its lock wait reached its bound (lock_timeout, or a statement_timeout as
    # long), not for any other reason
    ended = scalars(dsn, "SELECT detail FROM bgsync.events WHERE phase = 'cutover' AND outcome = 'error'")
    assert len(ended) == 3 and all(re.fullmatch(r"canceling statement due to (lock|statement) timeout", str(e))
                                   for e in ended), ended
    after = json.loads(bgsync(dsn, "status", "--json").out)
    assert stable(after) == stable(before)
    assert scalar(dsn, "SELECT to_regclass('public.accounts_old')") is None
    assert scalar(dsn, "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'bgsync_accounts_v2_fwd_%%'") == 4
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "verified"


def test_cutover_refused_without_a_passing_verify(dsn: str, tmp_path: Path) -> None:
    plan = accounts_plan(tmp_path, "rename")
    load_schema(dsn)
    seed(dsn, accounts=500)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    assert bgsync(dsn, "backfill", str(plan)).code == 0
    refused = bgsync(dsn, "cutover", str(plan))
    assert refused.code == 1 and "verified" in refused.err
    assert bgsync(dsn, "verify", str(plan)).code == 0
    assert bgsync(dsn, "backfill", str(plan)).code == 0     # a later backfill voids the verify
    assert bgsync(dsn, "cutover", str(plan)).code == 1


VIEW_AND_FK = """
CREATE VIEW public.active_accounts AS SELECT id, email FROM public.accounts WHERE name IS NOT NULL;
CREATE TABLE public.logins (id serial PRIMARY KEY, account_id integer NOT NULL REFERENCES public.accounts (id));
INSERT INTO public.logins (account_id) SELECT id FROM public.accounts WHERE id <= 50;
"""


def _points_at(dsn: str) -> tuple[str, set[str]]:
    """(what the view reads, what the foreign keys of `logins` reference): from the backfill to finalize a
    child table has the original constraint and its twin referencing green, so both tables are covered."""
    view = scalar(dsn, """SELECT string_agg(DISTINCT d.refobjid::regclass::text, ',') FROM pg_depend d
                          JOIN pg_rewrite r ON r.oid = d.objid
                         WHERE r.ev_class = 'public.active_accounts'::regclass AND d.refobjid <> r.ev_class""")
    fks = {str(t) for t in scalars(dsn, "SELECT confrelid::regclass::text FROM pg_constraint WHERE contype = 'f' "
                                        "AND conrelid = 'public.logins'::regclass AND convalidated")}
    return str(view), fks


@pytest.mark.parametrize("mode", ["rename", "view"])
def test_view_foreign_key_and_identity_follow_each_flip(dsn: str, tmp_path: Path, mode: str) -> None:
    plan = accounts_plan(tmp_path, mode)
    load_schema(dsn)
    seed(dsn, accounts=1_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(VIEW_AND_FK)
    for command in ("prepare", "backfill", "verify"):
        assert bgsync(dsn, command, str(plan)).code == 0
    assert _points_at(dsn) == ("accounts", {"accounts", "accounts_v2"})
    flipped = bgsync(dsn, "cutover", str(plan))
    assert flipped.code == 0, flipped.err
    assert _points_at(dsn) == (("accounts", {"accounts", "accounts_old"}) if mode == "rename"
                               else ("accounts", {"accounts_v2", "accounts_old"}))
    table_now = "accounts" if mode == "rename" else "accounts_v2"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM active_accounts").fetchone() == (800,)
        ids = [conn.execute("INSERT INTO accounts (email, name) VALUES (gen_random_uuid() || '@x', 'n') "
                            "RETURNING id").fetchone()[0] for _ in range(3)]  # type: ignore[index]
        assert min(ids) > 1_000
        assert conn.execute("SELECT convalidated FROM pg_constraint WHERE conname = 'logins_account_id_fkey'"
                            ).fetchone() == (True,)
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute("INSERT INTO logins (account_id) VALUES (99999999)")
        conn.execute("INSERT INTO logins (account_id) VALUES (%s)", [ids[0]])
        assert conn.execute(f"SELECT count(*) FROM {table_now} WHERE id = ANY(%s)", [ids]).fetchone() == (3,)
    back = bgsync(dsn, "rollback", str(plan))
    assert back.code == 0, back.err
    assert _points_at(dsn) == ("accounts", {"accounts", "accounts_v2"})
    assert scalar(dsn, "SELECT relkind::text FROM pg_class WHERE oid = 'public.accounts'::regclass") == "r"
    with psycopg.connect(dsn, autocommit=True) as conn:
        more = conn.execute("INSERT INTO accounts (email) VALUES ('after-rollback@x') RETURNING id").fetchone()
        assert more is not None and more[0] > max(ids)
        assert conn.execute("SELECT count(*) FROM active_accounts").fetchone() == (803,)
    assert bgsync(dsn, "verify", str(plan)).code == 0
    assert bgsync(dsn, "cutover", str(plan)).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        last = conn.execute("INSERT INTO accounts (email) VALUES ('third@x') RETURNING id").fetchone()
        assert last is not None and last[0] > more[0]
    assert bgsync(dsn, "finalize", str(plan)).code == 1          # no terminal to confirm on
    assert bgsync(dsn, "finalize", str(plan), "--yes").code == 0
    assert scalar(dsn, "SELECT to_regclass('public.accounts_old')") is None
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "finalized"
    # the twin took over, under the original's name
    assert _points_at(dsn)[1] == ({"accounts"} if mode == "rename" else {"accounts_v2"})
    assert scalar(dsn, "SELECT confrelid::regclass::text FROM pg_constraint WHERE conname = 'logins_account_id_fkey'"
                  ) == ("accounts" if mode == "rename" else "accounts_v2")
    assert bgsync(dsn, "rollback", str(plan)).code == 1


STATUS_KEYS = {"name", "phase", "source", "target", "retired", "mode", "window", "backfill", "verify",
               "verify_before_rollback",
               "rolled_back_at", "triggers", "drift", "backfill_mode", "change_log_keys"}
BACKFILL_KEYS = {"partitions", "partitions_done", "rows_copied", "rows_estimate", "rows_per_second", "eta_seconds",
                 "state", "processes", "heartbeat_age_seconds", "held", "held_seconds", "paused_at"}


def test_status_json_is_schema_stable_and_reports_drift(dsn: str, tmp_path: Path) -> None:
    plan = accounts_plan(tmp_path, "rename")
    ready(dsn, plan, rows=3_000)
    result = bgsync(dsn, "status", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert set(report) == {"version", "migrations"} and report["version"] == 1
    [migration] = report["migrations"]
    assert set(migration) == STATUS_KEYS
    assert set(migration["backfill"]) == BACKFILL_KEYS
    assert set(migration["verify"]) == {"passed", "finished_at", "mismatched_rows"}
    assert migration["phase"] == "verified" and migration["drift"] == []
    assert migration["backfill"]["rows_copied"] == 3_000
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER bgsync_accounts_v2_fwd_upd ON accounts")
    drifted = bgsync(dsn, "status", "--json")
    assert drifted.code == 1
    assert json.loads(drifted.out)["migrations"][0]["drift"] == [
        "trigger bgsync_accounts_v2_fwd_upd on public.accounts is missing"]
    assert "DRIFT" in drifted.err
    # a gate refuses to flip on drift: without the trigger, green may have missed writes
    for command in ("verify", "cutover"):
        refused = bgsync(dsn, command, str(plan))
        assert refused.code == 1 and "bgsync_accounts_v2_fwd_upd" in refused.err, (command, refused.err)


def test_run_through_verify_and_auto_rollback(dsn: str, tmp_path: Path) -> None:
    plan = accounts_plan(tmp_path, "rename")
    load_schema(dsn)
    seed(dsn, accounts=3_000)
    through = bgsync(dsn, "run", str(plan), "--through", "backfill")
    assert through.code == 0, through.err
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "backfilled"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM accounts_v2 WHERE id = 42")        # a parity defect
    failed = bgsync(dsn, "run", str(plan), "--auto-rollback")
    assert failed.code == 1, failed.err
    assert "run stopped at verify and rolled back" in failed.err
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "rolled_back"
    assert scalar(dsn, "SELECT to_regclass('public.accounts_v2')") is None


def test_run_auto_rollback_when_cutover_fails(dsn: str, tmp_path: Path) -> None:
    """A cutover that cannot get its locks (a session keeps blue's sequence in an open transaction: the
    cutover renames it) makes `run --auto-rollback` roll back and exit 1; what validate can foresee
    never gets that far."""
    plan = accounts_plan(tmp_path, "rename", lock_timeout="200ms", attempts=2)
    load_schema(dsn)
    seed(dsn, accounts=3_000)
    with psycopg.connect(dsn) as reader:
        reader.execute("SELECT nextval('public.accounts_id_seq')")      # a lock on blue's sequence, held
        failed = bgsync(dsn, "run", str(plan), "--auto-rollback")
        reader.rollback()
    assert failed.code == 1, failed.err
    assert "could not get a lock" in failed.err and "run stopped at cutover" in failed.err
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "rolled_back"
    assert scalar(dsn, "SELECT to_regclass('public.accounts_v2')") is None


def test_rollback_before_cutover_is_idempotent(dsn: str, tmp_path: Path) -> None:
    plan = accounts_plan(tmp_path, "rename")
    load_schema(dsn)
    seed(dsn, accounts=500)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    first = bgsync(dsn, "rollback", str(plan))
    assert first.code == 0, first.err
    second = bgsync(dsn, "rollback", str(plan))
    assert second.code == 0 and "nothing to roll back" in second.err
    assert scalar(dsn, "SELECT to_regclass('public.accounts_v2')") is None
    assert scalar(dsn, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == 0
    assert scalar(dsn, "SELECT count(*) FROM pg_proc WHERE proname LIKE 'accounts_v2_%%'") == 0
    # and the migration can be prepared again from scratch
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    assert bgsync(dsn, "backfill", str(plan)).code == 0
    assert bgsync(dsn, "verify", str(plan)).code == 0
