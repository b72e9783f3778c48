"""validate: the plan against the live catalog. Reads only; its probes run in a rolled-back transaction."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator import catalog, origin, surroundings
from orchestrator.catalog import Dependent, TableInfo
from orchestrator.errors import DatabaseError, GateRefused, PlanError
from orchestrator.expressions import column_refs
from orchestrator.journal import MigrationRow, get_migration
from orchestrator.names import QualifiedName, parse_qualified_name, quote_ident
from orchestrator.phases.cutover import (
    FreeNames,
    Surround,
    publication_columns,
    read_surround,
    view_columns_kept,
    view_queries,
)
from orchestrator.phases.keys import green_of, keys_notes, keys_problems
from orchestrator.plan import Plan
from orchestrator.render import render_steps
from orchestrator.rewrite import index_statement, on_relation, retarget
from orchestrator.spec import PINNED_SETTINGS, GreenColumn, MigrationSpec, build_spec, forward_sync, reverse_sync
from orchestrator.surroundings import RowSecurity, TableProperties

Conn = psycopg.Connection[Any]
RELKINDS = {"v": "view", "m": "materialized view", "p": "partitioned table", "f": "foreign table",
            "S": "sequence", "i": "index", "c": "composite type", "t": "TOAST table"}
# What a STABLE expression's functions and types say about the settings it reads.
SETTING_HINTS = (("with time zone", "TimeZone"), ("timestamptz", "TimeZone"), ("date", "DateStyle"),
                 ("timestamp", "DateStyle"), ("interval", "IntervalStyle"), ("double precision", "extra_float_digits"),
                 ("real", "extra_float_digits"), ("money", "lc_monetary"), ("bytea", "bytea_output"),
                 ("to_char", "lc_time"), ("to_char", "lc_numeric"), ("reg", "search_path"), ("xml", "xmloption"))
REHEARSAL_ROWS = 3


@dataclass
class Validation:
    plan: Plan
    blue: TableInfo
    spec: MigrationSpec
    dependents: list[Dependent]
    migration: MigrationRow | None
    notes: list[str] = field(default_factory=list)
    properties: TableProperties = field(default_factory=TableProperties)


@dataclass
class Probe:
    """What the live probes found: problems, notes for the DBA, inherited defaults that do not fit."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped_defaults: set[str] = field(default_factory=set)
    mutable: bool = False          # some sync expression is not IMMUTABLE: pin the session settings


def validate_live(conn: Conn, plan: Plan, state_schema: str) -> Validation:
    """Every live check of the design; raises PlanError naming each failing field or object."""
    oid = catalog.regclass_oid(conn, plan.source)
    if oid is None:
        raise PlanError([f"source: table {plan.source} does not exist in {origin.describe(conn)}"])
    blue = catalog.load_table(conn, oid)
    if blue.relkind != "r":
        raise PlanError([f"source: {blue.name.display()} is a {RELKINDS.get(blue.relkind, blue.relkind)}, "
                         f"not a plain table"])
    spec, problems = build_spec(plan, blue, state_schema)
    if spec is None:
        raise PlanError(problems)
    migration = get_migration(conn, state_schema, plan.name)
    ours = migration is not None and migration.active
    if not catalog.schema_exists(conn, spec.green.schema):
        problems.append(f"target: schema {spec.green.schema!r} does not exist")
    for field_name, name in (("target", spec.green), ("cutover.retired_name", spec.retired)):
        kind = catalog.relation_exists(conn, name)
        if kind and not ours:
            what = RELKINDS.get(kind, "table")
            problems.append(f"{field_name}: {name.display()} already exists ({what}); choose a free name")
    for col in spec.columns:
        if col.sequence and catalog.relation_exists(conn, QualifiedName(spec.green.schema, col.sequence)) \
                and not ours:
            problems.append(f"columns: sequence {col.sequence!r} for green column {col.name!r} already exists")
    probe = typecheck(conn, plan, spec, blue)
    problems += probe.problems
    if problems:
        raise PlanError(problems)
    spec = _settle(conn, spec, probe)
    properties = surroundings.table_properties(conn, oid)
    try:
        surround = read_surround(conn, spec, FreeNames(conn))
    except GateRefused as refusal:
        raise PlanError([f"views: {refusal}"]) from None
    problems = keys_problems(conn, spec, oid)
    problems += [f"types: {t} is built on the table's row type; bgsync cannot move it: drop it first"
                 for t in surroundings.dependent_types(conn, oid)]
    problems += rehearse(conn, plan, spec, blue, properties, surround)
    if problems:
        raise PlanError(problems)
    return Validation(plan=plan, blue=blue, spec=spec, dependents=dependents(conn, spec, oid, surround),
                      migration=migration, notes=probe.notes + shape_notes(spec) + keys_notes(conn, oid),
                      properties=properties)


