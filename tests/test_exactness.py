"""Issue 8: green equals blue, verify says so only when it is true, rollback loses nothing.

Each test reproduces one case that broke the promise, with real writers on a real server, and checks
the result with an independent text EXCEPT ALL (`text_diff`), never with bgsync's own verify alone."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from tests.helpers import bgsync, scalar, scalars, spawn_bgsync, text_diff, wait_for

DOC = """
CREATE TABLE public.doc (id int PRIMARY KEY, body text NOT NULL, n int);
INSERT INTO public.doc SELECT g, 'body ' || g, g FROM generate_series(1, 3000) g;
ANALYZE public.doc;
"""
DOC_PLAN: dict[str, Any] = {
    "name": "doc_v2", "source": "public.doc",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "body", "type": "text", "not_null": True},
                {"name": "n", "type": "bigint"}],
    "backfill": {"workers": 2, "batch_rows": 500},
}
DOC_BLUE = "SELECT id::bigint, body, n::bigint FROM public.{}"
DOC_GREEN = "SELECT id, body, n FROM public.{}"


def write_plan(tmp_path: Path, plan: dict[str, Any], name: str = "plan.yaml") -> Path:
    file = tmp_path / name
    file.write_text(yaml.safe_dump(plan, sort_keys=False))
    return file


def run_ok(dsn: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = bgsync(dsn, *args, env=env)
    assert result.code == 0, (args, result.out, result.err)
    return result.out


def setup(dsn: str, schema_sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(schema_sql)


def doc_diff(dsn: str, blue: str = "doc", green: str = "doc_v2") -> list[tuple[object, ...]]:
    return text_diff(dsn, DOC_BLUE.format(blue), DOC_GREEN.format(green))


# -- 1. a REPEATABLE READ writer whose snapshot predates the backfill ------------------------------
@contextmanager
def rr_app_older_than_the_backfill(dsn: str, tmp_path: Path) -> Iterator[tuple[Path, psycopg.Connection[Any]]]:
    """A REPEATABLE READ session ("rr app") whose snapshot was taken before the backfill ran: (plan, session)."""
    setup(dsn, DOC)
    plan = write_plan(tmp_path, DOC_PLAN)
    run_ok(dsn, "prepare", str(plan))
    with psycopg.connect(dsn, application_name="rr app") as app:
        app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        app.execute("SELECT count(*) FROM public.doc")          # the snapshot is taken here
        run_ok(dsn, "backfill", str(plan))
        yield plan, app


def test_repeatable_read_writer_older_than_the_backfill_leaves_no_ghost(dsn: str, tmp_path: Path) -> None:
    with rr_app_older_than_the_backfill(dsn, tmp_path) as (plan, app):
        proc = spawn_bgsync(dsn, "verify", str(plan), "--json")
        # verify sees a session whose snapshot is older than the backfill, names it and waits
        wait_for(lambda: bool(scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE phase = 'verify' "
                                          "AND outcome = 'waiting' AND detail LIKE '%%rr app%%'")), timeout=30)
        app.execute("DELETE FROM public.doc WHERE id = 5")
        app.execute("UPDATE public.doc SET id = 5000 WHERE id = 6")
        app.commit()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    found = {(m["kind"], tuple(m["key"])) for m in json.loads(out)["mismatches"]}
    assert found == {("extra_in_green", ("5",)), ("extra_in_green", ("6",))}
    repaired = bgsync(dsn, "verify", str(plan), "--repair")
    assert repaired.code == 0, repaired.out + repaired.err
    assert doc_diff(dsn) == []
    run_ok(dsn, "cutover", str(plan))
    assert scalars(dsn, "SELECT id FROM public.doc WHERE id IN (5, 6, 5000) ORDER BY id") == [5000]
    assert doc_diff(dsn, "doc_old", "doc") == []


def test_repeatable_read_writer_older_than_the_backfill_that_ended_before_verify(dsn: str, tmp_path: Path) -> None:
    """The same writer, committed before verify begins: nothing is left to wait for, and the row it left
    behind in green is found by the comparison and repaired."""
    with rr_app_older_than_the_backfill(dsn, tmp_path) as (plan, app):
        app.execute("DELETE FROM public.doc WHERE id = 7")
        app.commit()
    found = bgsync(dsn, "verify", str(plan), "--json")
    assert found.code == 1, found.err
    assert "waiting for" not in found.err
    assert [(m["kind"], m["key"]) for m in json.loads(found.out)["mismatches"]] == [("extra_in_green", ["7"])]
    repaired = bgsync(dsn, "verify", str(plan), "--repair")
    assert repaired.code == 0, repaired.out + repaired.err
    assert doc_diff(dsn) == []


# -- 2. one statement, several events on one key -----------------------------------------------
MULTI_EVENT = [
    # delete a key and move another row onto it
    """WITH d AS (DELETE FROM public.{t} WHERE id = 8 RETURNING id)
       UPDATE public.{t} SET id = 8, body = 'moved from 9' WHERE id = 9 AND EXISTS (SELECT FROM d)""",
    # delete a key and insert it again with other values
    """WITH d AS (DELETE FROM public.{t} WHERE id = 20 RETURNING id)
       INSERT INTO public.{t} (id, body, n) SELECT id, 'reborn', -1 FROM d""",
    # re-key a row onto a key the same statement deleted, the other way round
    """WITH u AS (UPDATE public.{t} SET id = 31, body = 'was 30' WHERE id = 30 RETURNING id)
       DELETE FROM public.{t} WHERE id = 31""",
    # MERGE: update, delete and insert in one statement
    """MERGE INTO public.{t} AS t
       USING (VALUES (40, 'merged'), (41, NULL), (9041, 'new by merge')) AS s(id, body) ON t.id = s.id
       WHEN MATCHED AND s.body IS NULL THEN DELETE
       WHEN MATCHED THEN UPDATE SET body = s.body
       WHEN NOT MATCHED THEN INSERT (id, body, n) VALUES (s.id, s.body, 0)""",
    # INSERT ... ON CONFLICT on existing and new keys
    """INSERT INTO public.{t} (id, body, n) VALUES (50, 'upserted', 1), (9050, 'inserted', 2)
       ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body""",
    # a row moves onto the key of a row the same statement moves away
    """WITH a AS (UPDATE public.{t} SET id = 61, body = 'was 60' WHERE id = 60 RETURNING id)
       UPDATE public.{t} SET id = 9060, body = 'was 61' WHERE id = 61""",
]


def test_statements_with_several_events_on_one_key(dsn: str, tmp_path: Path) -> None:
    setup(dsn, DOC)
    plan = write_plan(tmp_path, DOC_PLAN)
    for command in ("prepare", "backfill", "verify"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in MULTI_EVENT:
            conn.execute(statement.format(t="doc"))
    assert doc_diff(dsn) == []
    assert scalar(dsn, "SELECT body FROM public.doc_v2 WHERE id = 8") == "moved from 9"
    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "cutover", str(plan))
    # the same statements on the live table (green): the reverse sync keeps blue exact
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.doc SET id = id + 100000 WHERE id >= 8")
        conn.execute("INSERT INTO public.doc SELECT g, 'b' || g, g FROM generate_series(8, 70) g")
        for statement in MULTI_EVENT:
            conn.execute(statement.format(t="doc"))
    assert doc_diff(dsn, "doc_old", "doc") == []
    run_ok(dsn, "rollback", str(plan))
    assert doc_diff(dsn) == []


def test_statements_with_several_events_on_one_key_in_the_two_way_window(dsn: str, tmp_path: Path) -> None:
    """The window's sync inserts without an upsert where the target lacks the keys (an upsert would fire
    the target's UPDATE triggers too): a statement that deletes and re-inserts a key must still land."""
    setup(dsn, DOC)
    plan = write_plan(tmp_path, {**DOC_PLAN, "versions": {"blue": "doc_old_release", "green": "doc_new_release"}})
    for command in ("prepare", "backfill", "verify", "expose"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in MULTI_EVENT:                      # on blue, mirrored forward
            conn.execute(statement.format(t="doc"))
        assert doc_diff(dsn) == []
        conn.execute("UPDATE public.doc_v2 SET id = id + 100000 WHERE id >= 8")
        conn.execute("INSERT INTO public.doc_v2 SELECT g, 'g' || g, g FROM generate_series(8, 70) g")
        for statement in MULTI_EVENT:                      # on green, mirrored back
            conn.execute(statement.format(t="doc_v2"))
    assert doc_diff(dsn) == []
    assert scalar(dsn, "SELECT body FROM public.doc WHERE id = 8") == "moved from 9"
    assert scalar(dsn, "SELECT body FROM public.doc WHERE id = 20") == "reborn"
    run_ok(dsn, "cutover", str(plan))
    run_ok(dsn, "rollback", str(plan))
    assert doc_diff(dsn) == []


# A user's AFTER ROW trigger fires before any AFTER STATEMENT trigger of the same statement, and AFTER
# STATEMENT triggers fire in name order: the user's triggers below change or delete the rows a statement
# wrote before bgsync's statement trigger runs (their own statements are synced first, at their end), so
# the statement's transition table no longer holds the rows as they are.
AFTER_WRITE_TRIGGERS = """
CREATE FUNCTION public.doc_after_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.body = 'drop me' THEN
        DELETE FROM public.{t} WHERE id = NEW.id;
    ELSIF NEW.n >= 0 AND NEW.n < 1000000 THEN
        UPDATE public.{t} SET n = NEW.n + 1000000 WHERE id = NEW.id;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER doc_after_row AFTER INSERT OR UPDATE OF body ON public.{t}
    FOR EACH ROW EXECUTE FUNCTION public.doc_after_row();
CREATE FUNCTION public.doc_after_statement() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE public.{t} SET body = body || ' (seen)' WHERE body LIKE 'stamp%' AND body NOT LIKE '%(seen)';
    RETURN NULL;
END $$;
CREATE TRIGGER aaa_doc_after_statement AFTER INSERT ON public.{t}
    FOR EACH STATEMENT EXECUTE FUNCTION public.doc_after_statement();
"""
AFTER_WRITES = [
    "INSERT INTO public.{t} (id, body, n) SELECT g, 'inserted', g FROM generate_series(5001, 5010) g",
    "INSERT INTO public.{t} (id, body, n) VALUES (5020, 'drop me', 1), (5021, 'stamp me', -5)",
    "UPDATE public.{t} SET body = 'drop me' WHERE id BETWEEN 100 AND 104",
    "UPDATE public.{t} SET body = 'renamed' WHERE id BETWEEN 200 AND 204",
]


@pytest.mark.parametrize("mode", ["bulk", "direct", "window"])
def test_user_triggers_that_change_the_written_rows_leave_green_exact(dsn: str, tmp_path: Path, mode: str) -> None:
    """The sync writes the rows as the source holds them when it runs, not as the statement wrote them
    (one-way after either backfill mode, and in the two-way window of expose)."""
    setup(dsn, DOC)
    versions = {"versions": {"blue": "doc_old_release", "green": "doc_new_release"}} if mode == "window" else {}
    plan = write_plan(tmp_path, {**DOC_PLAN, "backfill": {**DOC_PLAN["backfill"],
                                                          "mode": "direct" if mode == "direct" else "bulk"},
                                 **versions})
    for command in ("prepare", "backfill", "verify", *(["expose"] if mode == "window" else [])):
        run_ok(dsn, command, str(plan))
    setup(dsn, AFTER_WRITE_TRIGGERS.format(t="doc"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in AFTER_WRITES:
            conn.execute(statement.format(t="doc"))
    assert scalar(dsn, "SELECT n FROM public.doc WHERE id = 5001") == 1005001        # the triggers ran
    assert scalar(dsn, "SELECT count(*) FROM public.doc WHERE body = 'drop me'") == 0
    assert scalar(dsn, "SELECT body FROM public.doc WHERE id = 5021") == "stamp me (seen)"
    assert doc_diff(dsn) == []
    if mode != "window":
        run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "cutover", str(plan))              # the triggers come along; the reverse sync reads green
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in AFTER_WRITES:                  # the same writes on other keys
            conn.execute(statement.format(t="doc").replace("50", "60")
                         .replace("BETWEEN 100 AND 104", "BETWEEN 300 AND 304")
                         .replace("BETWEEN 200 AND 204", "BETWEEN 400 AND 404"))
    assert scalar(dsn, "SELECT n FROM public.doc WHERE id = 6001") == 1006001
    assert doc_diff(dsn, "doc_old", "doc") == []


# A REPEATABLE READ transaction still sees a row that another transaction deleted after its snapshot; it
# may then write that key again (the delete committed, so no unique check stops it). Reading the source
# by key, the sync finds two rows: the other transaction's deleted one and its own. Each case: the other
# transaction's delete, then the writes of the REPEATABLE READ one, and whether they must succeed.
REUSED_KEYS = [
    ("DELETE FROM public.{t} WHERE id = 11", ["INSERT INTO public.{t} (id, body, n) VALUES (11, 'reused', -11)"],
     True),
    ("DELETE FROM public.{t} WHERE id = 13", ["UPDATE public.{t} SET id = 13, body = 'moved onto 13' WHERE id = 14"],
     True),
    ("DELETE FROM public.{t} WHERE id = 16", ["INSERT INTO public.{t} (id, body, n) VALUES (16, 'reused', -16), "
                                              "(9016, 'new', 0) ON CONFLICT (id) DO UPDATE SET body = 'upserted'"],
     True),
    # the key written again leaves once more (by a statement that does not find the deleted row: one that
    # does fails with a serialization error); the sync's DELETE in the target may find the target's deleted
    # row and fail the same way, which the application retries, but never leaves the key behind
    ("DELETE FROM public.{t} WHERE id = 12", ["INSERT INTO public.{t} (id, body, n) VALUES (12, 'again', -12)",
                                              "DELETE FROM public.{t} WHERE body = 'again' AND n = -12"], False),
    ("DELETE FROM public.{t} WHERE id = 15", ["INSERT INTO public.{t} (id, body, n) VALUES (15, 'again', -15)",
                                              "UPDATE public.{t} SET id = 9015 WHERE body = 'again' AND n = -15"],
     False),
]


@pytest.mark.parametrize("mode", ["direct", "window"])
def test_repeatable_read_writer_reusing_a_key_another_transaction_deleted(dsn: str, tmp_path: Path,
                                                                          mode: str) -> None:
    """The sync writes the rows this transaction wrote, never the older row its snapshot still shows, and
    a key it wrote and then removed leaves the target: forward before the cutover, reverse after it."""
    setup(dsn, DOC)
    versions = {"versions": {"blue": "doc_old_release", "green": "doc_new_release"}} if mode == "window" else {}
    plan = write_plan(tmp_path, {**DOC_PLAN, **versions})
    for command in ("prepare", "backfill", "verify", *(["expose"] if mode == "window" else [])):
        run_ok(dsn, command, str(plan))

    def reuse(offset: int, blue: str, green: str) -> None:
        for deleted, writes, must_land in REUSED_KEYS:
            with psycopg.connect(dsn) as app, psycopg.connect(dsn, autocommit=True) as other:
                app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
                app.execute("SELECT count(*) FROM public.doc")                 # the snapshot
                other.execute(_offset(deleted.format(t="doc"), offset))
                try:
                    for write in writes:
                        app.execute(_offset(write.format(t="doc"), offset))
                    app.commit()
                except psycopg.errors.SerializationFailure:
                    # the two-way window mirrors an UPDATE as an UPDATE, which finds the target's deleted row
                    assert not must_land or (mode == "window" and writes[0].startswith("UPDATE")), writes
                    app.rollback()
            assert doc_diff(dsn, blue, green) == [], (deleted, writes)

    reuse(0, "doc", "doc_v2")
    assert scalars(dsn, "SELECT body FROM public.doc WHERE id IN (11, 16, 9016) ORDER BY id") == [
        "reused", "reused", "new"]
    if mode != "window":
        assert scalar(dsn, "SELECT body FROM public.doc WHERE id = 13") == "moved onto 13"
        run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "cutover", str(plan))
    reuse(100, "doc_old", "doc")                   # on green, the live table now: the reverse sync
    assert scalars(dsn, "SELECT body FROM public.doc WHERE id IN (111, 116, 9116) ORDER BY id") == [
        "reused", "reused", "new"]
    assert doc_diff(dsn, "doc_old", "doc") == []


SHOUT = """
CREATE FUNCTION public.shout_body() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.body := upper(NEW.body); RETURN NEW; END $$;
CREATE TRIGGER shout_body BEFORE INSERT OR UPDATE ON public.doc_v2 FOR EACH ROW EXECUTE FUNCTION public.shout_body();
"""


@pytest.mark.parametrize("isolation", ["read committed", "repeatable read"])
@pytest.mark.parametrize("mode", ["direct", "window"])
def test_a_trigger_created_after_a_writer_began_is_honoured(dsn: str, tmp_path: Path, mode: str,
                                                            isolation: str) -> None:
    """Triggers created after a writer's session cached the sync's plans, and after a REPEATABLE READ
    writer took its snapshot (which does not show them in pg_trigger), still decide what the sync does:
    a user's AFTER ROW trigger on blue changes the rows the statement wrote (green gets them as changed),
    and in the window a BEFORE trigger on green changes mirrored rows (blue gets them back)."""
    setup(dsn, DOC)
    versions = {"versions": {"blue": "doc_old_release", "green": "doc_new_release"}} if mode == "window" else {}
    plan = write_plan(tmp_path, {**DOC_PLAN, "backfill": {**DOC_PLAN["backfill"], "mode": "direct"}, **versions})
    for command in ("prepare", "backfill", "verify", *(["expose"] if mode == "window" else [])):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn) as app, psycopg.connect(dsn, autocommit=True) as other:
        app.execute("UPDATE public.doc SET body = 'warm ' || id WHERE id <= 20")     # plans cached in this session
        app.execute("INSERT INTO public.doc (id, body, n) VALUES (4001, 'warm', 1)")
        app.commit()
        app.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ if isolation == "repeatable read" else None
        assert app.execute("SELECT current_setting('transaction_isolation')").fetchone() == (isolation,)
        other.execute(AFTER_WRITE_TRIGGERS.format(t="doc"))
        if mode == "window":
            other.execute(SHOUT)
        app.execute("UPDATE public.doc SET body = 'changed ' || id WHERE id BETWEEN 100 AND 140")
        app.execute("INSERT INTO public.doc (id, body, n) SELECT g, 'new ' || g, g FROM generate_series(5001, 5030) g")
        app.execute("UPDATE public.doc SET body = 'drop me' WHERE id BETWEEN 200 AND 204")
        app.commit()
    assert scalar(dsn, "SELECT n FROM public.doc WHERE id = 120") == 1000120           # the AFTER ROW trigger ran
    assert scalar(dsn, "SELECT n FROM public.doc WHERE id = 5010") == 1005010
    assert scalar(dsn, "SELECT count(*) FROM public.doc WHERE id BETWEEN 200 AND 204") == 0
    if mode == "window":                                                             # and green's BEFORE trigger
        assert scalar(dsn, "SELECT body FROM public.doc WHERE id = 120") == "CHANGED 120"
    assert doc_diff(dsn) == []


