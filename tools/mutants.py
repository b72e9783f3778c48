"""Mutation check: breaking any one mechanism the README claims must make a test fail.

Each mutant is one deliberate breakage of the product code. For each, this script copies the checkout to
a temporary directory (the checkout itself is never modified), applies the breakage there, runs the
tests chosen to catch it (pytest in the copy, which imports the copy's `orchestrator`), and prints a
table: mutant, tests run, caught. It exits 1 if any mutant survives or cannot be applied (the product
text it edits has changed: update the mutant).

    .venv/bin/python tools/mutants.py                 # every mutant
    .venv/bin/python tools/mutants.py --only redaction --only fk_repoint
    .venv/bin/python tools/mutants.py --list
    .venv/bin/python tools/mutants.py --baseline      # first run every selection on the unbroken copy

The database is the tests' own (BGSYNC_TEST_DSN, else an embedded PostgreSQL per pytest run).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                                "*.egg-info", "results")
TIMEOUT = 900


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str                              # the breakage, in words
    file: str                              # relative to the checkout
    edits: tuple[tuple[str, str], ...]     # (exact text, replacement): each text must occur exactly once
    tests: tuple[str, ...]                 # pytest arguments selecting the tests that should catch it
    # the same breakage where the mechanism lives elsewhere in another version of the code: (file, edits)
    elsewhere: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()


MUTANTS = [
    Mutant("for_key_share", "the backfill copy no longer locks the rows it reads FOR KEY SHARE",
           "sql_templates/backfill_copy.sql.j2",
           (("   FOR KEY SHARE OF {{ spec.blue.name|ident }}\n", ""),),
           ("tests/test_concurrency.py", "-k", "uncommitted_delete")),
    Mutant("forward_delete", "the forward trigger's DELETE branch does nothing",
           "sql_templates/_sync.sql.j2",
           (("    ELSIF TG_OP = 'DELETE' THEN",
             "    ELSIF TG_OP = 'DELETE' {% if title == 'forward sync' %}AND false {% endif %}THEN"),),
           ("tests/test_roles_and_state.py", "-k", "dml_only")),
    Mutant("count_only_verify", "verify compares row counts only, the checksum is ignored",
           "orchestrator/phases/verify.py",
           (("        if blue != green:\n            self.narrow(",
             "        if blue[0] != green[0]:\n            self.narrow("),),
           ("tests/test_verify.py", "-k", "planted or read_differently")),
    Mutant("sequence_advance", "cutover does not advance green's sequence past blue's",
           "sql_templates/cutover.sql.j2",
           (("{% include '_sequences.sql.j2' %}\n", ""),),
           ("tests/test_cutover.py", "-k", "view_foreign_key_and_identity and rename")),
    Mutant("enable_always", "the sync triggers are not ENABLE ALWAYS (they stop under replica role)",
           "sql_templates/_sync.sql.j2",
           (("{% for op in ('ins', 'upd', 'del', 'trunc') %}\n-- step: keep the",
             "{% for op in () %}\n-- step: keep the"),),
           ("tests/test_roles_and_state.py", "-k", "replica")),
    Mutant("progress_apart", "a batch commits its progress in a transaction of its own, before its rows",
           "orchestrator/phases/backfill.py",
           (("                    started = time.perf_counter()\n"
             "                    copy, inserted = copy_batch(conn, executor, sqls, lower, upper)\n"
             "                    elapsed = time.perf_counter() - started\n"
             "                    executor.execute(conn, _with(progress, [upper, finished, inserted, finished, "
             "chunk.chunk_no]))\n",
             "                    executor.execute(conn, _with(progress, [upper, finished, 0, finished, "
             "chunk.chunk_no]))\n"
             "                    conn.execute(\"COMMIT\")\n"
             "                    started = time.perf_counter()\n"
             "                    copy, inserted = copy_batch(conn, executor, sqls, lower, upper)\n"
             "                    elapsed = time.perf_counter() - started\n"),),
           ("tests/test_kill_resume.py", "-k", "failed_batch")),
    Mutant("rollback_forward_triggers", "rollback after cutover does not re-install the forward triggers",
           "sql_templates/uncutover.sql.j2",
           (("{% with sync = forward, title = 'forward sync' %}{% include '_sync.sql.j2' %}{% endwith %}\n", ""),),
           ("tests/test_roles_and_state.py", "-k", "dml_only")),
    Mutant("from_typecheck", "validate does not type-check `from` against the real tables",
           "sql_templates/validate.sql.j2",
           (("{% for col in spec_columns if col.source_expr is not none %}\n-- step: columns[{{ col_index[col.name] "
             "}}].from",
             "{% for col in spec_columns if false %}\n-- step: columns[{{ col_index[col.name] }}].from"),),
           ("tests/test_invalid_plans.py", "-k", "type-check")),
    Mutant("reverse_update", "the reverse trigger's UPDATE branch does nothing",
           "sql_templates/_sync.sql.j2",
           (("    ELSIF TG_OP = 'UPDATE' THEN\n        -- rows whose key changed leave their old key behind in the "
             "target, unless the source holds it again;\n",
             "    ELSIF TG_OP = 'UPDATE' {% if title == 'reverse sync' %}AND false {% endif %}THEN\n        -- rows "
             "whose key changed leave their old key behind in the target, unless the source holds it again;\n"),),
           ("tests/test_roles_and_state.py", "-k", "dml_only")),
    Mutant("redaction", "redaction is a no-op: no password is remembered or replaced",
           "orchestrator/db.py",
           (('    """Replace any known password, and any `password=`/URI password, with ***."""\n',
             '    """Replace any known password, and any `password=`/URI password, with ***."""\n    return text\n'),
            ('    """Remember the password of a DSN, also of one libpq cannot parse, so no output can show it."""\n',
             '    """Remember the password of a DSN, also of one libpq cannot parse, so no output can show it."""\n'
             '    return\n')),
           ("tests/test_passwords.py",)),
    Mutant("verify_last_partition", "verify leaves out the last (open-ended) partition",
           "orchestrator/phases/verify.py",
           (("    ranges[-1] = Range(ranges[-1].lo, None)\n    return ranges\n",
             "    ranges[-1] = Range(ranges[-1].lo, None)\n    return ranges[:-1]\n"),),
           ("tests/test_verify.py", "-k", "planted")),
    Mutant("fk_repoint", "cutover forgets to re-point one inbound foreign key",
           "sql_templates/cutover.sql.j2",
           (("{% include '_foreign_keys.sql.j2' %}\n",
             "{% with fks = fks[:-1] %}{% include '_foreign_keys.sql.j2' %}{% endwith %}\n"),),
           ("tests/test_cutover.py", "-k", "view_foreign_key_and_identity and rename"),
           # issue 10's twin foreign keys: the child table's twin referencing green is what the flip relies on
           elsewhere=(("orchestrator/phases/keys.py",
                       (("    for fk in catalog.inbound_foreign_keys(conn, str(spec.blue)):\n"
                         "        shadow = shadow_name(fk.name)\n",
                         "    for fk in catalog.inbound_foreign_keys(conn, str(spec.blue))[:-1]:\n"
                         "        shadow = shadow_name(fk.name)\n"),)),)),
    # the mechanisms issue 9 added
    Mutant("held_partitions", "backfill workers stop when the partitions left are held (the resumed-backfill hang)",
           "orchestrator/phases/backfill.py",
           (("                if nothing.unfinished == 0:\n                    return\n",
             "                return\n"),),
           ("tests/test_kill_resume.py", "-k", "held_partition")),
    Mutant("session_lock_timeout", "bgsync's sessions wait for locks without a lock_timeout",
           "orchestrator/db.py",
           (('    conn.execute("SELECT set_config(\'lock_timeout\', %s, false)", [lock_timeout])\n',
             '    conn.execute("SELECT set_config(\'lock_timeout\', %s, false)", ["0"])\n'),),
           ("tests/test_lock_timeouts.py",)),
    Mutant("bulk_switch_unlocked", "bulk mode's switch to dual write no longer holds off blue's writers",
           "sql_templates/bulk_switch.sql.j2",
           (("{% with lock_relations = [spec.blue], lock_mode = 'SHARE ROW EXCLUSIVE' %}{% include '_locks.sql.j2' %}"
             "{% endwith %}\n", ""),),
           ("tests/test_bulk.py", "-k", "switch_waits")),
    Mutant("bulk_log_new_keys_only", "bulk mode's trigger logs only the new keys of an UPDATE (a re-keyed row's "
           "old key is never re-read)",
           "sql_templates/_sync.sql.j2",
           (("FROM bgsync_old_rows AS o\n         WHERE {{ gone('o') }};",
             "FROM bgsync_old_rows AS o\n         WHERE false AND {{ gone('o') }};"),),
           ("tests/test_bulk.py", "-k", "read_again")),
    Mutant("bulk_unique_before_drain", "bulk mode builds the unique indexes before the change log is drained",
           "orchestrator/phases/backfill.py",
           (("    if spec.bulk:\n        bulk.finish(conn, dsn, spec, settings.lock_timeout, settings.attempts)\n", ""),
            ("                                           state_schema=spec.state_schema), spec)\n",
             "                                           state_schema=spec.state_schema), spec)\n    if spec.bulk:\n"
             "        bulk.finish(conn, dsn, spec, settings.lock_timeout, settings.attempts)\n")),
           ("tests/test_bulk.py", "-k", "unique_index")),
    # issue 11's window, made cheaper: a plain INSERT only where the target lacks the keys, the bounce only
    # where the target can change a row
    Mutant("window_plain_insert_always", "the window's sync inserts without an upsert even where the target "
           "still holds the key (a statement deleting and re-inserting a key)",
           "sql_templates/_sync.sql.j2",
           (("        IF held THEN", "        IF false AND held THEN"),),
           ("tests/test_exactness.py", "-k", "several_events_on_one_key_in_the_two_way_window")),
    Mutant("window_no_bounce", "the window never maps back what a BEFORE trigger of the target changed",
           "sql_templates/_sync.sql.j2",
           (("{% macro bounce_rule() %}\n{%- if sync.back_update_columns and sync.target_generated -%}\ntrue"
             "\n{%- elif sync.back_update_columns -%}",
             "{% macro bounce_rule() %}\n{%- if false -%}\ntrue\n{%- elif false -%}"),),
           ("tests/test_expose.py", "-k", "user_trigger")),
    Mutant("window_generated_target_no_bounce", "where the target has generated columns (the bounce decided when "
           "the sync is rendered), the window never maps back what a BEFORE trigger of the target changed",
           "sql_templates/_sync.sql.j2",
           (("{%- if sync.back_update_columns and sync.target_generated -%}\ntrue",
             "{%- if sync.back_update_columns and sync.target_generated -%}\nfalse"),),
           ("tests/test_exactness.py", "-k", "generated_columns_and_a_before_trigger")),
    Mutant("sync_plans_for_size", "the sync's plans follow the size of the statement that first ran them (hash "
           "joins over whole tables, JIT), as PL/pgSQL caches them for the session",
           "sql_templates/_sync.sql.j2",
           (("SET enable_hashjoin = off\nSET enable_mergejoin = off\nSET enable_seqscan = off\nSET jit = off\n", ""),),
           ("tests/test_sync_plans.py", "-k", "many_rows")),
    Mutant("sync_joins_transition_tables", "the forward DELETE skips the old keys the new rows hold by joining "
           "the two transition tables (quadratic under a plan the session cached for one row)",
           "sql_templates/_sync.sql.j2",
           (("                 WHERE {{ gone('o') }} OFFSET 0) AS o{% endmacro %}",
             "                 WHERE {{ gone('o') }} AND NOT EXISTS (SELECT FROM bgsync_new_rows AS n WHERE "
             "({{ sync.source_key|idents('n.') }}) = ({{ sync.source_key|idents('o.') }})) OFFSET 0) AS o"
             "{% endmacro %}"),),
           ("tests/test_sync_plans.py", "-k", "direct")),
    Mutant("sync_writes_transition_rows", "an UPDATE's sync writes the statement's transition-table rows even "
           "where a user's trigger changed the source's rows after the statement wrote them",
           "sql_templates/_sync.sql.j2",
           (("{%- set read_only = [", "false AND ({%- set read_only = ["),
            ("::regproc{% endfor %}))", "::regproc{% endfor %})))")),
           ("tests/test_exactness.py", "-k", "user_triggers_that_change and direct")),
    Mutant("self_key_checked_at_once", "green's copy of a foreign key on the table itself is checked at each "
           "statement before cutover, as blue's is (the sync writes a changed key in two statements)",
           "orchestrator/phases/keys.py",
           (('deferrable, deferred, why = True, True, ", checked at commit while the sync writes green"',
             'deferrable, deferred, why = key.deferrable, key.deferred, ""'),),
           ("tests/test_exactness.py", "-k", "self_referencing")),
    Mutant("self_key_of_a_synced_blue_checked_at_once", "blue's foreign key on itself keeps its timing while the "
           "sync writes blue (after cutover, in the window of expose)",
           "orchestrator/phases/keys.py",
           (("SelfKey(key.name, True, True) if written else key", "key"),),
           ("tests/test_exactness.py", "-k", "self_referencing")),
    Mutant("self_key_timing_never_restored", "a table the sync no longer writes keeps its foreign key on itself "
           "checked at commit",
           "orchestrator/phases/keys.py",
           (("SelfKey(key.name, True, True) if written else key", "SelfKey(key.name, True, True)"),),
           ("tests/test_exactness.py", "-k", "self_referencing")),
    Mutant("catalog_read_in_an_old_snapshot", "the sync trusts pg_trigger as a REPEATABLE READ snapshot shows it, "
           "which may predate a trigger that fires on the statement",
           "sql_templates/_sync.sql.j2",
           (("{% macro catalog_behind() %}pg_catalog.current_setting('transaction_isolation') IN "
             "('repeatable read', 'serializable'){% endmacro %}",
             "{% macro catalog_behind() %}false{% endmacro %}"),),
           ("tests/test_exactness.py", "-k", "trigger_created_after_a_writer")),
    Mutant("sync_reads_rows_of_other_transactions", "the sync's reads of the source by key also count a row another "
           "transaction deleted after a REPEATABLE READ snapshot (the snapshot still shows it)",
           "sql_templates/_sync.sql.j2",
           (("{% macro own(alias) %}pg_catalog.age({{ alias }}.xmin) <= 0{% endmacro %}",
             "{% macro own(alias) %}true{% endmacro %}"),),
           ("tests/test_exactness.py", "-k", "reusing and direct")),
]


def _apply(copy: Path, mutant: Mutant) -> str | None:
    """Edit the copy (the first of the mutant's places that holds every text to break, once); the reason it
    cannot be applied, or None."""
    problems = []
    for file, edits in ((mutant.file, mutant.edits), *mutant.elsewhere):
        path = copy / file
        text = path.read_text() if path.exists() else ""
        missing = [old for old, _ in edits if text.count(old) != 1]
        if missing:
            problems.append(f"{file}: not found once: {missing[0].strip()[:60]!r}")
            continue
        for old, new in edits:
            text = text.replace(old, new)
        path.write_text(text)
        return None
    return "; ".join(problems) + " (update the mutant)"


def _pytest(copy: Path, tests: tuple[str, ...], verbose: bool = False) -> tuple[int | None, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(command, cwd=copy, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return None, f"timed out after {TIMEOUT}s"
    if verbose:
        print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("E ", "FAILED", "tests/"))),
              file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines) if re.search(r"\d+ (passed|failed|error)", line)),
                   lines[-1] if lines else proc.stderr.strip()[-200:])
    return proc.returncode, summary


def _fresh_copy(base: Path) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="bgsync-mutant-", dir=base))
    shutil.rmtree(copy)
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--baseline", action="store_true", help="check that each selection passes unbroken first")
    parser.add_argument("--verbose", "-v", action="store_true", help="show why each selection failed")
    args = parser.parse_args()
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<26} {m.what}  [{' '.join(m.tests)}]")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown or not chosen:
        parser.error(f"unknown mutant(s) {sorted(unknown)}; --list shows them")
    rows: list[tuple[str, str, str, str]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="bgsync-mutants-") as scratch:
        base = Path(scratch)
        if args.baseline:
            copy = _fresh_copy(base)
            for selection in sorted({m.tests for m in chosen}):
                code, summary = _pytest(copy, selection)
                print(f"baseline {' '.join(selection)}: {summary}", flush=True)
                if code != 0:
                    print("the unbroken code fails this selection: fix that first", file=sys.stderr)
                    return 1
            shutil.rmtree(copy)
        for mutant in chosen:
            started = time.monotonic()
            copy = _fresh_copy(base)
            problem = _apply(copy, mutant)
            if problem is not None:
                rows.append((mutant.name, " ".join(mutant.tests), "NOT APPLIED", problem))
                failed = True
                shutil.rmtree(copy)
                continue
            code, summary = _pytest(copy, mutant.tests, args.verbose)
            shutil.rmtree(copy)
            caught = {1: "yes"}.get(code if code is not None else -1, "NO" if code == 0 else "ERROR")
            failed |= caught != "yes"
            rows.append((mutant.name, " ".join(mutant.tests), caught,
                         f"{summary} ({time.monotonic() - started:.0f}s)"))
            print(f"{mutant.name}: caught {caught} ({summary})", file=sys.stderr, flush=True)
    print()
    print("| mutant | breakage | tests run | caught | pytest |")
    print("|---|---|---|---|---|")
    what = {m.name: m.what for m in MUTANTS}
    for name, tests, caught, summary in rows:
        print(f"| {name} | {what[name]} | `{tests}` | {caught} | {summary} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