def shape_notes(spec: MigrationSpec) -> list[str]:
    """A plan that renames or drops blue's columns changes what a running application can read."""
    green = {c.name for c in spec.columns}
    gone = [c for c in spec.blue_columns if c not in green]
    if not gone:
        return []
    if spec.versions:
        how = (f"`bgsync expose` gives them {spec.versions['blue']}.{spec.blue.name} (blue's shape) and the new "
               f"release {spec.versions['green']}.{spec.blue.name}, through search_path, until finalize")
    else:
        how = ("add `versions: {blue: SCHEMA, green: SCHEMA}` and run `bgsync expose` to serve both shapes, or "
               "change them at the flip")
    return [f"green has no column {', '.join(gone)} (renamed or dropped): applications that use the old names break at "
            f"cutover; {how}"]


def dependents(conn: Conn, spec: MigrationSpec, oid: int, surround: Surround) -> list[Dependent]:
    """Every object that depends on or attaches to blue, with what bgsync does about it."""
    found: list[Dependent] = []
    given = {v.name for v in spec.views}
    for view in surround.views:
        query = " with the plan's query" if view.name in given else ""
        if view.kind == "m":
            found.append(Dependent("materialized view", view.name.display(),
                                   f"a populated copy over green{query} is built before cutover and swapped in by "
                                   f"rename (indexes, owner, grants, comment kept); the old one comes back at "
                                   f"rollback and is dropped by finalize"))
        else:
            found.append(Dependent("view", view.name.display(),
                                   f"re-created over the live table at cutover{query} (owner, grants, options, "
                                   f"comments, column defaults, triggers kept); its own definition comes back at "
                                   f"rollback"))
    for function in surround.functions:
        found.append(Dependent(function.kind.lower(), function.signature,
                               f"{function.why}: re-created over the live table at cutover, as it was at rollback"))
    for trigger in surround.triggers:
        found.append(Dependent("trigger", trigger.name,
                               "moves to the live table at cutover (it fires once per write), back at rollback"))
    if surround.rls.enabled or surround.rls.policies:
        for policy in surround.rls.policies:
            found.append(Dependent("row security policy", policy.name,
                                   "re-created on the live table at cutover (ENABLE/FORCE kept), removed at rollback"))
    for membership in surround.publications:
        found.append(Dependent("publication", membership.publication,
                               "the live table takes blue's place in it at cutover, and gives it back at rollback"))
    for (name,) in conn.execute("SELECT pubname FROM pg_publication WHERE puballtables ORDER BY 1"):
        found.append(Dependent("publication", name, "FOR ALL TABLES: it publishes green too, already"))
    for fk in catalog.inbound_foreign_keys(conn, str(spec.blue)):
        found.append(Dependent("inbound foreign key", f"{fk.name} on {fk.table.display()}",
                               "a twin referencing green is added after the backfill (NOT VALID, then validated); "
                               "it takes over at finalize"))
    for key in surroundings.outbound_keys(conn, oid):
        found.append(Dependent("outbound foreign key", f"{key.name} -> {key.referenced.display()}",
                               "added to green after the backfill (NOT VALID, then validated)"))
    for col in spec.columns:
        if col.shared_sequence:
            found.append(Dependent("sequence", col.shared_sequence,
                                   f"shared with another table: green's {col.name} draws from it too (no duplicate "
                                   f"id); it belongs to the live table from cutover on"))
    return found


def _settle(conn: Conn, spec: MigrationSpec, probe: Probe) -> MigrationSpec:
    """Drop inherited defaults that do not fit green, and record the settings to pin."""
    columns = [dataclasses.replace(c, default=None, default_inherited=False) if c.name in probe.dropped_defaults
               else c for c in spec.columns]
    settings: dict[str, str] = {}
    if probe.mutable:
        settings = {str(r[0]): str(r[1]) for r in conn.execute(
            "SELECT n, current_setting(n) FROM unnest(%s::text[]) AS n", [list(PINNED_SETTINGS)])}
    return dataclasses.replace(spec, columns=columns, settings=settings)


