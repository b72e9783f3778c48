"""rollback: before cutover, drop the triggers and green; after cutover, swap back in one short
transaction (blue is current thanks to reverse sync) and resume forward sync, so the DBA can verify
and cut over again."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.catalog import ForeignKey, ViewDef
from orchestrator.executor import Statement, Unit
from orchestrator.names import QualifiedName
from orchestrator.phases.cutover import FreeNames, Rename, _refuse_materialized, fk_columns, plan_flip, sequence_pairs
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, forward_sync, reverse_sync

Conn = psycopg.Connection[Any]


def teardown_unit(spec: MigrationSpec, lock_timeout: str, attempts: int) -> Unit:
    steps = render_steps("teardown.sql.j2", spec=spec, forward=forward_sync(spec))
    return Unit(f"rollback {spec.name}: drop the forward triggers and green {spec.green.display()}",
                [Statement(d, s) for d, s in steps], lock_timeout=lock_timeout, attempts=attempts, phase="rollback")


def live_table(spec: MigrationSpec, mode: str) -> Any:
    """The table the application writes after cutover: green under blue's name, or green behind a view."""
    return spec.blue if mode == "rename" else spec.green


def uncutover_unit(conn: Conn, spec: MigrationSpec, record: dict[str, Any], lock_timeout: str, attempts: int,
                   current_user: str) -> tuple[Unit, list[ForeignKey]]:
    """Rollback after cutover: undo the renames the cutover recorded, reading what depends on the live
    table from the catalog."""
    mode = str(record.get("mode", "rename"))
    live = live_table(spec, mode)
    views = catalog.dependent_views(conn, str(spec.blue))
    _refuse_materialized(views)
    fks = catalog.inbound_foreign_keys(conn, str(live))
    sequences = sequence_pairs(conn, spec, live, spec.retired, spec.retired)
    return _uncutover(conn, spec, record, views, fks, sequences, lock_timeout, attempts, current_user)


def predicted_uncutover_unit(conn: Conn, spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int,
                             current_user: str) -> tuple[Unit, list[ForeignKey]]:
    """Rollback after a cutover that has not run yet: the state the cutover would leave behind, from the
    same plan of renames, sequence moves, views and foreign keys that the cutover prints and runs."""
    flip = plan_flip(conn, spec, mode)
    fks = [dataclasses.replace(fk, referenced_columns=flip.fk_columns[fk.name]) for fk in flip.fks]
    renamed = {(r.schema, r.old): r.new for r in flip.renames if r.kind == "sequence"}

    def after_cutover(seq: QualifiedName) -> QualifiedName:
        return QualifiedName(seq.schema, renamed.get((seq.schema, seq.name), seq.name))

    # after the flip, the live table's sequence is green's (under blue's old name), the retired one blue's
    sequences = [{"from_seq": after_cutover(pair["to_seq"]), "to_seq": after_cutover(pair["from_seq"]),
                  "column": pair["column"], "table": spec.retired} for pair in flip.sequences]
    return _uncutover(conn, spec, flip.record, flip.views, fks, sequences, lock_timeout, attempts, current_user)


def _uncutover(conn: Conn, spec: MigrationSpec, record: dict[str, Any], views: list[ViewDef], fks: list[ForeignKey],
               sequences: list[dict[str, Any]], lock_timeout: str, attempts: int, current_user: str
               ) -> tuple[Unit, list[ForeignKey]]:
    mode = str(record.get("mode", "rename"))
    live = live_table(spec, mode)
    columns = fk_columns(spec, fks, to_green=False)
    renames: list[Rename] = []
    parked = None
    if mode == "view":
        parked = FreeNames(conn).get(spec.blue.schema, f"{spec.blue.name}_bgsync_parked")
        renames.append(Rename("view", spec.blue.schema, spec.blue.name, parked))
    renames += [Rename(**r).inverse() for r in reversed(record.get("renames", []))]
    steps = render_steps(
        "uncutover.sql.j2", spec=spec, spec_mode=mode, live=live, forward=forward_sync(spec),
        reverse=reverse_sync(spec, live), sequences=sequences, renames=renames, views=views, fks=fks,
        fk_target=spec.blue, fk_columns=columns, current_user=current_user,
        parked_view=None if parked is None else QualifiedName(spec.blue.schema, parked))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"rollback {spec.name} refused: the migration is no longer cut over")
    unit = Unit(f"rollback {spec.name}: swap back to blue {spec.blue.display()} and resume forward sync",
                statements, lock_timeout=lock_timeout, attempts=attempts, phase="rollback")
    return unit, fks


def finalize_unit(spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int) -> Unit:
    steps = render_steps("finalize.sql.j2", spec=spec, forward=forward_sync(spec),
                         reverse=reverse_sync(spec, live_table(spec, mode)))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"finalize {spec.name} refused: the migration is no longer cut over")
    return Unit(f"finalize {spec.name}: drop reverse sync and the retired table {spec.retired.display()}",
                statements, lock_timeout=lock_timeout, attempts=attempts, phase="finalize")