def _offset(statement: str, offset: int) -> str:
    """The statement on keys `offset` higher (ids 11..16 and 9015/9016 become 111..116 and 9115/9116)."""
    return re.sub(r"\b(1[1-6]|901[56])\b", lambda key: str(int(key.group()) + offset), statement)


TREE = """
CREATE TABLE public.tree (id int PRIMARY KEY, parent int REFERENCES public.tree (id) ON UPDATE CASCADE, body text);
INSERT INTO public.tree SELECT g, CASE WHEN g > 10 THEN g % 10 + 1 END, 'b' || g FROM generate_series(1, 500) g;
"""


def test_a_self_referencing_key_rekeys_in_every_phase(dsn: str, tmp_path: Path) -> None:
    """A foreign key on the table itself is checked at commit on whichever table the sync writes (it writes a
    changed key in two statements, and the children it re-points come after the first), and as blue's was on
    a table only applications write: re-keying a parent whose children follow by ON UPDATE CASCADE syncs
    exactly before cutover, after it, in the window of expose through either release, and after rollbacks;
    each table ends with blue's timing once it is no longer written by the sync."""
    setup(dsn, TREE)
    plan = write_plan(tmp_path, {"name": "tree_v2", "source": "public.tree",
                                 "columns": [{"name": "id", "type": "bigint", "not_null": True},
                                             {"name": "parent", "type": "bigint"}, {"name": "body", "type": "text"}],
                                 "backfill": {"workers": 2, "batch_rows": 100},
                                 "versions": {"blue": "tree_old_release", "green": "tree_new_release"}})
    said = bgsync(dsn, "validate", str(plan))
    assert said.code == 0 and "foreign key tree_parent_fkey references the table itself" not in said.out + said.err
    for command in ("prepare", "backfill", "verify"):
        run_ok(dsn, command, str(plan))

    def timing(table: str) -> dict[str, tuple[bool, bool]]:
        with psycopg.connect(dsn) as conn:
            return {str(r[0]): (bool(r[1]), bool(r[2])) for r in conn.execute(
                "SELECT conname, condeferrable, condeferred FROM pg_constraint "
                "WHERE contype = 'f' AND conrelid = %s::regclass", [table])}

    def tree_diff(blue: str, green: str) -> list[tuple[object, ...]]:
        return text_diff(dsn, f"SELECT id::bigint, parent::bigint, body FROM public.{blue}",
                         f"SELECT id, parent, body FROM public.{green}")

    def rekey(parent: int, through: str = "public.tree") -> None:
        children = scalar(dsn, "SELECT count(*) FROM public.tree WHERE parent = %s", [parent])
        assert isinstance(children, int) and children > 40
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"UPDATE {through} SET id = id + 1000, body = 'rekeyed' WHERE id = %s", [parent])
        assert scalar(dsn, "SELECT count(*) FROM public.tree WHERE parent = %s", [parent + 1000]) == children

    blue_timing = {"tree_parent_fkey": (False, False)}
    target_timing = {"tree_parent_fkey": (True, True)}
    assert timing("public.tree_v2") == target_timing
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.tree VALUES (600, NULL, 'root'), (601, 600, 'leaf')")
        conn.execute("UPDATE public.tree SET body = 'moved' WHERE id BETWEEN 20 AND 40")
        conn.execute("DELETE FROM public.tree WHERE id BETWEEN 300 AND 309 AND parent <> 1")
        conn.execute("UPDATE public.tree SET id = id + 1000, parent = parent + 1000 WHERE id IN (2, 11, 21)")
    rekey(1)                                           # the children follow, on blue and on green
    assert tree_diff("tree", "tree_v2") == []

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE bgsync.migrations DROP COLUMN self_keys")   # a journal from before the record
        # a second key on the table itself, added after the backfill (green takes it at cutover), with
        # another timing of blue's
        conn.execute("ALTER TABLE public.tree ADD CONSTRAINT tree_parent_twin FOREIGN KEY (parent) "
                     "REFERENCES public.tree (id) ON UPDATE CASCADE DEFERRABLE INITIALLY IMMEDIATE")
    blue_timing["tree_parent_twin"], target_timing["tree_parent_twin"] = (True, False), (True, True)
    run_ok(dsn, "cutover", str(plan))                  # green live; blue written by the sync
    assert (timing("public.tree"), timing("public.tree_old")) == (blue_timing, target_timing)
    rekey(3)
    assert tree_diff("tree_old", "tree") == []
    run_ok(dsn, "rollback", str(plan))
    assert (timing("public.tree"), timing("public.tree_v2")) == (blue_timing, target_timing)
    rekey(4)
    assert tree_diff("tree", "tree_v2") == []

    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "expose", str(plan))                   # both tables written by the sync
    assert (timing("public.tree"), timing("public.tree_v2")) == (target_timing, target_timing)
    rekey(6, "tree_old_release.tree")
    rekey(7, "tree_new_release.tree")
    assert tree_diff("tree", "tree_v2") == []
    run_ok(dsn, "rollback", str(plan))                 # the window closes before cutover
    assert (timing("public.tree"), timing("public.tree_v2")) == (blue_timing, target_timing)
    rekey(8)
    assert tree_diff("tree", "tree_v2") == []

    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "expose", str(plan))
    run_ok(dsn, "cutover", str(plan))                  # the window stays open: both still written by the sync
    assert (timing("public.tree"), timing("public.tree_old")) == (target_timing, target_timing)
    rekey(9, "tree_old_release.tree")
    rekey(10, "tree_new_release.tree")
    assert tree_diff("tree_old", "tree") == []
    run_ok(dsn, "rollback", str(plan))
    assert (timing("public.tree"), timing("public.tree_v2")) == (blue_timing, target_timing)
    rekey(1001)
    assert tree_diff("tree", "tree_v2") == []

    run_ok(dsn, "verify", str(plan))
    run_ok(dsn, "expose", str(plan))
    run_ok(dsn, "cutover", str(plan))
    run_ok(dsn, "finalize", str(plan), "--yes")
    assert timing("public.tree") == blue_timing        # one table again: as before the migration
    rekey(5)