def _guarded(conn: Conn, text: str, params: list[Any] | None = None) -> tuple[list[tuple[Any, ...]], str | None]:
    """Run one probe statement in a savepoint: (rows, None), or ([], the error message)."""
    try:
        with conn.transaction():
            cur = conn.execute(text, params)
            return (cur.fetchall() if cur.description else []), None
    except psycopg.errors.LockNotAvailable:
        raise
    except psycopg.Error as error:
        return [], (error.diag.message_primary or str(error)).strip()


def typecheck(conn: Conn, plan: Plan, spec: MigrationSpec, blue: TableInfo) -> Probe:
    """Run each expression the way bgsync will (assignment casts, CHECK and index rules) on a probe,
    then classify the sync expressions: VOLATILE is refused, STABLE is named with its settings."""
    probe = Probe()
    steps = render_steps(
        "validate.sql.j2", plan_columns=plan.columns, spec_columns=spec.columns, blue=blue.name,
        checks=plan.checks, indexes=plan.indexes,
        col_index={c.name: i for i, c in enumerate(plan.columns)})
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('search_path', %s, true), set_config('lock_timeout', %s, true),"
                         " set_config('statement_timeout', '30s', true)",
                         [", ".join(quote_ident(s) for s in spec.search_path), plan.cutover.lock_timeout])
            types_ok = True
            for step, text in steps:
                if step == "columns" and not types_ok:
                    break
                _, message = _guarded(conn, text)
                if message is None:
                    continue
                if step.endswith("(inherited)"):
                    field_name = step.removesuffix(" (inherited)")
                    col = _column(spec, plan, field_name)
                    probe.dropped_defaults.add(col.name)
                    same = blue.column(col.name)
                    blue_default = (same.default if same is not None else None) or "?"
                    if col.not_null:
                        probe.problems.append(f"{field_name}: blue's default {blue_default} does not fit green "
                                              f"type {col.type} ({message}); set `default`")
                    else:
                        probe.notes.append(f"{col.name}: blue's default {blue_default} does not fit green type "
                                           f"{col.type} ({message}); green has no default")
                    continue
                probe.problems.append(f"{step}: {message}")
                if step.endswith(".type"):
                    types_ok = False
                if step == "columns":
                    break
            if not probe.problems:
                _classify(conn, plan, spec, blue, probe)
    except psycopg.errors.LockNotAvailable:
        raise DatabaseError(f"source {blue.name.display()} is locked by another session beyond lock_timeout "
                            f"{plan.cutover.lock_timeout}; nothing was changed, try again when it is free") from None
    for col in spec.columns:
        if col.default_inherited and col.name not in probe.dropped_defaults:
            probe.notes.append(f"{col.name}: default {col.default} inherited from blue")
    return probe


def _column(spec: MigrationSpec, plan: Plan, field_name: str) -> GreenColumn:
    index = int(field_name.split("[", 1)[1].split("]", 1)[0])
    name = plan.columns[index].name
    return next(c for c in spec.columns if c.name == name)


def _classify(conn: Conn, plan: Plan, spec: MigrationSpec, blue: TableInfo, probe: Probe) -> None:
    """IMMUTABLE (PostgreSQL accepts it in an index), STABLE, or VOLATILE (a function it calls is)."""
    blue_probe = quote_ident("bgsync_validate_blue")
    _guarded(conn, f"CREATE TEMPORARY TABLE {blue_probe} (LIKE {blue.name.ident().as_string(None)})")
    green_probe = quote_ident("bgsync_validate_green")
    col_index = {c.name: i for i, c in enumerate(plan.columns)}
    blue_types = {c.name: c.type for c in blue.columns}
    checks: list[tuple[str, str, str, str, str]] = []   # (field, expr, cast type, probe table, reads from)
    for col in spec.columns:
        i = col_index[col.name]
        if col.source_expr is not None and plan.columns[i].from_ is not None:
            checks.append((f"columns[{i}].from", col.source_expr, col.type, blue_probe,
                           blue.name.ident().as_string(None)))
        if col.reverse_expr is not None and col.reverse_column is not None and plan.columns[i].reverse is not None:
            checks.append((f"columns[{i}].reverse", col.reverse_expr, blue_types[col.reverse_column], green_probe,
                           green_probe))
    for field_name, expr, cast_type, table, reads in checks:
        cast = f"CAST(({expr}) AS {cast_type})"
        _, not_immutable = _guarded(conn, f"CREATE INDEX ON {table} ((({cast}) IS NULL))")
        if not_immutable is None:
            continue
        probe.mutable = True
        used = _functions_used(conn, cast, cast_type, reads)
        volatile = sorted(name for name, kind in used if kind == "v")
        if volatile:
            probe.problems.append(f"{field_name}: the expression is VOLATILE ({', '.join(volatile)}): it gives "
                                  f"another value each time, so green could never be verified; use a "
                                  f"`default` for new values, or an IMMUTABLE or STABLE expression")
            continue
        words = " ".join([expr, cast_type, *(name for name, _ in used)]).lower()
        settings = sorted({setting for hint, setting in SETTING_HINTS if hint in words}) or ["session settings"]
        probe.notes.append(f"{field_name} is STABLE, not IMMUTABLE: it depends on {', '.join(settings)}; bgsync "
                           f"pins them in its trigger functions and sessions to the values of this session")


