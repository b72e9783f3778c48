"""Foreign keys follow green before the flip, so the flip itself touches no other table.

After the backfill (and again, for anything added since, just before the cutover's lock):
- blue's outbound foreign keys are added to green, `NOT VALID`, then validated;
- every inbound foreign key (a child table referencing blue) gets a twin referencing green (its
  "shadow", named `<constraint>_bgsync`), `NOT VALID`, then validated.
Green holds the same keys as blue at every commit, so both constraints hold for every write; a cutover or
a rollback renames tables and needs no lock on the child tables (an application transaction that writes
a child and then its parent cannot deadlock with it). `finalize` drops the constraints that reference
the retired table and gives the shadows their names. Adding a constraint takes SHARE ROW EXCLUSIVE on
both tables for an instant (under lock_timeout, retried); validating takes SHARE UPDATE EXCLUSIVE, which
blocks no writer. On PostgreSQL before 18 a partitioned child table cannot take a NOT VALID foreign key:
its shadow is validated as it is added, blocking writes to that child for the scan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog, surroundings
from orchestrator.executor import Statement, Unit
from orchestrator.journal import journal_exists
from orchestrator.names import QualifiedName
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, fit_name

Conn = psycopg.Connection[Any]


def shadow_name(constraint: str) -> str:
    return fit_name(constraint, "_bgsync")


@dataclass(frozen=True)
class KeyToAdd:
    name: str
    table: QualifiedName             # the table the constraint is on
    columns: list[str]
    referenced: QualifiedName
    referenced_columns: list[str]
    on_update: str
    on_delete: str
    match: str
    deferrable: bool
    deferred: bool
    not_valid: bool
    why: str


def green_of(spec: MigrationSpec) -> dict[str, str]:
    """blue column -> the green column that copies it unchanged (or as a cast)."""
    return {c.reverse_column: c.name for c in spec.columns
            if c.reverse_column is not None and c.reverse_origin in ("column", "cast")}


def keys_problems(conn: Conn, spec: MigrationSpec, blue_oid: int) -> list[str]:
    """What `validate` refuses: a foreign key (either way) on a column green does not copy unchanged."""
    mapping, problems = green_of(spec), []
    for key in surroundings.outbound_keys(conn, blue_oid):
        missing = [c for c in key.columns + (key.referenced_columns if key.self_reference else []) if c not in mapping]
        if missing:
            problems.append(f"foreign key {key.name} -> {key.referenced.display()}: green does not copy "
                            f"{missing} unchanged, so green cannot take it; drop the constraint first, or copy "
                            f"the column(s) unchanged")
    for fk in catalog.inbound_foreign_keys(conn, str(spec.blue)):
        missing = [c for c in fk.referenced_columns if c not in mapping]
        if missing:
            problems.append(f"foreign key {fk.name} of {fk.table.display()} references {missing}, which green "
                            f"does not copy unchanged; drop or change it before the migration")
    return problems


def keys_notes(conn: Conn, blue_oid: int) -> list[str]:
    """What `validate` tells of a foreign key of blue's that references blue itself with ON DELETE RESTRICT: the
    sync mirrors a changed key as a DELETE of the old key and a write of the new one, in two statements, and
    RESTRICT is checked at once even where the constraint is deferred."""
    return [f"foreign key {key.name} references the table itself with ON DELETE RESTRICT, which is checked at once "
            f"even when deferred: while bgsync keeps a table in sync, a statement that changes a key other rows "
            f"reference (ON UPDATE {key.on_update}, or parents and children re-keyed together) fails on the copy "
            f"the sync writes; make it NO ACTION for the migration (rows whose keys never change are not affected)"
            for key in surroundings.outbound_keys(conn, blue_oid) if key.self_reference and key.on_delete == "RESTRICT"]


@dataclass(frozen=True)
class SelfKey:
    """A foreign key of blue's on blue itself, and its timing."""

    name: str
    deferrable: bool
    deferred: bool


@dataclass(frozen=True)
class JournalSelfKeys:
    """What the journal holds of blue's timing: whether it has the column (a journal from before it was kept
    has not), and the record (None: blue's keys have their own timing)."""

    column: bool
    record: list[SelfKey] | None


