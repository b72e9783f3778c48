"""expose: two releases of the application side by side.

After a passing verify, both directions of sync run at once (loop-guarded: see `_sync.sql.j2`) and
the schemas of `versions` are created, each with one writable view named like the live table: blue's
shape in `versions.blue`, green's in `versions.green`, with the table's owner and grants. An
application release picks its shape with search_path. Inserts through either view draw identity and
serial values from one sequence (the live table's), so they never collide. `cutover` from the window
flips the live name and keeps the window; `rollback` closes it; `finalize` keeps `versions.green`."""

from __future__ import annotations

from typing import Any

import psycopg

from orchestrator import catalog
from orchestrator.errors import GateRefused
from orchestrator.executor import Statement, Unit
from orchestrator.names import QualifiedName
from orchestrator.phases.keys import self_keys_after_flip
from orchestrator.render import render_steps
from orchestrator.spec import MigrationSpec, forward_sync, reverse_sync

Conn = psycopg.Connection[Any]


def version_views(spec: MigrationSpec) -> tuple[QualifiedName, QualifiedName]:
    """(blue's view, green's view): the live table's name in each version schema."""
    if not spec.versions:
        raise GateRefused(f"plan {spec.name} has no `versions: {{blue: SCHEMA, green: SCHEMA}}`; expose needs the "
                          f"two schemas it creates")
    return (QualifiedName(spec.versions["blue"], spec.blue.name),
            QualifiedName(spec.versions["green"], spec.blue.name))


def sequence_defaults(conn: Conn, spec: MigrationSpec, *, live: QualifiedName, live_is_green: bool
                      ) -> list[tuple[QualifiedName, str, str]]:
    """(view, column, sequence): each view's identity and serial columns draw from the live table's
    sequence, whichever shape inserts."""
    blue_view, green_view = version_views(spec)
    out: list[tuple[QualifiedName, str, str]] = []
    for col in spec.columns:
        if not (col.identity or col.sequence or col.shared_sequence) or col.reverse_column is None:
            continue
        sequence = catalog.serial_sequence(conn, str(live), col.name if live_is_green else col.reverse_column)
        if sequence is None:
            continue
        out.append((blue_view, col.reverse_column, str(sequence)))
        out.append((green_view, col.name, str(sequence)))
    return out


def grantees(spec: MigrationSpec) -> list[str]:
    return list(dict.fromkeys(grantee for grantee, _, _ in spec.grants))


def expose_unit(conn: Conn, spec: MigrationSpec, lock_timeout: str, attempts: int, current_user: str) -> Unit:
    blue_view, green_view = version_views(spec)
    steps = render_steps(
        "expose.sql.j2", spec=spec, lock_relations=[spec.blue, spec.green], lock_timeout=lock_timeout,
        forward=forward_sync(spec, two_way=True), reverse=reverse_sync(spec, spec.green, target=spec.blue,
                                                                        two_way=True),
        blue_view=blue_view, green_view=green_view, green_columns=[c.name for c in spec.columns],
        defaults=sequence_defaults(conn, spec, live=spec.blue, live_is_green=False), grantees=grantees(spec),
        current_user=current_user,
        self_keys=self_keys_after_flip(conn, spec, blue=spec.blue, blue_written=True, green=spec.green,
                                       green_written=True))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"expose {spec.name} refused: the migration is no longer verified")
    return Unit(f"expose {spec.name}: both releases write, blue's shape in {blue_view.schema}, green's in "
                f"{green_view.schema}", statements, lock_timeout=lock_timeout, attempts=attempts, phase="expose")


def close_unit(conn: Conn, spec: MigrationSpec, lock_timeout: str, attempts: int) -> Unit:
    """Rollback from the window before cutover: one-way sync again, the version schemas gone."""
    blue_view, green_view = version_views(spec)
    steps = render_steps(
        "expose_close.sql.j2", spec=spec, lock_relations=[blue_view, green_view, spec.blue, spec.green],
        lock_timeout=lock_timeout,
        forward=forward_sync(spec), reverse=reverse_sync(spec, spec.green, target=spec.blue),
        views=[blue_view, green_view],
        self_keys=self_keys_after_flip(conn, spec, blue=spec.blue, blue_written=False, green=spec.green,
                                       green_written=True))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"rollback {spec.name} refused: the migration is no longer exposed")
    return Unit(f"rollback {spec.name}: close the window (both releases), blue stays live", statements,
                lock_timeout=lock_timeout, attempts=attempts, phase="rollback")