RESTRICTED_TREE = """
CREATE TABLE public.tree (id int PRIMARY KEY,
                          parent int REFERENCES public.tree (id) ON UPDATE CASCADE ON DELETE RESTRICT, body text);
INSERT INTO public.tree SELECT g, CASE WHEN g > 10 THEN g % 10 + 1 END, 'b' || g FROM generate_series(1, 200) g;
"""


def test_a_restricting_self_referencing_key_fails_a_rekey_cleanly(dsn: str, tmp_path: Path) -> None:
    """ON DELETE RESTRICT is checked at once even when deferred: the sync's DELETE of a re-keyed parent's old
    key fails while its children still name it, and the application's statement fails with it, nothing half
    written (the README's limitation, and validate's note)."""
    setup(dsn, RESTRICTED_TREE)
    plan = write_plan(tmp_path, {"name": "tree_v2", "source": "public.tree",
                                 "columns": [{"name": "id", "type": "bigint", "not_null": True},
                                             {"name": "parent", "type": "bigint"}, {"name": "body", "type": "text"}]})
    said = bgsync(dsn, "validate", str(plan))
    assert said.code == 0 and "foreign key tree_parent_fkey references the table itself" in said.out + said.err
    for command in ("prepare", "backfill"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        # PostgreSQL 18 reports it as restrict_violation, before 18 as foreign_key_violation
        with pytest.raises((psycopg.errors.ForeignKeyViolation, psycopg.errors.RestrictViolation)):
            conn.execute("UPDATE public.tree SET id = id + 1000 WHERE id = 3")
        conn.execute("UPDATE public.tree SET id = id + 1000 WHERE id = 150")     # no children: synced
    assert scalar(dsn, "SELECT count(*) FROM public.tree WHERE id = 3") == 1
    assert text_diff(dsn, "SELECT id::bigint, parent::bigint, body FROM public.tree",
                     "SELECT id, parent, body FROM public.tree_v2") == []


FOREST = """
CREATE TABLE public.tree (id int PRIMARY KEY, parent int REFERENCES public.tree (id) ON UPDATE CASCADE, body text);
INSERT INTO public.tree SELECT g, CASE WHEN g > 60 THEN g % 60 + 1 END, 'b' || g FROM generate_series(1, 3000) g;
"""
FOREST_ERRORS = (psycopg.errors.ForeignKeyViolation, psycopg.errors.UniqueViolation,
                 psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


class ForestWriters:
    """Writers of a tree: re-keyed parents (their children follow by ON UPDATE CASCADE), new leaves under
    any row, changed bodies and deleted leaves, at READ COMMITTED and REPEATABLE READ, through `tables` (one
    picked per transaction). Errors other than FOREST_ERRORS (a leaf under a parent another writer just
    re-keyed or deleted, a key taken, the usual concurrency failures) are kept in `failures`, and so is a
    foreign-key violation of a re-key or a body change, which the application's statement cannot cause."""

    def __init__(self, dsn: str, tables: list[str], seed: int) -> None:
        self.dsn, self.tables, self.seed = dsn, tables, seed
        self.stop = threading.Event()
        self.done: Counter[str] = Counter()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(n,), daemon=True) for n in range(3)]
        for thread in self.threads:
            thread.start()

    def run(self, number: int) -> None:
        rng = random.Random(self.seed * 10 + number)
        # no server-side prepared statements: they fail once after a flip changes a column's type (README)
        with psycopg.connect(self.dsn, autocommit=True, prepare_threshold=None) as conn:
            while not self.stop.is_set():
                table = rng.choice(self.tables)
                kind = rng.choice(["rekey", "rekey", "leaf", "body", "prune"])
                level = rng.choice(["READ COMMITTED", "REPEATABLE READ"])
                try:
                    with conn.transaction():
                        conn.execute(f"SET TRANSACTION ISOLATION LEVEL {level}")
                        row = conn.execute(f"SELECT id FROM {table} WHERE id >= %s ORDER BY id LIMIT 1",
                                           [rng.choice([rng.randint(1, 60), rng.randint(1, 4000)])]).fetchone()
                        if row is None:
                            continue
                        key = int(row[0])
                        if kind == "rekey":
                            conn.execute(f"UPDATE {table} SET id = id + 5000 + %s, body = 'rekeyed' WHERE id = %s",
                                         [rng.randint(0, 1000) * 7, key])
                        elif kind == "leaf":
                            conn.execute(f"INSERT INTO {table} (id, parent, body) VALUES (%s, %s, 'leaf')",
                                         [rng.randint(100_000, 10_000_000), key])
                        elif kind == "body":
                            conn.execute(f"UPDATE {table} SET body = body || '.' WHERE id = %s OR parent = %s",
                                         [key, key])
                        else:
                            conn.execute(f"DELETE FROM {table} AS t WHERE id = %s "
                                         f"AND NOT EXISTS (SELECT FROM {table} AS c WHERE c.parent = t.id)", [key])
                    self.done[kind] += 1
                except psycopg.errors.ForeignKeyViolation as error:
                    if kind in ("rekey", "body"):      # the children follow: only the sync could fail it
                        self.failures.append(f"{kind} on {table}: {type(error).__name__}: {error}")
                    self.done[type(error).__name__] += 1
                except FOREST_ERRORS as error:
                    self.done[type(error).__name__] += 1
                except psycopg.Error as error:
                    self.failures.append(f"{kind} on {table}: {type(error).__name__}: {error}")

    def finish(self) -> Counter[str]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert self.failures == [], self.failures[:3]
        assert self.done["rekey"] > 5, self.done
        return self.done