def journal_self_keys(conn: Conn, spec: MigrationSpec) -> JournalSelfKeys:
    if not journal_exists(conn, spec.state_schema):
        return JournalSelfKeys(False, None)
    row = conn.execute(sql.SQL("SELECT to_jsonb(m) ? 'self_keys', to_jsonb(m) -> 'self_keys' "
                               "FROM {}.migrations AS m WHERE name = %s").format(sql.Identifier(spec.state_schema)),
                       [spec.name]).fetchone()
    if row is None:
        return JournalSelfKeys(False, None)
    return JournalSelfKeys(bool(row[0]), None if row[1] is None else
                           [SelfKey(k["name"], k["deferrable"], k["deferred"]) for k in row[1]])


def original_self_keys(conn: Conn, spec: MigrationSpec, blue: QualifiedName, recorded: list[SelfKey] | None
                       ) -> list[SelfKey]:
    """Blue's self-referencing foreign keys that green takes, with blue's own timing: the journal's record of
    it while bgsync has blue's deferred (`recorded`, written by the flip that deferred them), else blue's
    catalog (`blue`: blue under the name it has now)."""
    by_name = {k.name: k for k in recorded or []}
    blue_oid = catalog.regclass_oid(conn, str(blue))
    mapping = green_of(spec)
    return [by_name.get(key.name, SelfKey(key.name, key.deferrable, key.deferred))
            for key in ([] if blue_oid is None else surroundings.outbound_keys(conn, blue_oid))
            if key.self_reference and all(c in mapping for c in key.columns)]


@dataclass(frozen=True)
class SelfKeyTiming:
    """One step of a flip: a table's copy of a self-referencing key gets the timing its new role needs."""

    table: QualifiedName
    key: SelfKey
    why: str


@dataclass(frozen=True)
class SelfKeysAfterFlip:
    """What a flip does to the self-referencing foreign keys: each table the sync writes has them checked at
    commit (the sync writes a changed key in two statements, and the children it re-points come after the
    first); a table only applications write has blue's timing. `record` is blue's timing while blue's are
    deferred (kept in the journal for the flip that restores them), else None."""

    steps: list[SelfKeyTiming]
    record: str | None
    recorded: bool             # the journal holds a record now (one to clear, where `record` is None)
    journal_column: bool       # the journal has the column (a journal from before it gets it with the record)


def self_keys_after_flip(conn: Conn, spec: MigrationSpec, *, blue: QualifiedName | None, blue_written: bool,
                         green: QualifiedName, green_written: bool, predicted: bool = False,
                         green_gets: frozenset[str] = frozenset()) -> SelfKeysAfterFlip:
    """The timing steps for blue (`None`: about to be dropped) and green, named as they are when the steps
    run (before the flip's renames). `predicted`: the cutover has not run yet, so blue and green are read
    under their names before it. `green_gets`: the keys green takes before the flip (cutover's)."""
    journal = journal_self_keys(conn, spec)
    originals = original_self_keys(conn, spec, spec.blue if predicted else blue or spec.retired, journal.record)
    if not originals:
        return SelfKeysAfterFlip([], None, False, journal.column)
    read_as = {blue: spec.blue, green: spec.green} if predicted else {}
    steps = []
    for table, written in ((blue, blue_written), (green, green_written)):
        if table is None:
            continue
        present = constraint_names(conn, read_as.get(table, table)) | (green_gets if table == green else set())
        for key in originals:
            if key.name in present:
                steps.append(SelfKeyTiming(
                    table, SelfKey(key.name, True, True) if written else key,
                    "is checked at commit: the sync writes this table" if written
                    else "has blue's timing again: only applications write this table"))
    record = json.dumps([dataclasses.asdict(k) for k in originals]) if blue is not None and blue_written else None
    # a predicted flip after cutover finds the record cutover will have written
    return SelfKeysAfterFlip(steps, record, predicted or journal.record is not None, journal.column)


def constraint_names(conn: Conn, table: QualifiedName) -> set[str]:
    return {str(r[0]) for r in conn.execute(
        "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = to_regclass(%s)", [str(table)])}