def _functions_used(conn: Conn, cast: str, cast_type: str, reads: str) -> list[tuple[str, str]]:
    """(function, provolatile) for every function and operator the expression calls, read from the
    parse tree PostgreSQL stores for a SQL-standard function body (system functions included)."""
    name = quote_ident("bgsync_validate_volatility")
    _guarded(conn, f"DROP FUNCTION IF EXISTS pg_temp.{name}()")
    _, failed = _guarded(conn, f"CREATE FUNCTION pg_temp.{name}() RETURNS SETOF {cast_type} LANGUAGE sql "
                               f"BEGIN ATOMIC SELECT {cast} FROM {reads}; END")
    body, _ = _guarded(conn, "SELECT prosqlbody::text FROM pg_proc WHERE proname = 'bgsync_validate_volatility' "
                             "AND pronamespace = pg_my_temp_schema()")
    if failed or not body:
        return [("(an expression bgsync could not analyse)", "s")]
    tree = str(body[0][0])
    oids = sorted({int(m) for m in re.findall(r":(?:op)?funcid (\d+)", tree)})
    rows, _ = _guarded(conn, "SELECT oid::regprocedure::text, provolatile::text FROM pg_proc WHERE oid = ANY(%s)",
                       [oids])
    used = [(str(r[0]), str(r[1])) for r in rows]
    if "NEXTVALUEEXPR" in tree:
        used.append(("(an identity's next value)", "v"))
    if "SQLVALUEFUNCTION" in tree:
        used.append(("(current_date, current_timestamp or the like) with time zone", "s"))
    if "COERCEVIAIO" in tree:
        used.append(("(a conversion through text)", "s"))
    return used


# -- the sync, rehearsed on temporary tables --------------------------------------------------------
TEMP_BLUE = QualifiedName("pg_temp", "bgsync_rehearse_blue")
TEMP_GREEN = QualifiedName("pg_temp", "bgsync_rehearse_green")


def rehearse(conn: Conn, plan: Plan, spec: MigrationSpec, blue: TableInfo, properties: TableProperties,
             surround: Surround) -> list[str]:
    """Rehearse prepare, the sync and the cutover against the real catalog inside a transaction that
    is rolled back: green as a temporary table (with blue's properties), the exact forward and reverse
    sync functions run once on a few of blue's rows, then every object that follows the live name is
    re-created over that temporary green. A plan that would fail later for a reason visible now is
    refused now, with the object named."""
    problems: list[str] = []
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT set_config('search_path', %s, true)",
                     [", ".join(quote_ident(s) for s in spec.search_path)])
        for description, text in sync_rehearsal(spec, blue, properties):
            _, message = _guarded(conn, text)
            if message is not None:
                problems.append(f"sync: rehearsing {description} failed: {message}; the application's writes "
                                f"would fail the same way")
                return problems
        problems += rehearse_surround(conn, spec, surround)
    return problems


