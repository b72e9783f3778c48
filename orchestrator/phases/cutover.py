"""cutover: flip the live name to green in one short transaction under lock_timeout, with bounded
retries; sequences, index names, dependent views and inbound foreign keys follow; reverse sync
keeps blue current so rollback is instant and loses nothing.

Green's shape (its key, indexes and own sequences) comes from the plan, not from green's catalog,
so the cutover's SQL can be printed before prepare has created green; what a real run reads from
the catalog (blue's index and sequence names, dependent views, inbound foreign keys, the name
PostgreSQL gives an identity column's sequence) is read when it runs, and marked in the SQL."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.catalog import ForeignKey, IndexName, ViewDef
from orchestrator.errors import GateRefused
from orchestrator.executor import Statement, Unit
from orchestrator.names import NAMEDATALEN_BYTES, QualifiedName
from orchestrator.render import render_steps
from orchestrator.spec import GreenColumn, MigrationSpec, fit_name, forward_sync, reverse_sync

Conn = psycopg.Connection[Any]


@dataclass
class Rename:
    kind: str          # table | index | constraint | sequence | view
    schema: str
    old: str
    new: str
    table: str = ""    # for constraints: the table's name when the rename runs

    def inverse(self) -> Rename:
        table = self.table
        return Rename(self.kind, self.schema, self.new, self.old, table)


class FreeNames:
    """Hands out relation names not taken in a schema (nor by an earlier hand-out, nor reserved)."""

    def __init__(self, conn: Conn, reserved: set[tuple[str, str]] | None = None) -> None:
        self.conn = conn
        self.taken: set[tuple[str, str]] = set(reserved or ())

    def get(self, schema: str, base: str, suffix: str = "") -> str:
        candidate, n = fit_name(base, suffix), 1
        while (schema, candidate) in self.taken or catalog.relation_exists(self.conn, QualifiedName(schema, candidate)):
            n += 1
            candidate = fit_name(f"{base}{n}", suffix)
        self.taken.add((schema, candidate))
        return candidate


def _retired_index_name(index: str, blue: str, retired: str) -> tuple[str, str]:
    if index.startswith(blue):
        return retired + index[len(blue):], ""
    return f"{retired}_{index}", ""


def _object_name(name1: str, name2: str, label: str) -> str:
    """PostgreSQL's makeObjectName: `name1_name2_label`, the longer of name1 and name2 shortened first
    so that the whole fits in NAMEDATALEN - 1 bytes."""
    b1, b2 = name1.encode(), name2.encode()
    room = NAMEDATALEN_BYTES - (len(b2) + 1) - (len(label.encode()) + 1)
    n1, n2 = len(b1), len(b2)
    while n1 + n2 > room:
        if n1 > n2:
            n1 -= 1
        else:
            n2 -= 1
    part1 = b1[:n1].decode(errors="ignore")
    part2 = b2[:n2].decode(errors="ignore")
    return f"{part1}_{part2}_{label}"


def identity_sequence(conn: Conn, green: QualifiedName, column: str) -> QualifiedName:
    """The sequence of green's identity column: read from the catalog once green exists; before prepare,
    the name PostgreSQL will choose (ChooseRelationName: table_column_seq, then seq1, seq2, ...)."""
    if catalog.relation_exists(conn, green):
        found = catalog.serial_sequence(conn, str(green), column)
        if found is not None:
            return found
    label, n = "seq", 0
    while True:
        candidate = QualifiedName(green.schema, _object_name(green.name, column, label))
        if not catalog.relation_exists(conn, candidate):
            return candidate
        n += 1
        label = f"seq{n}"


def green_sequence(conn: Conn, spec: MigrationSpec, col: GreenColumn) -> QualifiedName | None:
    """Green's own sequence for an inherited serial (named by the plan's spec) or identity column."""
    if col.sequence:
        return QualifiedName(spec.green.schema, col.sequence)
    if col.identity:
        return identity_sequence(conn, spec.green, col.name)
    return None


def green_indexes(spec: MigrationSpec) -> list[IndexName]:
    """Green's indexes as prepare and the backfill create them from the plan: its key, then the deferred ones."""
    key = IndexName(spec.primary_key_name, tuple(spec.green_key), True, True, True)
    return [key, *(IndexName(ix.name, tuple(ix.columns), ix.unique, False, False) for ix in spec.indexes)]


def green_names(conn: Conn, spec: MigrationSpec) -> set[tuple[str, str]]:
    """The relation names green brings (table, key, indexes, sequences), whether it exists yet or not."""
    names = {(spec.green.schema, spec.green.name)}
    names |= {(spec.green.schema, ix.name) for ix in green_indexes(spec)}
    for col in spec.columns:
        seq = green_sequence(conn, spec, col)
        if seq is not None:
            names.add((seq.schema, seq.name))
    return names


def sequence_pairs(conn: Conn, spec: MigrationSpec, source: QualifiedName, target: QualifiedName,
                   target_table: QualifiedName) -> list[dict[str, Any]]:
    """For each inherited identity/serial column: the sequence to continue from and the one to advance."""
    pairs = []
    for col in spec.columns:
        if not (col.identity or col.sequence):
            continue
        from_seq = catalog.serial_sequence(conn, str(source), col.name)
        to_seq = catalog.serial_sequence(conn, str(target), col.name)
        if from_seq and to_seq:
            pairs.append({"from_seq": from_seq, "to_seq": to_seq, "column": col.name, "table": target_table})
    return pairs


