"""A DML-only role writes through the triggers in every phase (acceptance 5); the journal detects an edited plan;
two backfill processes on one plan cooperate; dry runs change nothing."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.helpers import (
    PLANS,
    PROJECTIONS,
    bgsync,
    load_schema,
    parity_diff,
    plan_diff,
    plan_in_mode,
    scalar,
    seed,
    spawn_bgsync,
    wait_for,
)


def _application_writes(app: psycopg.Connection[tuple[object, ...]], amount: str, first: int) -> None:
    """One write of each kind, as the application does it, with a search_path that finds nothing."""
    app.execute("SET search_path = pg_catalog")  # the triggers must not rely on the caller's path
    app.execute(f"INSERT INTO public.orders (customer_id, {amount}) VALUES (1, 10), (2, 20)")
    app.execute(f"UPDATE public.orders SET {amount} = {amount} + 1 WHERE id BETWEEN {first} AND {first + 49}")
    app.execute(f"UPDATE public.orders SET id = nextval('public.orders_id_seq') WHERE id = {first + 50}")
    app.execute(f"DELETE FROM public.orders WHERE id BETWEEN {first + 40} AND {first + 45}")


@pytest.mark.parametrize("mode", ["direct", "bulk"])
def test_dml_only_role_writes_through_every_phase(dsn: str, mode: str, tmp_path: Path) -> None:
    """A role with only SELECT/INSERT/UPDATE/DELETE on blue and USAGE on its sequence writes through the
    forward trigger (after prepare and after backfill), through the reverse trigger after cutover, and
    through the forward trigger again after rollback; an independent EXCEPT ALL agrees each time."""
    load_schema(dsn)
    seed(dsn, orders=2_000)
    role = f"app_writer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO {}").format(
            sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE public.orders_id_seq TO {}").format(sql.Identifier(role)))
    retired_blue = PROJECTIONS["orders_v2"][0].replace("public.orders", "public.orders_old")
    live_green = PROJECTIONS["orders_v2"][1].replace("public.orders_v2", "public.orders")
    try:
        path = plan_in_mode("orders_v2", mode, tmp_path)
        assert bgsync(dsn, "prepare", path).code == 0
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as app:
            assert app.execute("SELECT current_user").fetchone() == (role,)
            _application_writes(app, "amount", 1)
            green = app.execute("SELECT count(*) FROM public.orders_v2").fetchone()
            if mode == "direct":
                # green holds exactly the rows the trigger mirrored: 2 inserted, 50 updated, 1 re-keyed, 6 deleted
                assert green is not None and green[0] == 2 + 50 + 1 - 6
            else:
                # bulk: the trigger (SECURITY DEFINER) recorded the keys in bgsync's log, which the role cannot
                # read; green fills at the backfill
                assert green == (0,)
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    app.execute("SELECT count(*) FROM bgsync.orders_v2_log")
        if mode == "bulk":
            logged = scalar(dsn, "SELECT count(DISTINCT id) FROM bgsync.orders_v2_log")
            assert logged is not None and int(logged) >= 50  # type: ignore[call-overload]
        assert bgsync(dsn, "backfill", path).code == 0
        assert plan_diff(dsn, "orders_v2") == []
        # the role's grants on blue were copied to green
        privileges = scalar(dsn, "SELECT string_agg(privilege_type, ',' ORDER BY privilege_type) FROM "
                                 "information_schema.role_table_grants WHERE table_name = 'orders_v2' "
                                 "AND grantee = %s", [role])
        assert privileges == "DELETE,INSERT,SELECT,UPDATE"
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as app:
            _application_writes(app, "amount", 101)
        assert plan_diff(dsn, "orders_v2") == []
        for command in ("verify", "cutover"):
            result = bgsync(dsn, command, path)
            assert result.code == 0, (command, result.err)
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as app:
            _application_writes(app, "total_amount", 201)        # green's shape under the live name
        assert parity_diff(dsn, retired_blue, live_green) == [], "reverse sync missed a write"
        back = bgsync(dsn, "rollback", path)
        assert back.code == 0, back.err
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as app:
            _application_writes(app, "amount", 301)
        assert plan_diff(dsn, "orders_v2") == [], "forward sync after rollback missed a write"
        assert bgsync(dsn, "verify", path).code == 0
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize("mode", ["direct", "bulk"])
def test_trigger_fires_under_replica_role_and_for_truncate(dsn: str, mode: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=500)
    path = plan_in_mode("orders_v2", mode, tmp_path)
    assert bgsync(dsn, "prepare", path).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")
        conn.execute("INSERT INTO public.orders (customer_id, amount) VALUES (7, 70)")
        if mode == "direct":
            assert conn.execute("SELECT count(*) FROM public.orders_v2").fetchone() == (1,)
        else:
            assert conn.execute("SELECT count(*) FROM bgsync.orders_v2_log").fetchone() == (1,)
            # a TRUNCATE while green fills empties green and the log with blue
            conn.execute("INSERT INTO public.orders_v2 SELECT id, customer_id, amount, state, note, created_at "
                         "FROM public.orders WHERE id <= 10")
            conn.execute("TRUNCATE public.orders")
            assert conn.execute("SELECT count(*) FROM public.orders_v2").fetchone() == (0,)
            assert conn.execute("SELECT count(*) FROM bgsync.orders_v2_log").fetchone() == (0,)
            conn.execute("INSERT INTO public.orders (customer_id, amount) "
                         "SELECT g % 50, g FROM generate_series(1, 300) g")
        conn.execute("RESET session_replication_role")
    assert bgsync(dsn, "backfill", path).code == 0
    assert plan_diff(dsn, "orders_v2") == []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE public.orders")
        assert conn.execute("SELECT count(*) FROM public.orders_v2").fetchone() == (0,)


def test_plan_edited_after_prepare_is_refused_with_the_difference(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    path = PLANS / "orders_v2.yaml"
    assert bgsync(dsn, "prepare", str(path)).code == 0
    edited = tmp_path / "orders_v2.yaml"
    edited.write_text(path.read_text().replace("round(total_amount)::integer", "trunc(total_amount)::integer"))
    for command in ("prepare", "backfill"):
        result = bgsync(dsn, command, str(edited))
        assert result.code == 1, result.err
        assert "edited after prepare" in result.err
        assert "columns[2].reverse" in result.err and "trunc(total_amount)" in result.err
    # tuning knobs may change freely
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text(path.read_text().replace("workers: 4, batch_rows: 10000", "workers: 2, batch_rows: 500"))
    assert bgsync(dsn, "backfill", str(tuned)).code == 0


def test_two_backfill_processes_cooperate(dsn: str) -> None:
    """A second process on the same plan, started while the first is seen copying, takes the partitions
    nobody holds: both copy batches, every row is copied exactly once, green equals blue."""
    load_schema(dsn)
    seed(dsn, orders=20_000)
    path = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", path).code == 0
    args = ("backfill", path, "--batch-rows", "500", "--workers", "2", "--max-rows-per-second", "4000")
    first = spawn_bgsync(dsn, *args)
    wait_for(lambda: bool(scalar(dsn, "SELECT to_regclass('bgsync.chunks')")) and
             int(scalar(dsn, "SELECT coalesce(sum(rows_copied), 0) FROM bgsync.chunks")) > 0)  # type: ignore[arg-type]
    second = spawn_bgsync(dsn, *args)
    _, err1 = first.communicate(timeout=120)
    _, err2 = second.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert "resuming" in err2
    assert plan_diff(dsn, "orders_v2") == []
    # both processes copied batches (their workers' sessions are distinct backends)
    copiers = scalar(dsn, "SELECT count(DISTINCT backend_pid) FROM bgsync.events WHERE phase = 'backfill' "
                          "AND outcome = 'ok' AND detail IS NOT NULL AND detail::jsonb ? 'chunk'")
    assert copiers is not None and int(copiers) >= 3  # type: ignore[call-overload]
    assert scalar(dsn, "SELECT sum(rows_copied) FROM bgsync.chunks") == 20_000
    assert bgsync(dsn, "status").code == 0          # no drift


def test_dry_runs_change_nothing(dsn: str) -> None:
    load_schema(dsn)
    seed(dsn, orders=1_000)
    path = str(PLANS / "orders_v2.yaml")
    for args in (("prepare", "--dry-run"), ("backfill", "--dry-run"), ("sql", "--phase", "all")):
        result = bgsync(dsn, args[0], path, *args[1:])
        assert result.code == 0, result.err
        assert "CREATE" in result.out or "INSERT" in result.out
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    assert scalar(dsn, "SELECT to_regclass('public.orders_v2')") is None
    # after prepare, a backfill dry run still copies nothing
    assert bgsync(dsn, "prepare", path).code == 0
    assert bgsync(dsn, "backfill", path, "--dry-run").code == 0
    assert scalar(dsn, "SELECT count(*) FROM public.orders_v2") == 0
    assert scalar(dsn, "SELECT count(*) FROM bgsync.chunks") == 0
