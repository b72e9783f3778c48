"""rollback: before cutover, drop the triggers and green; after cutover, swap back in one short
transaction (blue is current thanks to reverse sync) and resume forward sync, so the DBA can verify
and cut over again. Everything the cutover moved comes back as the journal recorded it."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.catalog import ViewDef
from orchestrator.executor import Statement, Unit
from orchestrator.names import QualifiedName
from orchestrator.phases.cutover import (
    FreeNames,
    Rename,
    own_views_excluded,
    plan_flip,
    sequence_pairs,
    surround_from_json,
    trigger_statements,
)
from orchestrator.phases.expose import version_views
from orchestrator.phases.keys import retired_keys, self_keys_after_flip, shadow_name, shadows_of
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, forward_sync, reverse_sync

Conn = psycopg.Connection[Any]


def teardown_unit(conn: Conn, spec: MigrationSpec, lock_timeout: str, attempts: int) -> Unit:
    steps = render_steps("teardown.sql.j2", spec=spec, forward=forward_sync(spec),
                         shadows=shadows_of(conn, spec.green))
    return Unit(f"rollback {spec.name}: drop the forward triggers and green {spec.green.display()}",
                [Statement(d, s) for d, s in steps], lock_timeout=lock_timeout, attempts=attempts, phase="rollback")


def live_table(spec: MigrationSpec, mode: str) -> QualifiedName:
    """The table the application writes after cutover: green under blue's name, or green behind a view."""
    return spec.blue if mode == "rename" else spec.green


def views_on_live(conn: Conn, spec: MigrationSpec, mode: str) -> list[ViewDef]:
    """The views that read the live table now (in view mode: the live view and green itself)."""
    found = catalog.dependent_views(conn, str(spec.blue))
    if mode == "view":
        names = {v.name for v in found}
        found += [v for v in catalog.dependent_views(conn, str(spec.green)) if v.name not in names
                  and v.name != spec.blue]
    return own_views_excluded(spec, found)


def uncutover_unit(conn: Conn, spec: MigrationSpec, record: dict[str, Any], lock_timeout: str, attempts: int,
                   current_user: str) -> Unit:
    """Rollback after cutover: undo what the cutover recorded, reading what depends on the live table
    now from the catalog."""
    mode = str(record.get("mode", "rename"))
    live = live_table(spec, mode)
    views = views_on_live(conn, spec, mode)
    sequences = sequence_pairs(conn, spec, live, spec.retired, spec.retired)
    return _uncutover(conn, spec, record, views, sequences, lock_timeout, attempts, current_user)


def predicted_uncutover_unit(conn: Conn, spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int,
                             current_user: str) -> Unit:
    """Rollback after a cutover that has not run yet: the state the cutover would leave behind, from the
    same flip that the cutover prints and runs."""
    flip = plan_flip(conn, spec, mode)
    renamed = {(r.schema, r.old): r.new for r in flip.renames if r.kind == "sequence"}

    def after_cutover(seq: QualifiedName) -> QualifiedName:
        return QualifiedName(seq.schema, renamed.get((seq.schema, seq.name), seq.name))

    # after the flip, the live table's sequence is green's (under blue's old name), the retired one blue's
    sequences = [{"from_seq": after_cutover(pair["to_seq"]), "to_seq": after_cutover(pair["from_seq"]),
                  "column": pair["column"], "table": spec.retired} for pair in flip.sequences]
    return _uncutover(conn, spec, flip.record, flip.surround.plain_views, sequences, lock_timeout, attempts,
                      current_user, predicted=True)