def keys_to_add(conn: Conn, spec: MigrationSpec) -> list[KeyToAdd]:
    """The foreign keys green still lacks, and the shadows the child tables still lack."""
    blue_oid = catalog.regclass_oid(conn, str(spec.blue))
    if blue_oid is None:
        return []
    mapping = green_of(spec)
    on_green = {r[0] for r in conn.execute(
        "SELECT conname FROM pg_constraint WHERE contype = 'f' AND conrelid = to_regclass(%s)", [str(spec.green)])}
    version = int(conn.info.server_version)
    out: list[KeyToAdd] = []
    for key in surroundings.outbound_keys(conn, blue_oid):
        if key.name in on_green or any(c not in mapping for c in key.columns):
            continue
        referenced, ref_columns = key.referenced, key.referenced_columns
        deferrable, deferred, why = key.deferrable, key.deferred, ""
        if key.self_reference:
            # checked at commit while the sync writes green (`self_keys_after_flip`)
            referenced, ref_columns = spec.green, [mapping.get(c, c) for c in key.referenced_columns]
            deferrable, deferred, why = True, True, ", checked at commit while the sync writes green"
        out.append(KeyToAdd(key.name, spec.green, [mapping[c] for c in key.columns], referenced, ref_columns,
                            key.on_update, key.on_delete, key.match, deferrable, deferred, True,
                            f"blue's foreign key {key.name} -> {key.referenced.display()}{why}"))
    for fk in catalog.inbound_foreign_keys(conn, str(spec.blue)):
        shadow = shadow_name(fk.name)
        exists = conn.execute("SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s",
                              [str(fk.table), shadow]).fetchone()
        if exists or any(c not in mapping for c in fk.referenced_columns):
            continue
        out.append(KeyToAdd(shadow, fk.table, fk.columns, spec.green, [mapping[c] for c in fk.referenced_columns],
                            fk.on_update, fk.on_delete, fk.match, fk.deferrable, fk.deferred,
                            not fk.partitioned or version >= 180000,
                            f"the twin of {fk.name} of {fk.table.display()}, referencing green"))
    return out


def keys_units(conn: Conn, spec: MigrationSpec, lock_timeout: str, attempts: int, phase: str) -> list[Unit]:
    """One short transaction per constraint to add, then the validations (outside any transaction)."""
    units = []
    adds = keys_to_add(conn, spec)
    for key in adds:
        steps = render_steps("keys_add.sql.j2", key=key)
        units.append(Unit(f"{phase} {spec.name}: foreign key {key.name} on {key.table.display()} ({key.why})",
                          [Statement(d, s) for d, s in steps], lock_timeout=lock_timeout, attempts=attempts,
                          phase=phase))
    pending = [(k.table, k.name) for k in adds if k.not_valid]
    pending += [(QualifiedName(r[0], r[1]), str(r[2])) for r in conn.execute(
        """SELECT n.nspname, t.relname, c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE c.contype = 'f' AND NOT c.convalidated AND c.conparentid = 0
              AND (c.conrelid = to_regclass(%s) OR (c.confrelid = to_regclass(%s) AND c.conname LIKE '%%\\_bgsync'))
            ORDER BY 1, 2, 3""", [str(spec.green), str(spec.green)])]
    pending = list(dict.fromkeys(pending))
    if pending:
        steps = render_steps("keys_validate.sql.j2", keys=pending)
        units.append(Unit(f"{phase} {spec.name}: validate the foreign keys green took (writers keep going)",
                          [Statement(d, s) for d, s in steps], atomic=False, phase=phase))
    return units


def shadows_of(conn: Conn, table: QualifiedName) -> list[tuple[QualifiedName, str]]:
    """(child table, shadow constraint) of the shadows that reference `table`."""
    return [(QualifiedName(r[0], r[1]), str(r[2])) for r in conn.execute(
        """SELECT n.nspname, t.relname, c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE c.contype = 'f' AND c.confrelid = to_regclass(%s) AND c.conparentid = 0
              AND c.conname LIKE '%%\\_bgsync' ORDER BY 1, 2, 3""", [str(table)])]


def retired_keys(conn: Conn, retired: QualifiedName, live: QualifiedName
                 ) -> list[tuple[QualifiedName, str, str | None]]:
    """For finalize: (child table, constraint referencing the retired table, its shadow referencing the
    live table, or None when the child has none)."""
    shadows = {(t, n) for t, n in shadows_of(conn, live)}
    return [(fk.table, fk.name, shadow_name(fk.name) if (fk.table, shadow_name(fk.name)) in shadows else None)
            for fk in catalog.inbound_foreign_keys(conn, str(retired))]