def test_concurrent_rekeys_of_a_self_referencing_key_stay_exact_in_every_phase(dsn: str, tmp_path: Path) -> None:
    """Three writers re-key parents (children follow by ON UPDATE CASCADE), add leaves and prune them while
    the migration goes through backfill, cutover, rollback, the window of expose (writers on both releases)
    and a cutover in it: at each boundary an independent two-way EXCEPT ALL finds the tables equal, and no
    writer saw an error other than the ones its own statements explain."""
    setup(dsn, FOREST)
    plan = write_plan(tmp_path, {"name": "tree_v2", "source": "public.tree",
                                 "columns": [{"name": "id", "type": "bigint", "not_null": True},
                                             {"name": "parent", "type": "bigint"}, {"name": "body", "type": "text"}],
                                 "backfill": {"workers": 2, "batch_rows": 200},
                                 "cutover": {"lock_timeout": "1s", "attempts": 30},
                                 "versions": {"blue": "tree_old_release", "green": "tree_new_release"}})
    seen: Counter[str] = Counter()

    def settle(blue: str, green: str, seconds: float = 1.0) -> None:
        time.sleep(seconds)
        seen.update(writers.finish())
        assert text_diff(dsn, f"SELECT id::bigint, parent::bigint, body FROM public.{blue}",
                         f"SELECT id, parent, body FROM public.{green}") == []

    run_ok(dsn, "prepare", str(plan))
    writers = ForestWriters(dsn, ["public.tree"], 1)
    run_ok(dsn, "backfill", str(plan))
    settle("tree", "tree_v2")
    run_ok(dsn, "verify", str(plan))
    writers = ForestWriters(dsn, ["public.tree"], 2)
    run_ok(dsn, "cutover", str(plan))
    settle("tree_old", "tree")
    writers = ForestWriters(dsn, ["public.tree"], 3)
    run_ok(dsn, "rollback", str(plan))
    settle("tree", "tree_v2")
    run_ok(dsn, "verify", str(plan))
    writers = ForestWriters(dsn, ["public.tree"], 4)
    run_ok(dsn, "expose", str(plan))
    settle("tree", "tree_v2")
    writers = ForestWriters(dsn, ["tree_old_release.tree", "tree_new_release.tree"], 5)
    run_ok(dsn, "cutover", str(plan))
    settle("tree_old", "tree")
    writers = ForestWriters(dsn, ["tree_new_release.tree"], 6)    # blue's version schema goes with blue
    run_ok(dsn, "finalize", str(plan), "--yes")
    seen.update(writers.finish())
    print(dict(seen))
    assert seen["rekey"] > 30 and seen["leaf"] > 30, seen