def _uncutover(conn: Conn, spec: MigrationSpec, record: dict[str, Any], views: list[ViewDef],
               sequences: list[dict[str, Any]], lock_timeout: str, attempts: int, current_user: str, *,
               predicted: bool = False) -> Unit:
    mode = str(record.get("mode", "rename"))
    live = live_table(spec, mode)
    surround = surround_from_json(record.get("surround"))
    renames: list[Rename] = []
    parked = None
    if mode == "view":
        parked = FreeNames(conn).get(spec.blue.schema, f"{spec.blue.name}_bgsync_parked")
        renames.append(Rename("view", spec.blue.schema, spec.blue.name, parked))
    renames += [Rename(**r).inverse() for r in reversed(record.get("renames", []))]
    plain_now = [v for v in views if v.kind == "v"]
    window = bool(record.get("window"))
    lock = [*([spec.blue] if mode == "view" else []), live, spec.retired, *(v.name for v in plain_now)]
    if window:
        lock = [*version_views(spec), *lock]
    blue_column = {c.name: c.reverse_column or c.name for c in spec.columns}
    steps = render_steps(
        "uncutover.sql.j2", spec=spec, spec_mode=mode, live=live, forward=forward_sync(spec),
        reverse=reverse_sync(spec, live), sequences=sequences, renames=renames, views=plain_now,
        current_user=current_user,
        parked_view=None if parked is None else QualifiedName(spec.blue.schema, parked),
        lock_relations=list(dict.fromkeys(lock)), lock_timeout=lock_timeout,
        functions=surround.functions, drop_triggers=surround.triggers, trigger_source=live,
        drop_policies=surround.rls.policies, rls_off=surround.rls.enabled or surround.rls.forced,
        policy_source=live, publications=surround.publications, publication_source=live,
        create_views=surround.plain_views,
        queries={str(v.name): v.definition.strip().rstrip(";") for v in surround.plain_views},
        create_triggers=trigger_statements(surround.triggers, spec.blue),
        rls=dataclasses.replace(surround.rls, enabled=False, forced=False, policies=[]),
        add_publications=surround.publications,
        shared_sequences=[(c.shared_sequence, blue_column[c.name]) for c in spec.columns if c.shared_sequence],
        matviews=surround.matviews, window=window,
        window_views=list(version_views(spec)) if window else [],
        self_keys=self_keys_after_flip(conn, spec, blue=spec.retired, blue_written=False, green=live,
                                       green_written=True, predicted=predicted))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"rollback {spec.name} refused: the migration is no longer cut over")
    return Unit(f"rollback {spec.name}: swap back to blue {spec.blue.display()} and resume forward sync",
                statements, lock_timeout=lock_timeout, attempts=attempts, phase="rollback")


def finalize_units(conn: Conn, spec: MigrationSpec, record: dict[str, Any], lock_timeout: str, attempts: int,
                   *, predicted: bool = False) -> list[Unit]:
    """Two transactions: the reverse triggers leave the live table (a short lock on it), then the retired
    table goes with its old materialized views (no lock on the live table while it is dropped)."""
    mode = str(record.get("mode", "rename"))
    surround = surround_from_json(record.get("surround"))
    reverse = reverse_sync(spec, live_table(spec, mode))
    window = bool(record.get("window"))
    unhooking = [Statement(d, s) for d, s in render_steps(
        "finalize_unhook.sql.j2", spec=spec, reverse=reverse, lock_timeout=lock_timeout,
        lock_relations=[*(version_views(spec) if window else []), live_table(spec, mode)], window=window,
        live=live_table(spec, mode),
        self_keys=self_keys_after_flip(conn, spec, blue=None, blue_written=False, green=live_table(spec, mode),
                                       green_written=False, predicted=predicted))]
    unhooking[-1] = Statement(unhooking[-1].description, unhooking[-1].sql,
                              expect_rows=f"finalize {spec.name} refused: the migration is no longer cut over")
    unhook = Unit(f"finalize {spec.name}: the reverse sync leaves the live table {spec.blue.display()}", unhooking,
                  lock_timeout=lock_timeout, attempts=attempts, phase="finalize")
    live = live_table(spec, mode)
    keys: list[tuple[QualifiedName, str, str | None]]
    if predicted:   # before cutover: blue's foreign keys will reference the retired table, their twins green
        keys = [(fk.table, fk.name, shadow_name(fk.name)) for fk in catalog.inbound_foreign_keys(conn, str(spec.blue))]
    else:
        keys = retired_keys(conn, spec.retired, live)
    steps = render_steps("finalize.sql.j2", spec=spec, forward=forward_sync(spec), reverse=reverse,
                         matviews=surround.matviews, retired_keys=keys,
                         window_views=[version_views(spec)[0]] if window else [])
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"finalize {spec.name} refused: the migration is not being finalized")
    drop = Unit(f"finalize {spec.name}: drop the retired table {spec.retired.display()}", statements,
                lock_timeout=lock_timeout, attempts=attempts, phase="finalize")
    return [unhook, drop]
