"""Issue 13: the DBA's console. Conventions (version, help, completion, global options), repeats that
are no-ops, refusals in the user's words with the next command, the plan recorded at prepare,
durations with units, no hard wrap, progress that ends at the real total, messages that name the
server, JSON that stays JSON on failure, and no stray warnings. Each test runs the CLI as a user
would (a subprocess), on a real PostgreSQL."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from tests.helpers import PLANS, ROOT, Result, bgsync, load_schema, scalar, seed

UNREACHABLE = "postgresql://nobody@127.0.0.1:1/nowhere"


def accounts_plan(tmp_path: Path, **cutover: object) -> Path:
    plan = yaml.safe_load((PLANS / "accounts_v2.yaml").read_text())
    plan["cutover"] = {**plan.get("cutover", {}), "mode": "rename", **cutover}
    file = tmp_path / "accounts_v2.yaml"
    file.write_text(yaml.safe_dump(plan))
    return file


def libpq_env(dsn: str) -> dict[str, str]:
    """No DSN anywhere: the connection comes from libpq's PG* variables."""
    params = conninfo_to_dict(dsn)
    env = {"BGSYNC_DSN": "", "DATABASE_URL": ""}
    for key, var in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"), ("dbname", "PGDATABASE"),
                     ("password", "PGPASSWORD")):
        if params.get(key):
            env[var] = str(params[key])
    return env


def where(dsn: str) -> tuple[str, str, str]:
    with psycopg.connect(dsn) as conn:
        return conn.info.dbname, conn.info.host, str(conn.info.port)


# -- 1. version, help, completion, global options ------------------------------------------------
def test_version_short_help_and_completion() -> None:
    for flag in ("--version", "-V"):
        result = bgsync("", flag)
        assert result.code == 0, result.err
        assert re.fullmatch(r"bgsync \d+\.\d+\.\d+\S*\n", result.out), result.out
    for args in (("-h",), ("--help",), ("status", "-h"), ("cutover", "--help"), ("plan", "show", "-h")):
        result = bgsync("", *args)
        assert result.code == 0, (args, result.err)
        assert "Usage: bgsync" in result.out, args
    assert "--install-completion" in bgsync("", "--help").out
    # the completion script, as `--install-completion` installs it (asked through Click's variable:
    # `--show-completion` guesses the shell from the process tree, which a test cannot rely on)
    completion = bgsync("", env={"_BGSYNC_COMPLETE": "source_bash"})
    assert completion.code == 0, completion.err
    assert "_BGSYNC_COMPLETE" in completion.out and "complete" in completion.out


def test_plain_bgsync_prints_help_without_an_empty_failure() -> None:
    result = bgsync("")
    assert result.code in (0, 2)
    assert "Usage: bgsync" in result.out + result.err
    assert "FAILED" not in result.out + result.err


def test_global_options_work_before_or_after_the_command(dsn: str) -> None:
    load_schema(dsn)
    no_env = {"BGSYNC_DSN": "", "DATABASE_URL": ""}
    for args in (("--dsn", dsn, "status"), ("status", "--dsn", dsn),
                 ("--dsn", UNREACHABLE, "status", "--dsn", dsn)):          # the command's value wins
        result = bgsync("", *args, env=no_env)
        assert result.code == 0, (args, result.err)
        assert "no migrations" in result.out, args
    plan = str(PLANS / "orders_v2.yaml")
    prepared = bgsync(dsn, "--state-schema", "bgs_state", "prepare", plan)
    assert prepared.code == 0, prepared.err
    assert scalar(dsn, "SELECT to_regnamespace('bgs_state')::text") == "bgs_state"
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    for args in (("--state-schema", "bgs_state", "status", "--json"),
                 ("status", "--json", "--state-schema", "bgs_state"),
                 ("--state-schema", "elsewhere", "status", "--json", "--state-schema", "bgs_state")):
        result = bgsync(dsn, *args)
        assert result.code == 0, (args, result.err)
        assert [m["name"] for m in json.loads(result.out)["migrations"]] == ["orders_v2"], args