def fk_columns(spec: MigrationSpec, fks: list[ForeignKey], *, to_green: bool) -> dict[str, list[str]]:
    """Referenced columns renamed through the plan's unchanged copies (blue column <-> green column)."""
    green_of = {c.reverse_column: c.name for c in spec.columns
                if c.reverse_column is not None and c.reverse_expr is not None and c.source_expr is not None}
    blue_of = {g: b for b, g in green_of.items()}
    mapping = green_of if to_green else blue_of
    out: dict[str, list[str]] = {}
    for fk in fks:
        missing = [c for c in fk.referenced_columns if c not in mapping]
        if missing:
            raise GateRefused(f"foreign key {fk.name} of {fk.table.display()} references {missing}, which "
                              f"green does not copy unchanged; drop or adjust it before cutover")
        out[fk.name] = [mapping[c] for c in fk.referenced_columns]
    return out


def _refuse_materialized(views: list[ViewDef]) -> None:
    materialized = [v.name.display() for v in views if v.kind == "m"]
    if materialized:
        raise GateRefused(f"materialized view(s) {', '.join(materialized)} read the live table and cannot be "
                          f"re-pointed in place; drop them before cutover and re-create them after")


@dataclass
class Flip:
    """What one cutover moves: read from blue's catalog, with green's side known from the plan."""

    mode: str
    live: QualifiedName                 # the table the application writes after the flip
    views: list[ViewDef]
    fks: list[ForeignKey]
    fk_columns: dict[str, list[str]]    # inbound foreign key -> green columns it references
    sequences: list[dict[str, Any]]     # from_seq (blue's), to_seq (green's), column, table
    renames: list[Rename]

    @property
    def record(self) -> dict[str, Any]:
        """What the journal keeps, so that rollback undoes exactly these renames."""
        return {"mode": self.mode, "renames": [asdict(r) for r in self.renames]}


def plan_flip(conn: Conn, spec: MigrationSpec, mode: str) -> Flip:
    """The renames, sequence moves, views and foreign keys of a cutover, the same before prepare (green
    predicted from the plan) as when it runs."""
    blue, green, retired = spec.blue, spec.green, spec.retired
    if mode == "rename" and green.schema != blue.schema:
        raise GateRefused(f"rename cutover needs green in blue's schema {blue.schema!r}; use cutover.mode: view")
    views = catalog.dependent_views(conn, str(blue))
    _refuse_materialized(views)
    fks = catalog.inbound_foreign_keys(conn, str(blue))
    columns = fk_columns(spec, fks, to_green=True)
    free = FreeNames(conn, reserved=green_names(conn, spec))
    renames: list[Rename] = []
    sequences: list[dict[str, Any]] = []
    for col in spec.columns:
        if not (col.identity or col.sequence):
            continue
        from_seq = catalog.serial_sequence(conn, str(blue), col.name)
        to_seq = green_sequence(conn, spec, col)
        if from_seq and to_seq:
            sequences.append({"from_seq": from_seq, "to_seq": to_seq, "column": col.name, "table": green})
    for pair in sequences:
        b, g = pair["from_seq"], pair["to_seq"]
        renames.append(Rename("sequence", b.schema, b.name, free.get(b.schema, f"{retired.name}_{pair['column']}",
                                                                      "_seq")))
        if g.schema == b.schema:
            renames.append(Rename("sequence", g.schema, g.name, b.name))
    if mode == "rename":
        blue_indexes = catalog.index_names(conn, str(blue))
        for ix in blue_indexes:
            base, _ = _retired_index_name(ix.name, blue.name, retired.name)
            new = free.get(blue.schema, base)
            renames.append(Rename("constraint" if ix.constraint else "index", blue.schema, ix.name, new,
                                  blue.name))
        renames.append(Rename("table", blue.schema, blue.name, retired.name))
        renames.append(Rename("table", green.schema, green.name, blue.name))
        for gx in green_indexes(spec):
            match = next((bx for bx in blue_indexes
                          if (bx.primary and gx.primary)
                          or (not bx.primary and not gx.primary and bx.columns == gx.columns
                              and bx.unique == gx.unique)), None)
            if match is not None:
                blue_indexes.remove(match)
                renames.append(Rename("constraint" if gx.constraint else "index", green.schema, gx.name,
                                      match.name, blue.name))
        live = blue
    else:
        renames.append(Rename("table", blue.schema, blue.name, retired.name))
        live = green
    return Flip(mode=mode, live=live, views=views, fks=fks, fk_columns=columns, sequences=sequences,
                renames=renames)


def cutover_units(conn: Conn, spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int,
                  current_user: str) -> tuple[Unit, list[ForeignKey]]:
    flip = plan_flip(conn, spec, mode)
    steps = render_steps(
        "cutover.sql.j2", spec=spec, spec_mode=mode, forward=forward_sync(spec),
        reverse=reverse_sync(spec, flip.live), sequences=flip.sequences, renames=flip.renames, views=flip.views,
        fks=flip.fks, fk_target=flip.live, fk_columns=flip.fk_columns, view_columns=[c.name for c in spec.columns],
        current_user=current_user, record=json.dumps(flip.record))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"cutover {spec.name} refused: the migration is no longer verified")
    unit = Unit(f"cutover {spec.name}: {spec.blue.display()} becomes green ({mode} mode)", statements,
                lock_timeout=lock_timeout, attempts=attempts, phase="cutover")
    return unit, flip.fks


def validate_fk_unit(spec: MigrationSpec, fks: list[ForeignKey], phase: str) -> Unit | None:
    if not fks:
        return None
    steps = render_steps("validate_fks.sql.j2", fks=fks)
    return Unit(f"{phase} {spec.name}: validate re-pointed foreign keys", [Statement(d, s) for d, s in steps],
                atomic=False, phase=phase)