# -- 3. identity, generated columns, domains and enums never make a write fail -------------------
KINDS = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE TABLE public.items (
    id     bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    seq    bigint GENERATED ALWAYS AS IDENTITY,
    qty    positive_int NOT NULL,
    price  int NOT NULL,
    total  int GENERATED ALWAYS AS (qty * price) STORED,
    feel   mood NOT NULL DEFAULT 'ok',
    label  text
);
INSERT INTO public.items (qty, price, feel, label)
SELECT 1 + g % 9, g, 'happy', 'l' || g FROM generate_series(1, 500) g;
"""
ITEMS_BLUE = "SELECT id, seq, qty::int, price, total, feel::text, label FROM public.{}"
ITEMS_GREEN = "SELECT id, seq, qty::int, price, total, feel::text, label FROM public.{}"


def test_identity_generated_domain_and_enum_columns_never_fail_a_write(dsn: str, tmp_path: Path) -> None:
    setup(dsn, KINDS)
    plan_file = tmp_path / "items.yaml"
    run_ok(dsn, "init", "public.items", "-o", str(plan_file))
    run_ok(dsn, "validate", str(plan_file))
    run_ok(dsn, "prepare", str(plan_file))

    def write(table: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO public.{table} (qty, price, label) VALUES (2, 3, 'w')")
            conn.execute(f"UPDATE public.{table} SET price = price + 1, feel = 'sad', qty = 4 WHERE id % 7 = 0")
            conn.execute(f"UPDATE public.{table} SET seq = DEFAULT WHERE id % 11 = 0")
            conn.execute(f"UPDATE public.{table} SET id = id + 100000 WHERE id % 13 = 0")
            conn.execute(f"DELETE FROM public.{table} WHERE id % 17 = 0")

    write("items")
    run_ok(dsn, "backfill", str(plan_file))
    write("items")
    assert text_diff(dsn, ITEMS_BLUE.format("items"), ITEMS_GREEN.format("items_v2")) == []
    run_ok(dsn, "verify", str(plan_file))
    run_ok(dsn, "cutover", str(plan_file))
    write("items")
    assert text_diff(dsn, ITEMS_BLUE.format("items_old"), ITEMS_GREEN.format("items")) == []
    # the live table keeps blue's column kinds: ALWAYS identity, a generated column
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.GeneratedAlways):
            conn.execute("INSERT INTO public.items (seq, qty, price) VALUES (1, 1, 1)")
        with pytest.raises(psycopg.errors.GeneratedAlways):
            conn.execute("INSERT INTO public.items (total, qty, price) VALUES (1, 1, 1)")
    run_ok(dsn, "rollback", str(plan_file))
    write("items")
    assert text_diff(dsn, ITEMS_BLUE.format("items"), ITEMS_GREEN.format("items_v2")) == []
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.GeneratedAlways):
        conn.execute("INSERT INTO public.items (seq, qty, price) VALUES (1, 1, 1)")



def test_generated_columns_and_a_before_trigger_in_the_two_way_window(dsn: str, tmp_path: Path) -> None:
    """Both tables have a generated column, so the window's bounce is on at every statement without reading
    the catalog (decided when the sync is rendered): what a BEFORE trigger on green changes in the rows
    mirrored into it comes back to blue, before cutover and after it."""
    setup(dsn, KINDS + """
CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.label := upper(NEW.label); RETURN NEW; END $$;
""")
    plan_file = tmp_path / "items.yaml"
    run_ok(dsn, "init", "public.items", "-o", str(plan_file))
    plan = yaml.safe_load(plan_file.read_text())
    plan["versions"] = {"blue": "items_app_v1", "green": "items_app_v2"}
    plan_file.write_text(yaml.safe_dump(plan, sort_keys=False))
    for command in ("prepare", "backfill", "verify", "expose"):
        run_ok(dsn, command, str(plan_file))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON public.items_v2 "
                     "FOR EACH ROW EXECUTE FUNCTION public.shout()")

    def write(view: str, label: str, offset: int) -> None:
        """Through a release's view (both draw ids from one sequence); `offset` keeps re-keyed ids apart."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {view} (qty, price, label) VALUES (2, 3, %s)", [label])
            conn.execute(f"UPDATE {view} SET price = price + 1, label = %s WHERE id %% 7 = 0", [label])
            conn.execute(f"UPDATE {view} SET id = id + {offset} WHERE id % 13 = 0 AND id < 100000")
            conn.execute(f"DELETE FROM {view} WHERE id % 17 = 0")

    for phase, (blue, green) in enumerate((("items", "items_v2"), ("items_old", "items"))):
        if phase:
            run_ok(dsn, "cutover", str(plan_file))
        write("items_app_v1.items", f"blue {phase}", 100000 * (2 * phase + 1))
        assert text_diff(dsn, ITEMS_BLUE.format(blue), ITEMS_GREEN.format(green)) == []
        bounced = scalar(dsn, f"SELECT count(*) FROM public.{blue} WHERE label = upper(%s)", [f"blue {phase}"])
        assert isinstance(bounced, int) and bounced > 1     # green's trigger changed them, and blue has that
        write("items_app_v2.items", f"green {phase}", 100000 * (2 * phase + 2))
        assert text_diff(dsn, ITEMS_BLUE.format(blue), ITEMS_GREEN.format(green)) == []
    run_ok(dsn, "rollback", str(plan_file))
    with psycopg.connect(dsn, autocommit=True) as conn:    # one way again: nothing comes back from green
        conn.execute("DROP TRIGGER shout ON public.items_v2")
        conn.execute("UPDATE public.items SET label = 'after rollback' WHERE id % 5 = 0")
    assert text_diff(dsn, ITEMS_BLUE.format("items"), ITEMS_GREEN.format("items_v2")) == []

# -- 4 and 5. the checksum is not linear; equal is not identical ---------------------------------
VALUES_TABLE = """
CREATE TABLE public.vals (id int PRIMARY KEY, name text, amount int, amount2 int, n numeric, f float8,
                          span interval, arr int[], jb jsonb, tz timestamptz);
INSERT INTO public.vals
SELECT g, 'name' || g, 1000 + g, 5000 + g, g / 2.0, g / 4.0, interval '1 day' * g, ARRAY[g, g + 1],
       jsonb_build_object('g', g), timestamptz '2025-03-30 00:30:00+00' + g * interval '1 hour'
  FROM generate_series(1, 2000) g;
UPDATE public.vals SET f = 0, n = 1.5 WHERE id = 30;
"""
VALUES_PLAN: dict[str, Any] = {
    "name": "vals_v2", "source": "public.vals",
    "columns": [{"name": "id", "type": "int", "not_null": True}, {"name": "name", "type": "text"},
                {"name": "amount", "type": "int"}, {"name": "amount2", "type": "int"},
                {"name": "n", "type": "numeric"},
                {"name": "f", "type": "float8"}, {"name": "span", "type": "interval"},
                {"name": "arr", "type": "int[]"}, {"name": "jb", "type": "jsonb"},
                {"name": "tz", "type": "timestamptz"}],
    "backfill": {"workers": 2, "batch_rows": 300},
}
PLANTED: list[tuple[str, set[tuple[str, str]]]] = [
    # values swapped between rows: each column's multiset of values is unchanged
    ("UPDATE public.vals_v2 SET amount = CASE id WHEN 1 THEN 1002 ELSE 1001 END WHERE id IN (1, 2)",
     {("1", "amount"), ("2", "amount")}),
    # values swapped between two rows of one text column
    ("UPDATE public.vals_v2 SET name = CASE id WHEN 3 THEN 'name4' ELSE 'name3' END WHERE id IN (3, 4)",
     {("3", "name"), ("4", "name")}),
    # values swapped between columns of one row (same type)
    ("UPDATE public.vals_v2 SET amount = amount2, amount2 = amount WHERE id = 10",
     {("10", "amount"), ("10", "amount2")}),
    ("UPDATE public.vals_v2 SET span = '24:00:00' WHERE id = 1", {("1", "span")}),       # = '1 day'
    ("UPDATE public.vals_v2 SET arr = '{{11,12}}' WHERE id = 11", {("11", "arr")}),      # 2-D vs 1-D
    ("UPDATE public.vals_v2 SET arr = '[0:1]={12,13}' WHERE id = 12", {("12", "arr")}),  # other bounds
    ("UPDATE public.vals_v2 SET n = 1.50 WHERE id = 30", {("30", "n")}),                 # 1.5 vs 1.50
    ("UPDATE public.vals_v2 SET f = '-0' WHERE id = 30", {("30", "f")}),                 # 0 vs -0
]