# -- 2. help text ------------------------------------------------------------------------------------
COMMANDS = ("", "schema", "init", "validate", "sql", "prepare", "backfill", "verify", "cutover", "rollback",
            "finalize", "status", "run", "demo", "plan", "plan show")


def test_help_has_no_placeholders_and_names_every_choice_and_default() -> None:
    for command in COMMANDS:
        result = bgsync("", *command.split(), "--help")
        assert result.code == 0, (command, result.err)
        assert not re.search(r"<[a-z][a-z ]*>", result.out), (command, result.out)
        assert not re.search(r"\{[a-z_]+\}", result.out), (command, result.out)
    sql = bgsync("", "sql", "--help").out
    phase_help = " ".join(sql.split("--phase", 1)[1].split("--dsn", 1)[0].split())
    for phase in ("prepare", "backfill", "verify", "cutover", "rollback", "finalize", "all"):
        assert phase in phase_help, (phase, phase_help)
    backfill = bgsync("", "backfill", "--help").out
    for option in ("--workers", "--batch-rows", "--max-rows-per-second"):
        line = next(line for line in backfill.splitlines() if option in line)
        assert "plan" in line and "default" in line, line
    cutover = bgsync("", "cutover", "--help").out
    assert "--lock-timeout" in cutover and "200ms" in cutover
    assert "default: bgsync" in bgsync("", "status", "--help").out


# -- 4. repeats are no-ops that say so -----------------------------------------------------------------
def test_repeats_are_no_ops_with_exit_0(dsn: str, tmp_path: Path) -> None:
    plan = str(accounts_plan(tmp_path))
    load_schema(dsn)
    seed(dsn, accounts=500)
    for command in ("prepare", "prepare", "backfill", "verify", "cutover"):
        result = bgsync(dsn, command, plan)
        assert result.code == 0, (command, result.err)
    assert "already prepared" in bgsync(dsn, "prepare", plan).err
    again = bgsync(dsn, "cutover", plan)
    assert again.code == 0, again.err
    assert "already cut over" in again.err and "FAILED" not in again.err
    assert bgsync(dsn, "finalize", plan, "--yes").code == 0
    for command in ("finalize", "cutover"):
        repeat = bgsync(dsn, command, plan, "--yes") if command == "finalize" else bgsync(dsn, command, plan)
        assert repeat.code == 0, (command, repeat.err)
        assert "already" in repeat.err and "finalized" in repeat.err, repeat.err
    orders = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", orders).code == 0
    assert bgsync(dsn, "rollback", orders).code == 0
    twice = bgsync(dsn, "rollback", orders)
    assert twice.code == 0, twice.err
    assert "already rolled back" in twice.err


# -- 5. refusals in the user's words, with the next command ----------------------------------------------
def test_refusals_use_plain_words_and_name_the_next_command(dsn: str, tmp_path: Path) -> None:
    plan = str(accounts_plan(tmp_path))
    load_schema(dsn)
    seed(dsn, accounts=800)

    def refused(command: str, *args: str) -> str:
        result = bgsync(dsn, command, plan, *args)
        assert result.code == 1, (command, result.err)
        assert not re.search(r"\bis (mismatch|reverted|cut_over|rolled_back|backfilling)\b", result.err), result.err
        return result.err

    err = refused("cutover")
    assert "cutover refused" in err and "not prepared" in err and f"run `bgsync prepare {plan}`" in err
    assert bgsync(dsn, "prepare", plan).code == 0
    err = refused("cutover")
    assert "prepared, not backfilled yet" in err and f"run `bgsync backfill {plan}`" in err
    err = refused("verify")
    assert "not backfilled yet" in err and f"bgsync backfill {plan}" in err
    assert bgsync(dsn, "backfill", plan).code == 0
    err = refused("cutover")
    assert "not verified yet" in err and f"run `bgsync verify {plan}`" in err
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM public.accounts_v2 WHERE id = 42")
    assert bgsync(dsn, "verify", plan).code == 1
    err = refused("cutover")
    assert "the last verify found 1 row that differs" in err and f"run `bgsync verify {plan} --repair`" in err
    err = refused("finalize", "--yes")
    assert "finalize runs after cutover" in err and f"bgsync verify {plan} --repair" in err
    assert bgsync(dsn, "verify", plan, "--repair").code == 0
    assert bgsync(dsn, "cutover", plan).code == 0
    assert "last verify: parity" in bgsync(dsn, "status").out
    assert bgsync(dsn, "rollback", plan).code == 0
    status = bgsync(dsn, "status")
    assert status.code == 0, status.err
    assert "rolled back after cutover" in status.out
    verify_line = next(line for line in status.out.splitlines() if "last verify" in line)
    assert "never run since the rollback" in verify_line, verify_line
    assert "before the rollback: parity" in verify_line, verify_line
    report = json.loads(bgsync(dsn, "status", "--json").out)["migrations"][0]
    assert report["verify"] is None and report["verify_before_rollback"]["passed"] is True
    err = refused("cutover")
    assert "rolled back after cutover" in err and f"run `bgsync verify {plan}`" in err
    assert bgsync(dsn, "verify", plan).code == 0
    assert "last verify: parity" in bgsync(dsn, "status").out