def rehearse_surround(conn: Conn, spec: MigrationSpec, surround: Surround) -> list[str]:
    """Each view, materialized view, function, trigger and policy re-created over the temporary green."""
    problems: list[str] = []
    queries = view_queries(spec, surround.views)
    mapping = {spec.blue: TEMP_GREEN}
    for i, view in enumerate(surround.views):
        kind = "materialized view" if view.kind == "m" else "view"
        given = any(v.name == view.name for v in spec.views)
        temp = QualifiedName("pg_temp", f"bgsync_rehearse_view_{i}")
        fix = ("check its query in the plan's `views`" if given else
               f"give its query after cutover in the plan: views: [{{name: {view.name.display()}, query: ...}}]")
        try:
            text = retarget(queries[str(view.name)], mapping)
        except Exception as error:     # pglast cannot read the query: PostgreSQL would say the same at cutover
            problems.append(f"views: {kind} {view.name.display()}: its query cannot be read ({error}); {fix}")
            continue
        _, message = _guarded(conn, f"CREATE TEMPORARY VIEW {temp.ident().as_string(None)} AS {text}")
        if message is not None:
            problems.append(f"views: {kind} {view.name.display()} cannot be re-created over green: {message}; {fix}")
            continue
        mapping[view.name] = temp
        kept = view_columns_kept(view, queries[str(view.name)])
        for column, default in kept.column_defaults.items():
            _, message = _guarded(conn, f"ALTER VIEW {temp.ident().as_string(None)} ALTER COLUMN "
                                        f"{quote_ident(column)} SET DEFAULT {default}")
            if message is not None:
                problems.append(f"views: the default of column {column} of {kind} {view.name.display()} does not "
                                f"fit its query over green: {message}; {fix}")
        for view_trigger in view.triggers:
            _, message = _guarded(conn, retarget(view_trigger, {view.name: temp}))
            if message is not None:
                problems.append(f"views: a trigger of {kind} {view.name.display()} cannot be re-created: {message}")
        if view.kind == "m":
            table = QualifiedName("pg_temp", f"bgsync_rehearse_matview_{i}")
            _guarded(conn, f"CREATE TEMPORARY TABLE {table.ident().as_string(None)} AS {text} WITH NO DATA")
            for name, definition, unique in view.indexes:
                _, message = _guarded(conn, index_statement(f"bgsync_rehearse_{i}_{name}"[:63], table, definition,
                                                            unique))
                if message is not None:
                    problems.append(f"views: index {name} of materialized view {view.name.display()} does not fit "
                                    f"its query over green: {message}; {fix}")
    for function in surround.functions:
        where = f"{function.kind.lower()} {function.signature} ({function.why})"
        if function.blockers:
            problems.append(f"functions: {where} is re-created at cutover, but {', '.join(function.blockers)} "
                            f"depend(s) on it; drop them first, or change the function not to depend on the table")
            continue
        try:
            # the same name in pg_temp: a SQL body may qualify its parameters with the function's name
            name = parse_qualified_name(function.signature.split("(", 1)[0])[1]
            text = retarget(function.definition, mapping, rename=QualifiedName("pg_temp", name))
        except Exception as error:
            problems.append(f"functions: {where} cannot be read ({error})")
            continue
        _, message = _guarded(conn, text)
        if message is not None:
            problems.append(f"functions: {where} cannot be re-created over green: {message}; change or drop it "
                            f"before the migration")
    for trigger in surround.triggers:
        _, message = _guarded(conn, on_relation(trigger.definition, TEMP_GREEN))
        if message is not None:
            problems.append(f"triggers: trigger {trigger.name} cannot move to green: {message}; change or drop it "
                            f"before the migration")
    for policy in surround.rls.policies:
        [(_, text)] = render_steps("_surround_create.sql.j2", functions=[], create_views=[], queries={},
                                   create_triggers=[], rls=RowSecurity(False, False, [policy]), rls_table=TEMP_GREEN,
                                   add_publications=[], shared_sequences=[], current_user="",
                                   trigger_target=TEMP_GREEN, publication_target=TEMP_GREEN,
                                   sequence_owner=TEMP_GREEN)
        _, message = _guarded(conn, text)
        if message is not None:
            problems.append(f"row security: policy {policy.name} cannot be re-created on green: {message}; change "
                            f"or drop it before the migration")
    green_columns = {c.name for c in spec.columns}
    for membership in publication_columns(spec, surround.publications, to_green=True):
        missing = [c for c in membership.columns or [] if c not in green_columns]
        if membership.row_filter:
            missing += sorted(c for c in column_refs(membership.row_filter) if c not in green_columns)
        if missing:
            problems.append(f"publications: publication {membership.publication} publishes column(s) {missing} "
                            f"that green does not have; change its column list or row filter first")
    return problems