@pytest.mark.parametrize("planted", range(len(PLANTED)), ids=[
    "swap-rows-int", "swap-rows-text", "swap-columns", "interval-24h", "array-2d", "array-bounds",
    "numeric-scale", "minus-zero"])
def test_verify_finds_differences_that_equality_and_a_linear_checksum_miss(
        dsn: str, tmp_path: Path, planted: int) -> None:
    setup(dsn, VALUES_TABLE)
    plan = write_plan(tmp_path, VALUES_PLAN)
    for command in ("prepare", "backfill", "verify"):
        run_ok(dsn, command, str(plan))
    statement, expected = PLANTED[planted]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement)
    blue = "SELECT id, name, amount, amount2, n, f, span, arr, jb, tz FROM public.vals"
    green = "SELECT id, name, amount, amount2, n, f, span, arr, jb, tz FROM public.vals_v2"
    assert text_diff(dsn, blue, green) != []           # the independent check sees the defect
    result = bgsync(dsn, "verify", str(plan), "--json", env={"PGTZ": "Europe/Berlin"})
    assert result.code == 1, result.out + result.err
    report = json.loads(result.out)
    found = {(m["key"][0], c) for m in report["mismatches"] for c in (m["columns"] or ["*"])}
    assert found == expected
    repaired = bgsync(dsn, "verify", str(plan), "--repair")
    assert repaired.code == 0, repaired.out + repaired.err
    assert text_diff(dsn, blue, green) == []