# -- 6. validate refuses an edited plan; `plan show` prints the recorded one ------------------------------
def test_validate_refuses_an_edited_plan_and_plan_show_restores_it(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    original = (PLANS / "orders_v2.yaml").read_text()
    path = tmp_path / "orders_v2.yaml"
    path.write_text(original)
    assert bgsync(dsn, "prepare", str(path)).code == 0
    path.write_text(original.replace("round(total_amount)::integer", "trunc(total_amount)::integer"))
    edited = bgsync(dsn, "validate", str(path))
    assert edited.code == 1, edited.err
    assert "edited after prepare" in edited.err and "columns[2].reverse" in edited.err
    assert "bgsync plan show orders_v2" in edited.err
    shown = bgsync(dsn, "plan", "show", "orders_v2")
    assert shown.code == 0, shown.err
    assert shown.out == original
    path.write_text(shown.out)
    assert bgsync(dsn, "validate", str(path)).code == 0
    missing = bgsync(dsn, "plan", "show", "no_such_plan")
    assert missing.code == 2 and "no_such_plan" in missing.err
    # a journal written before plans were recorded in full still shows the plan's structure
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE bgsync.migrations DROP COLUMN plan_source")
    old = bgsync(dsn, "plan", "show", "orders_v2")
    assert old.code == 0, old.err
    from orchestrator.plan import parse_plan

    assert parse_plan(yaml.safe_load(old.out)).structural_hash() == \
        parse_plan(yaml.safe_load(original)).structural_hash()


# -- 7. durations need a unit ------------------------------------------------------------------------------
def test_durations_need_a_unit(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    plan = str(PLANS / "orders_v2.yaml")
    result = bgsync(dsn, "cutover", plan, "--lock-timeout", "2")
    assert result.code == 2, result.err
    assert "--lock-timeout" in result.err and "unit" in result.err
    data = yaml.safe_load((PLANS / "orders_v2.yaml").read_text())
    for value in (2, "2", 2.5):
        data["cutover"]["lock_timeout"] = value
        file = tmp_path / "unitless.yaml"
        file.write_text(yaml.safe_dump(data))
        invalid = bgsync(dsn, "validate", str(file))
        assert invalid.code == 2, (value, invalid.err)
        assert "cutover.lock_timeout" in invalid.err and "unit" in invalid.err, invalid.err
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None
    printed = bgsync(dsn, "cutover", plan, "--lock-timeout", "250ms", "--dry-run")
    assert printed.code == 0, printed.err
    assert "SET LOCAL lock_timeout = '250ms';" in printed.out


@pytest.mark.parametrize("text", ["100us", "200ms", "2s", "1min", "1h", "1d", "1.5s", " 3 s "])
def test_postgresql_duration_units_are_accepted(text: str) -> None:
    from orchestrator.plan import parse_duration

    assert parse_duration(text) == text.strip()


@pytest.mark.parametrize("text", ["2", "0", "2 parsecs", "s", "2sec", "-1s", ""])
def test_durations_without_a_postgresql_unit_are_refused(text: str) -> None:
    from orchestrator.plan import parse_duration

    with pytest.raises(ValueError, match="unit"):
        parse_duration(text)


# -- 8. no hard wrap, progress ends at the real total ---------------------------------------------------------
def test_log_lines_are_not_wrapped_outside_a_terminal(dsn: str) -> None:
    load_schema(dsn)
    result = bgsync(dsn, "prepare", str(PLANS / "orders_v2.yaml"), env={"COLUMNS": ""})
    assert result.code == 0, result.err
    line = next(line for line in result.err.splitlines() if line.startswith("prepared orders_v2"))
    assert line.rstrip().endswith('on "public"."orders"'), result.err


def _final_progress(err: str) -> tuple[str, str]:
    found = re.findall(r"([\d,]+)/([\d,]+) rows", err)
    assert found, err
    return found[-1]


def test_backfill_progress_ends_at_the_real_total(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=9_000, accounts=3_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE public.orders SET (autovacuum_enabled = false)")
        conn.execute("ALTER TABLE public.accounts SET (autovacuum_enabled = false)")
        conn.execute("ANALYZE public.orders")
        conn.execute("ANALYZE public.accounts")
        conn.execute("DELETE FROM public.orders WHERE id % 3 = 0")              # estimate 9,000; real 6,000
        conn.execute("INSERT INTO public.accounts (email) SELECT 'more' || g FROM generate_series(1, 2000) g")
    orders = str(PLANS / "orders_v2.yaml")
    assert bgsync(dsn, "prepare", orders).code == 0
    short = bgsync(dsn, "backfill", orders, "--batch-rows", "1000", "--workers", "2")
    assert short.code == 0, short.err
    assert _final_progress(short.err) == ("6,000", "6,000"), short.err
    accounts = str(accounts_plan(tmp_path))
    assert bgsync(dsn, "prepare", accounts).code == 0
    past = bgsync(dsn, "backfill", accounts, "--batch-rows", "500", "--workers", "2")
    assert past.code == 0, past.err
    assert _final_progress(past.err) == ("5,000", "5,000"), past.err


# -- 9. messages name the server, the database and where the connection came from ------------------------------
def test_messages_name_the_server_database_and_the_connection_source(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    dbname, host, port = where(dsn)
    env = libpq_env(dsn)
    data = yaml.safe_load((PLANS / "orders_v2.yaml").read_text())
    data["source"], data["target"] = "shop.orders", "shop.orders_v2"
    plan = tmp_path / "shop.yaml"
    plan.write_text(yaml.safe_dump(data))
    missing = bgsync("", "validate", str(plan), env=env)
    assert missing.code == 2, missing.err
    assert f"table shop.orders does not exist in database {dbname} on {host}:{port}" in missing.err
    assert "libpq defaults" in missing.err
    given = bgsync("", "validate", str(plan), "--dsn", dsn, env={"BGSYNC_DSN": ""})
    assert given.code == 2 and "connection from --dsn" in given.err, given.err
    assert "connection from BGSYNC_DSN" in bgsync(dsn, "validate", str(plan)).err
    unreachable = bgsync("", "status", env={**env, "PGPORT": "1", "PGHOST": "127.0.0.1"})
    assert unreachable.code == 3 and "libpq defaults" in unreachable.err, unreachable.err

    init = bgsync("", "init", "orders_archive", env=env)
    assert init.code == 2, init.err
    assert f"table orders_archive does not exist in database {dbname} on {host}:{port}" in init.err
    assert "(searched schemas: public)" in init.err and "give schema.table" in init.err
    assert "invalid plan" not in init.err
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA shop; CREATE TABLE shop.orders (id bigint PRIMARY KEY, note text)")
    scaffold = bgsync(dsn, "init", "shop.orders")
    assert scaffold.code == 0, scaffold.err
    assert "\nsource: shop.orders\n" in scaffold.out and "\ntarget: shop.orders_v2\n" in scaffold.out

    data = yaml.safe_load((PLANS / "orders_v2.yaml").read_text())
    del data["key"]
    data["columns"][0]["from"] = "id + 0"
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text(yaml.safe_dump(data))
    refused = bgsync(dsn, "validate", str(keyed))
    assert refused.code == 2, refused.err
    assert "key column id must be copied unchanged from blue" in refused.err
    assert "remove `from`" in refused.err and "columns[0].from" in refused.err
    data["key"] = ["id"]
    keyed.write_text(yaml.safe_dump(data))
    explicit = bgsync(dsn, "validate", str(keyed))
    assert explicit.code == 2 and "key column id must be copied unchanged from blue" in explicit.err, explicit.err


# -- 10. JSON stays JSON; a declined prompt is a cancellation, not a failure -------------------------------------
def test_status_json_is_an_error_object_on_any_failure(tmp_path: Path, dsn: str) -> None:
    down = bgsync(UNREACHABLE, "status", "--json")
    assert down.code == 3
    error = json.loads(down.out)["error"]
    assert "cannot connect" in error["message"] and error["exit_code"] == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: Not-A-Name\n")
    invalid = bgsync(dsn, "status", str(bad), "--json")
    assert invalid.code == 2
    assert "invalid plan" in json.loads(invalid.out)["error"]["message"]
    load_schema(dsn)
    assert bgsync(dsn, "prepare", str(PLANS / "orders_v2.yaml")).code == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER bgsync_orders_v2_fwd_del ON public.orders")
    drift = bgsync(dsn, "status", "--json")
    assert drift.code == 1
    report = json.loads(drift.out)
    assert report["migrations"][0]["drift"] and "drift" in report["error"]["message"]


def _run_on_a_terminal(dsn: str, *args: str, answer: bytes) -> Result:
    """Run bgsync with a pseudo-terminal as stdin, typing `answer` at its prompt."""
    master, slave = pty.openpty()
    env = {**os.environ, "BGSYNC_DSN": dsn, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    os.close(slave)
    try:
        os.write(master, answer)
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return Result(proc.returncode, out, err)


def test_declining_finalize_cancels_without_a_failure(dsn: str, tmp_path: Path) -> None:
    plan = str(accounts_plan(tmp_path))
    load_schema(dsn)
    seed(dsn, accounts=300)
    for command in ("prepare", "backfill", "verify", "cutover"):
        assert bgsync(dsn, command, plan).code == 0, command
    declined = _run_on_a_terminal(dsn, "finalize", plan, answer=b"n\n")
    assert declined.code == 1, declined.err
    assert "finalize cancelled; nothing was changed" in declined.err
    assert "FAILED" not in declined.err
    assert scalar(dsn, "SELECT to_regclass('public.accounts_old')::text") == "accounts_old"
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
    confirmed = _run_on_a_terminal(dsn, "finalize", plan, answer=b"y\n")
    assert confirmed.code == 0, confirmed.err
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "finalized"


# -- 11. no RuntimeDirWarning from the embedded server -----------------------------------------------------------
def _without_runtime_dir() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "BGSYNC_TEST_DSN")}
    return {**env, "PYTHONWARNINGS": "default"}


def test_embedded_server_starts_without_a_runtime_dir_warning() -> None:
    code = ("from orchestrator.embedded import embedded_server\n"
            "with embedded_server() as server:\n"
            "    print(server.dsn)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=_without_runtime_dir())
    assert proc.returncode == 0, proc.stderr
    assert "XDG_RUNTIME_DIR" not in proc.stderr and "RuntimeDirWarning" not in proc.stderr, proc.stderr


def test_one_database_test(dsn: str) -> None:
    """A minimal database test, also run by the next test in a pytest of its own."""
    assert scalar(dsn, "SELECT 1") == 1


def test_pytest_shows_no_runtime_dir_warning() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_console.py::test_one_database_test"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=_without_runtime_dir())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RuntimeDirWarning" not in proc.stdout + proc.stderr, proc.stdout
