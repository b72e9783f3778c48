"""cutover: flip the live name to green in one short transaction under lock_timeout, with bounded
retries; sequences, index names, dependent views and inbound foreign keys follow; reverse sync
keeps blue current so rollback is instant and loses nothing."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.catalog import ForeignKey, ViewDef
from orchestrator.errors import GateRefused
from orchestrator.executor import Statement, Unit
from orchestrator.names import QualifiedName
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, fit_name, forward_sync, reverse_sync

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
    """Hands out relation names not taken in a schema (nor by an earlier hand-out)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.taken: set[tuple[str, str]] = set()

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


def cutover_units(conn: Conn, spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int,
                  current_user: str) -> tuple[Unit, list[ForeignKey]]:
    blue, green, retired = spec.blue, spec.green, spec.retired
    if mode == "rename" and green.schema != blue.schema:
        raise GateRefused(f"rename cutover needs green in blue's schema {blue.schema!r}; use cutover.mode: view")
    views = catalog.dependent_views(conn, str(blue))
    _refuse_materialized(views)
    fks = catalog.inbound_foreign_keys(conn, str(blue))
    columns = fk_columns(spec, fks, to_green=True)
    free = FreeNames(conn)
    renames: list[Rename] = []
    sequences = sequence_pairs(conn, spec, blue, green, green)
    for pair in sequences:
        b, g = pair["from_seq"], pair["to_seq"]
        renames.append(Rename("sequence", b.schema, b.name, free.get(b.schema, f"{retired.name}_{pair['column']}",
                                                                      "_seq")))
        if g.schema == b.schema:
            renames.append(Rename("sequence", g.schema, g.name, b.name))
    if mode == "rename":
        blue_indexes = catalog.index_names(conn, str(blue))
        green_indexes = catalog.index_names(conn, str(green))
        for ix in blue_indexes:
            base, _ = _retired_index_name(ix.name, blue.name, retired.name)
            new = free.get(blue.schema, base)
            renames.append(Rename("constraint" if ix.constraint else "index", blue.schema, ix.name, new,
                                  blue.name))
        renames.append(Rename("table", blue.schema, blue.name, retired.name))
        renames.append(Rename("table", green.schema, green.name, blue.name))
        for gx in green_indexes:
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
    record = {"mode": mode, "renames": [asdict(r) for r in renames]}
    steps = render_steps(
        "cutover.sql.j2", spec=spec, spec_mode=mode, forward=forward_sync(spec), reverse=reverse_sync(spec, live),
        sequences=sequences, renames=renames, views=views, fks=fks, fk_target=live, fk_columns=columns,
        view_columns=[c.name for c in spec.columns], current_user=current_user, record=json.dumps(record))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"cutover {spec.name} refused: the migration is no longer verified")
    unit = Unit(f"cutover {spec.name}: {blue.display()} becomes green ({mode} mode)", statements,
                lock_timeout=lock_timeout, attempts=attempts, phase="cutover")
    return unit, fks


def validate_fk_unit(spec: MigrationSpec, fks: list[ForeignKey], phase: str) -> Unit | None:
    if not fks:
        return None
    steps = render_steps("validate_fks.sql.j2", fks=fks)
    return Unit(f"{phase} {spec.name}: validate re-pointed foreign keys", [Statement(d, s) for d, s in steps],
                atomic=False, phase=phase)