def test_same_instant_in_another_time_zone_is_parity(dsn: str, tmp_path: Path) -> None:
    """Parity is text in one session: a timestamptz written from another time zone is the same value."""
    setup(dsn, VALUES_TABLE)
    plan = write_plan(tmp_path, VALUES_PLAN)
    for command in ("prepare", "backfill"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Kathmandu'")
        conn.execute("UPDATE public.vals_v2 SET tz = '2025-03-30 07:15:00+05:45' WHERE id = 1")  # same instant
    run_ok(dsn, "verify", str(plan), env={"PGTZ": "America/New_York"})


# -- 6. session-dependent values; VOLATILE and STABLE expressions -----------------------------------
PLACED = """
CREATE TABLE public.orders (id int PRIMARY KEY, placed_at timestamptz NOT NULL DEFAULT now(), note text);
INSERT INTO public.orders SELECT g, timestamptz '2025-01-01 00:00:00+00' + g * interval '37 minutes', 'n'
  FROM generate_series(1, 2000) g;
"""
PLACED_PLAN: dict[str, Any] = {
    "name": "orders_v2", "source": "public.orders",
    "columns": [{"name": "id", "type": "int", "not_null": True},
                {"name": "placed_at", "type": "timestamptz", "not_null": True},
                {"name": "placed_on", "type": "date", "not_null": True, "from": "placed_at::date"},
                {"name": "note", "type": "text"}],
}


def test_session_settings_of_a_writer_do_not_change_green(dsn: str, tmp_path: Path) -> None:
    setup(dsn, PLACED)
    plan = write_plan(tmp_path, PLACED_PLAN)
    checked = bgsync(dsn, "validate", str(plan))
    assert checked.code == 0, checked.err
    assert "STABLE" in checked.out and "TimeZone" in checked.out
    run_ok(dsn, "prepare", str(plan), env={"PGTZ": "UTC"})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        conn.execute("INSERT INTO public.orders SELECT g, timestamptz '2025-06-01 23:30:00+00' + g * interval '1 min',"
                     " 'tokyo' FROM generate_series(5001, 5100) g")
        conn.execute("UPDATE public.orders SET placed_at = placed_at + interval '20 hours' WHERE id % 9 = 0")
    run_ok(dsn, "backfill", str(plan), env={"PGTZ": "America/Los_Angeles"})
    run_ok(dsn, "verify", str(plan), env={"PGTZ": "Pacific/Auckland"})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        diff = conn.execute("""SELECT count(*) FROM public.orders o JOIN public.orders_v2 g USING (id)
                                WHERE g.placed_on <> o.placed_at::date""").fetchone()
    assert diff == (0,)


def test_volatile_from_is_refused_and_stable_is_named(dsn: str, tmp_path: Path) -> None:
    setup(dsn, PLACED)
    plan_data = json.loads(json.dumps(PLACED_PLAN))
    plan_data["columns"].append({"name": "token", "type": "uuid", "from": "gen_random_uuid()"})
    result = bgsync(dsn, "validate", str(write_plan(tmp_path, plan_data)))
    assert result.code == 2, result.out + result.err
    assert "columns[4].from" in result.err and "VOLATILE" in result.err
    assert scalar(dsn, "SELECT to_regnamespace('bgsync')") is None


# -- 7. a collated text key ---------------------------------------------------------------------------
def _collations(dsn: str) -> list[str]:
    """"C" everywhere; an ICU collation where the server was built with ICU."""
    found = ["C"]
    for name in scalars(dsn, "SELECT collname FROM pg_collation WHERE collprovider = 'i' "
                             "AND collname IN ('und-x-icu', 'unicode') ORDER BY collname"):
        try:
            with psycopg.connect(dsn) as conn:
                conn.execute(psycopg.sql.SQL("SELECT 'a' < 'B' COLLATE {}").format(psycopg.sql.Identifier(str(name))))
        except psycopg.errors.FeatureNotSupported:
            continue
        found.append(str(name))
        break
    return found


@pytest.mark.parametrize("hand_written", [False, True], ids=["init", "plain-text-type"])
def test_collated_text_key_verifies_and_repairs(dsn: str, tmp_path: Path, hand_written: bool) -> None:
    for collation in _collations(dsn):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS bgsync CASCADE")
            conn.execute("DROP TABLE IF EXISTS public.words, public.words_v2")
            conn.execute(psycopg.sql.SQL(
                "CREATE TABLE public.words (w text COLLATE {} PRIMARY KEY, n int)").format(
                psycopg.sql.Identifier(collation)))
            conn.execute("""INSERT INTO public.words
                            SELECT x, g FROM generate_series(1, 3000) g,
                                   LATERAL (VALUES (CASE g % 4 WHEN 0 THEN upper(md5(g::text)) WHEN 1 THEN md5(g::text)
                                                    WHEN 2 THEN '_' || g ELSE 'Ä' || g END)) v(x)""")
            conn.execute("ANALYZE public.words")
        plan_file = tmp_path / f"words-{collation}.yaml"
        plan_file.unlink(missing_ok=True)
        if hand_written:
            plan_file.write_text(yaml.safe_dump({
                "name": "words_v2", "source": "public.words",
                "columns": [{"name": "w", "type": "text", "not_null": True}, {"name": "n", "type": "int"}],
                "backfill": {"workers": 2, "batch_rows": 200}}))
        else:
            run_ok(dsn, "init", "public.words", "-o", str(plan_file))
            assert "COLLATE" in plan_file.read_text() or collation == "C"
        for command in ("prepare", "backfill", "verify"):
            run_ok(dsn, command, str(plan_file))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM public.words_v2 WHERE n IN (7, 1500, 2999)")
            conn.execute("UPDATE public.words_v2 SET n = -n WHERE n IN (8, 2000)")
        result = bgsync(dsn, "verify", str(plan_file), "--json")
        assert result.code == 1, (collation, result.out, result.err)
        assert json.loads(result.out)["mismatched_rows"] == 5
        run_ok(dsn, "verify", str(plan_file), "--repair")
        assert text_diff(dsn, "SELECT w, n FROM public.words", "SELECT w, n FROM public.words_v2") == []
        run_ok(dsn, "rollback", str(plan_file))


# -- 8. a name that contains bgsync's dollar-quote tag ---------------------------------------------
def test_names_and_expressions_never_close_a_quote_bgsync_opened(dsn: str, tmp_path: Path) -> None:
    setup(dsn, 'CREATE TABLE public.q (id int PRIMARY KEY, "a$bgsync_body$b" text, "$$" text);'
               "INSERT INTO public.q SELECT g, 'v' || g, '$$' FROM generate_series(1, 100) g;")
    plan = write_plan(tmp_path, {
        "name": "q_v2", "source": "public.q",
        "columns": [{"name": "id", "type": "int", "not_null": True},
                    {"name": "a$bgsync_body$b", "type": "text"},
                    {"name": "$$", "type": "text", "from": "\"$$\" || '$bgsync_body$'",
                     "reverse": "left(\"$$\", 2)", "reverse_column": "$$"}]})
    for command in ("validate", "prepare", "backfill", "verify", "cutover", "rollback"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("""INSERT INTO public.q VALUES (500, 'x', '$$')""")
    assert scalar(dsn, """SELECT "$$" FROM public.q_v2 WHERE id = 500""") == "$$$bgsync_body$"


# -- 9. every blue column is fed after cutover, or the plan says NULL ------------------------------------
ACCOUNTS = """
CREATE TABLE public.accounts (id int PRIMARY KEY, email text, "select" text, nick text NOT NULL);
INSERT INTO public.accounts SELECT g, 'User' || g || '@Example.com', 's' || g, 'n' || g FROM generate_series(1, 300) g;
"""


def accounts_plan(email: dict[str, Any]) -> dict[str, Any]:
    return {"name": "accounts_v2", "source": "public.accounts",
            "columns": [{"name": "id", "type": "int", "not_null": True},
                        {"name": "email_lower", "type": "text", "not_null": True, "from": "lower(email)", **email},
                        {"name": "sel", "type": "varchar(64)", "from": '"select"::varchar(64)'},
                        {"name": "nick", "type": "text"}]}


def test_a_blue_column_nothing_feeds_is_refused(dsn: str, tmp_path: Path) -> None:
    setup(dsn, ACCOUNTS)
    refused = bgsync(dsn, "validate", str(write_plan(tmp_path, accounts_plan({}))))
    assert refused.code == 2, refused.out + refused.err
    assert "email" in refused.err and "reverse" in refused.err
    accepted = bgsync(dsn, "validate", str(write_plan(tmp_path, accounts_plan({"reverse": "NULL",
                                                                             "reverse_column": "email"}))))
    assert accepted.code == 0, accepted.err
    assert "email <- NULL" in accepted.out
    assert 'select <- sel' in accepted.out            # inferred from a cast of a column
    # NULL cannot feed a NOT NULL blue column: inserts would fail after cutover
    nick_null = accounts_plan({"reverse": "email_lower", "reverse_column": "email"})
    nick_null["columns"][3] = {"name": "nick_upper", "type": "text", "from": "upper(nick)", "reverse": "NULL",
                               "reverse_column": "nick"}
    refused = bgsync(dsn, "validate", str(write_plan(tmp_path, nick_null)))
    assert refused.code == 2 and "'nick' is NOT NULL" in refused.err, refused.err


def test_reverse_inferred_from_a_cast_keeps_blue_current(dsn: str, tmp_path: Path) -> None:
    setup(dsn, ACCOUNTS)
    plan = write_plan(tmp_path, accounts_plan({"reverse": "email_lower", "reverse_column": "email"}))
    for command in ("prepare", "backfill", "verify", "cutover"):
        run_ok(dsn, command, str(plan))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.accounts VALUES (1000, 'new@example.com', 'sel-new', 'nn')")
        conn.execute("UPDATE public.accounts SET sel = 'changed' WHERE id = 5")
    assert scalar(dsn, 'SELECT "select" FROM public.accounts_old WHERE id = 1000') == "sel-new"
    assert scalar(dsn, 'SELECT "select" FROM public.accounts_old WHERE id = 5') == "changed"
    assert scalar(dsn, "SELECT email FROM public.accounts_old WHERE id = 1000") == "new@example.com"


# -- 10. defaults follow the column ---------------------------------------------------------------------
def test_default_of_a_same_named_column_read_in_an_expression_is_inherited(dsn: str, tmp_path: Path) -> None:
    setup(dsn, PLACED)
    plan = write_plan(tmp_path, {
        "name": "orders_v2", "source": "public.orders",
        "columns": [{"name": "id", "type": "int", "not_null": True},
                    {"name": "placed_at", "type": "timestamp", "not_null": True,
                     "from": "placed_at AT TIME ZONE 'UTC'", "reverse": "placed_at AT TIME ZONE 'UTC'"},
                    {"name": "note", "type": "text"}]})
    checked = bgsync(dsn, "validate", str(plan))
    assert checked.code == 0, checked.err
    assert "placed_at: default now() inherited" in checked.out
    for command in ("prepare", "backfill", "verify", "cutover"):
        run_ok(dsn, command, str(plan))
    run_ok(dsn, "finalize", str(plan), "--yes")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders (id, note) VALUES (9999, 'after finalize')")
    assert scalar(dsn, "SELECT placed_at IS NOT NULL FROM public.orders WHERE id = 9999") is True


# -- 11. a malformed DSN is a usage error and shows no secret ---------------------------------------------
@pytest.mark.parametrize("bad", [
    "postgresql:/postgres:Hunter2secret@127.0.0.1:5432/db",
    "postgresql://postgres:Hunter2secret@127.0.0.1:5432/db?sslmode=bogus",
    "host=127.0.0.1 password=Hunter2secret port=notaport",
    "postgres://u:Hunter2secret@[::1:5432/db",
])
def test_malformed_dsn_is_exit_2_without_the_password(tmp_path: Path, bad: str) -> None:
    plan = write_plan(tmp_path, DOC_PLAN)
    result = bgsync(bad, "validate", str(plan), timeout=60)
    assert result.code == 2, result.out + result.err
    assert "Hunter2secret" not in result.out + result.err
    assert "DSN" in result.err