def sync_rehearsal(spec: MigrationSpec, blue: TableInfo, properties: TableProperties) -> list[tuple[str, str]]:
    """The statements of the sync rehearsal: temporary blue and green, the exact sync functions, and an
    INSERT, UPDATE and DELETE through each direction."""
    temp_blue, temp_green = TEMP_BLUE, TEMP_GREEN
    rehearsal = dataclasses.replace(
        spec, blue=temp_blue, green=temp_green, retired=temp_blue, state_schema="pg_temp",
        forward_function=QualifiedName("pg_temp", "bgsync_rehearse_forward"), grants=[],
        columns=[dataclasses.replace(c, sequence=None, blue_sequence=None,
                                     default=None if c.sequence else c.default) for c in spec.columns],
        triggers={op: f"bgsync_rehearse_fwd_{op}" for op in ("ins", "upd", "del", "trunc")}, bulk=False)
    writable = [c.name for c in blue.columns if not c.generated]
    blue_sql, tb, tg = blue.name.ident().as_string(None), temp_blue.ident().as_string(None), \
        temp_green.ident().as_string(None)
    key = ", ".join(quote_ident(k) for k in spec.blue_key)
    green_key = ", ".join(quote_ident(k) for k in spec.green_key)
    blue_cols = ", ".join(quote_ident(c) for c in writable)
    non_key_blue = [c for c in writable if c not in spec.blue_key and not _identity_always(blue, c)]
    non_key_green = [c.name for c in spec.written_columns if c.name not in spec.green_key]
    steps: list[tuple[str, str]] = [
        ("copy of blue", f"CREATE TEMPORARY TABLE {tb} (LIKE {blue_sql} INCLUDING ALL)"),
    ]
    steps += [(f"prepare: {d}", s) for d, s in render_steps(
        "prepare.sql.j2", spec=rehearsal, current_user=spec.blue_owner, sync=forward_sync(rehearsal),
        title="forward sync", sequence_grantees=[], props=properties, green_of=green_of(spec))]
    steps += [
        ("forward sync of an INSERT", f"INSERT INTO {tb} ({blue_cols}) OVERRIDING SYSTEM VALUE "
                                      f"SELECT {blue_cols} FROM {blue_sql} LIMIT {REHEARSAL_ROWS}"),
    ]
    if non_key_blue:
        sets = ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in non_key_blue)
        steps.append(("forward sync of an UPDATE", f"UPDATE {tb} SET {sets}"))
    steps.append(("forward sync of a DELETE",
                  f"DELETE FROM {tb} WHERE ({key}) IN (SELECT {key} FROM {tb} ORDER BY {key} LIMIT 1)"))
    reverse = reverse_sync(rehearsal, temp_green)
    steps += [(f"cutover: {d}", s) for d, s in render_steps(
        "_drop_sync.sql.j2", sync=forward_sync(rehearsal), title="forward sync")]
    steps += [(f"cutover: {c} becomes BY DEFAULT while the reverse sync writes it",
               f"ALTER TABLE {tb} ALTER COLUMN {quote_ident(c)} SET GENERATED BY DEFAULT")
              for c in spec.blue_identity_always]
    steps += [(f"cutover: {d}", s) for d, s in render_steps("_sync.sql.j2", sync=reverse, title="reverse sync")]
    if non_key_green:
        sets = ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in non_key_green)
        steps.append(("reverse sync of an UPDATE", f"UPDATE {tg} SET {sets}"))
    steps.append(("reverse sync of a DELETE",
                  f"DELETE FROM {tg} WHERE ({green_key}) IN (SELECT {green_key} FROM {tg} ORDER BY {green_key} "
                  f"LIMIT 1)"))
    written = spec.written_columns
    steps.append(("reverse sync of an INSERT",
                  f"INSERT INTO {tg} ({', '.join(quote_ident(c.name) for c in written)}) OVERRIDING SYSTEM VALUE "
                  f"SELECT {', '.join(str(c.source_expr) for c in written)} FROM {blue_sql} "
                  f"ORDER BY {key} LIMIT 1"))
    return steps


def _identity_always(blue: TableInfo, column: str) -> bool:
    info = blue.column(column)
    return info is not None and info.identity == "a"
