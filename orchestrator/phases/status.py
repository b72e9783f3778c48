"""status: where every migration stands, checked against the catalog (drift is reported loudly)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog
from orchestrator.journal import get_migration, journal_exists
from orchestrator.names import QualifiedName, quote_ident
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, forward_sync, reverse_sync

Conn = psycopg.Connection[Any]
STATUS_VERSION = 1
FORWARD_PHASES = ("prepared", "backfilling", "backfilled", "verified", "mismatch", "reverted")


def expected_objects(spec: MigrationSpec, phase: str, mode: str, window: bool = False
                     ) -> tuple[dict[str, list[str]], list[str]]:
    """(table -> triggers that must exist ENABLE ALWAYS, tables that must exist) for a phase."""
    if phase == "exposed":
        forward, reverse = forward_sync(spec), reverse_sync(spec, spec.green, target=spec.blue)
        return ({forward.source.display(): list(forward.triggers.values()),
                 reverse.source.display(): list(reverse.triggers.values())}, [str(spec.blue), str(spec.green)])
    if phase in FORWARD_PHASES:
        forward = forward_sync(spec)
        return {forward.source.display(): list(forward.triggers.values())}, [str(spec.blue), str(spec.green)]
    if phase == "cut_over":
        live = spec.blue if mode == "rename" else spec.green
        reverse = reverse_sync(spec, live)
        expected = {reverse.source.display(): list(reverse.triggers.values())}
        if window:
            expected[spec.retired.display()] = list(spec.triggers.values())
        return expected, [str(live), str(spec.retired)]
    if phase == "finalizing":
        return {}, [str(spec.blue if mode == "rename" else spec.green)]
    return {}, []


def backfill_state(conn: Conn, schema: str, name: str) -> dict[str, Any]:
    """Paused flag and the live backfill processes (fresh heartbeat, session alive) of a migration."""
    if not catalog.relation_exists(conn, QualifiedName(schema, "runs")):
        return {"paused": False, "paused_at": None, "processes": 0, "holding": 0, "heartbeat_age_seconds": None,
                "held": [], "held_seconds": 0.0}
    [(_description, text)] = render_steps("status_backfill.sql.j2", schema=schema)
    row = conn.execute(text, {"name": name}).fetchone()
    assert row is not None
    paused_at, processes, holding, age, held, held_seconds = row
    return {"paused": paused_at is not None, "paused_at": None if paused_at is None else paused_at.isoformat(),
            "processes": int(processes), "holding": int(holding),
            "heartbeat_age_seconds": None if age is None else round(float(age), 1), "held": list(held),
            "held_seconds": round(float(held_seconds), 1)}


def migration_status(conn: Conn, schema: str, name: str) -> dict[str, Any]:
    row = get_migration(conn, schema, name)
    assert row is not None
    spec = row.spec
    mode = str((row.cutover or {}).get("mode") or row.plan.get("cutover", {}).get("mode", "rename"))
    s = quote_ident(schema)
    chunks = conn.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE done), coalesce(sum(rows_copied), 0),
                   extract(epoch FROM CASE WHEN bool_and(done) THEN max(finished_at) ELSE clock_timestamp() END
                                      - min(started_at))
              FROM {s}.chunks WHERE migration = %s""",
        [name]).fetchone()
    assert chunks is not None
    total, done, copied, seconds = int(chunks[0]), int(chunks[1]), int(chunks[2]), chunks[3]
    estimate_row = conn.execute("SELECT reltuples::float8 FROM pg_class WHERE oid = to_regclass(%s)",
                                [str(spec.blue)]).fetchone()
    estimate = max(int(estimate_row[0]), copied) if estimate_row and estimate_row[0] and estimate_row[0] > 0 \
        else copied
    live = backfill_state(conn, schema, name)
    unfinished = total > done or row.phase == "backfilling"
    # running: a live process heartbeats; paused: the flag is set; interrupted: work left and nobody at it
    state = ("paused" if live["paused"] else "running" if live["processes"] else
             "interrupted" if unfinished and total else None)
    rate = float(copied) / float(seconds) if seconds and float(seconds) > 0 else None
    eta = (estimate - copied) / rate if rate and done < total else (0.0 if total and done == total else None)
    if unfinished and (state != "running" or live["held"]):
        rate = eta = None        # nothing copies now: no rate, no ETA as if it did
    rolled_back_at = last_rollback(conn, schema, name)
    verify = last_verify(conn, schema, name, since=rolled_back_at)
    before_rollback = None if rolled_back_at is None else last_verify(conn, schema, name, before=rolled_back_at)
    window = row.phase == "exposed" or bool((row.cutover or {}).get("window"))
    triggers_expected, tables_expected = expected_objects(spec, row.phase, mode, window)
    drift: list[str] = []
    present_all: dict[str, dict[str, str]] = {}
    for table, names in triggers_expected.items():
        present = catalog.triggers_on(conn, table)
        present_all[table] = present
        for trigger in names:
            if trigger not in present:
                drift.append(f"trigger {trigger} on {table} is missing")
            elif present[trigger] != "A":
                drift.append(f"trigger {trigger} on {table} is not ENABLE ALWAYS (tgenabled={present[trigger]})")
    for table in tables_expected:
        if catalog.regclass_oid(conn, table) is None:
            drift.append(f"table {table} is missing")
    change_log = None
    if spec.bulk and catalog.regclass_oid(conn, str(spec.log_table)) is not None:
        counted = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(spec.log_table.ident())).fetchone()
        change_log = int(counted[0]) if counted else 0
    return {
        "name": name,
        "phase": row.phase,
        "backfill_mode": "bulk" if spec.bulk else "direct",
        # bulk mode until the switch: keys recorded and not yet re-read from blue (None: dual write)
        "change_log_keys": change_log,
        "source": spec.blue.display(),
        "target": spec.green.display(),
        "retired": spec.retired.display(),
        "mode": mode,
        "window": spec.versions if window and spec.versions else None,
        "backfill": {
            "partitions": total, "partitions_done": done, "rows_copied": copied, "rows_estimate": estimate,
            "rows_per_second": None if rate is None else round(rate, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "state": state, "processes": live["processes"], "heartbeat_age_seconds": live["heartbeat_age_seconds"],
            "held": live["held"], "held_seconds": live["held_seconds"], "paused_at": live["paused_at"],
        },
        "verify": verify,
        "verify_before_rollback": before_rollback,
        "rolled_back_at": None if rolled_back_at is None else rolled_back_at.isoformat(),
        "triggers": {table: sorted(names) for table, names in triggers_expected.items()},
        "drift": drift,
    }


def last_rollback(conn: Conn, schema: str, name: str) -> datetime | None:
    """When the migration was last rolled back (its rollback's statements in the event log)."""
    row = conn.execute(f"""SELECT max(at) FROM {quote_ident(schema)}.events
                            WHERE migration = %s AND phase = 'rollback' AND outcome = 'ok'""", [name]).fetchone()
    return None if row is None else row[0]


def last_verify_passed(conn: Conn, schema: str, name: str) -> bool:
    last = last_verify(conn, schema, name)
    return last is not None and bool(last["passed"])


def last_verify(conn: Conn, schema: str, name: str, *, since: datetime | None = None,
                before: datetime | None = None) -> dict[str, Any] | None:
    """The last verify run (after `since`, or before `before`): passed, finished_at, mismatched_rows."""
    if not catalog.relation_exists(conn, QualifiedName(schema, "verify_runs")):
        return None
    row = conn.execute(
        f"""SELECT passed, finished_at, (result->>'mismatched_rows')::bigint FROM {quote_ident(schema)}.verify_runs
             WHERE migration = %s AND (%s::timestamptz IS NULL OR finished_at > %s)
               AND (%s::timestamptz IS NULL OR finished_at <= %s)
             ORDER BY id DESC LIMIT 1""", [name, since, since, before, before]).fetchone()
    if row is None:
        return None
    return {"passed": bool(row[0]), "finished_at": row[1].isoformat(), "mismatched_rows": int(row[2] or 0)}


def status(conn: Conn, schema: str, name: str | None) -> dict[str, Any]:
    names: list[str] = []
    if journal_exists(conn, schema):
        names = [r[0] for r in conn.execute(
            f"SELECT name FROM {quote_ident(schema)}.migrations ORDER BY created_at, name")]
    if name is not None:
        names = [n for n in names if n == name]
    return {"version": STATUS_VERSION, "migrations": [migration_status(conn, schema, n) for n in names]}
