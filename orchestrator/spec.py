"""A plan resolved against the live blue table: every name and expression bgsync will place.

Pure code (no database): phases render SQL from a MigrationSpec, so rendering is testable offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from orchestrator.catalog import INTEGER_TYPES, TableInfo
from orchestrator.names import NAMEDATALEN_BYTES, QualifiedName, bare_column, parse_qualified_name, quote_ident
from orchestrator.plan import Plan

DEFAULT_STATE_SCHEMA = "bgsync"


@dataclass(frozen=True)
class GreenColumn:
    name: str
    type: str
    not_null: bool
    source_expr: str | None      # SQL over a blue row; None: the value comes from green's default
    default: str | None          # green's default expression (plan's, or inherited from blue)
    identity: str                # '' | 'a' | 'd' (inherited identity)
    sequence: str | None         # green's own sequence name (inherited serial), in green's schema
    blue_sequence: str | None    # blue's owned sequence this one mirrors
    reverse_column: str | None   # blue column fed after cutover
    reverse_expr: str | None     # SQL over a green row


@dataclass(frozen=True)
class IndexSpec:
    name: str
    columns: list[str]
    unique: bool
    where: str | None


@dataclass(frozen=True)
class CheckSpec:
    name: str
    expression: str


@dataclass(frozen=True)
class MigrationSpec:
    name: str
    plan_hash: str
    blue: QualifiedName
    green: QualifiedName
    retired: QualifiedName
    state_schema: str
    columns: list[GreenColumn]
    green_key: list[str]
    blue_key: list[str]
    blue_key_types: list[str]
    indexes: list[IndexSpec]
    checks: list[CheckSpec]
    blue_owner: str
    grants: list[tuple[str, str, bool]]
    search_path: list[str]
    primary_key_name: str
    forward_function: QualifiedName
    triggers: dict[str, str] = field(default_factory=dict)

    @property
    def integer_key(self) -> bool:
        return len(self.blue_key_types) == 1 and self.blue_key_types[0] in INTEGER_TYPES

    @property
    def copied_columns(self) -> list[GreenColumn]:
        """Green columns whose values come from blue (the rest take green's default)."""
        return [c for c in self.columns if c.source_expr is not None]

    @property
    def updatable_columns(self) -> list[GreenColumn]:
        return [c for c in self.copied_columns if c.name not in self.green_key]


@dataclass(frozen=True)
class SyncSpec:
    """One direction of dual write: statement triggers on `source` mirroring into `target`."""

    function: QualifiedName
    source: QualifiedName
    target: QualifiedName
    columns: list[tuple[str, str]]       # (target column, SQL expression over a source row)
    target_key: list[str]
    source_key: list[str]
    triggers: dict[str, str]
    search_path: list[str]

    @property
    def target_columns(self) -> list[str]:
        return [name for name, _ in self.columns]

    @property
    def update_columns(self) -> list[str]:
        return [name for name, _ in self.columns if name not in self.target_key]


def forward_sync(spec: MigrationSpec) -> SyncSpec:
    """blue -> green, from prepare until cutover (and again after a rollback of the cutover)."""
    return SyncSpec(function=spec.forward_function, source=spec.blue, target=spec.green,
                    columns=[(c.name, c.source_expr) for c in spec.copied_columns if c.source_expr is not None],
                    target_key=spec.green_key, source_key=spec.blue_key, triggers=spec.triggers,
                    search_path=spec.search_path)


def reverse_sync(spec: MigrationSpec, live: QualifiedName) -> SyncSpec:
    """green (under its live name) -> retired blue, from cutover until finalize."""
    return SyncSpec(function=QualifiedName(spec.state_schema, f"{spec.name}_reverse"), source=live,
                    target=spec.retired,
                    columns=[(c.reverse_column, c.reverse_expr) for c in spec.columns
                             if c.reverse_column is not None and c.reverse_expr is not None],
                    target_key=spec.blue_key, source_key=spec.green_key,
                    triggers={op: f"bgsync_{spec.name}_rev_{op}" for op in ("ins", "upd", "del", "trunc")},
                    search_path=spec.search_path)


def fit_name(base: str, suffix: str = "") -> str:
    """A name of at most 63 bytes: long ones keep a readable prefix and a short hash."""
    name = base + suffix
    if len(name.encode()) <= NAMEDATALEN_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    room = NAMEDATALEN_BYTES - len(suffix.encode()) - 9
    prefix = base.encode()[:room].decode(errors="ignore")
    return f"{prefix}_{digest}{suffix}"


def resolve_target(plan: Plan, blue: QualifiedName) -> QualifiedName:
    if plan.target is None:
        return QualifiedName(blue.schema, fit_name(blue.name, "_v2"))
    schema, name = parse_qualified_name(plan.target)
    return QualifiedName(schema or blue.schema, name)


def build_spec(plan: Plan, blue: TableInfo, state_schema: str = DEFAULT_STATE_SCHEMA
               ) -> tuple[MigrationSpec | None, list[str]]:
    """Resolve the plan against blue's catalog entry; returns (spec, problems)."""
    problems: list[str] = []
    green = resolve_target(plan, blue.name)
    retired = QualifiedName(blue.name.schema, plan.cutover.retired_name or fit_name(blue.name.name, "_old"))

    columns: list[GreenColumn] = []
    bare_of: dict[str, str] = {}     # green column -> the blue column it copies unchanged
    for i, col in enumerate(plan.columns):
        same_named = blue.column(col.name)
        if col.from_ is None:
            source_expr = quote_ident(col.name) if same_named else None
            bare = col.name if same_named else None
        else:
            source_expr = col.from_
            named = bare_column(col.from_)
            bare = named if named is not None and blue.column(named) else None
            if named is not None and bare is None:
                problems.append(f"columns[{i}].from: blue table {blue.name.display()} has no column {named!r}")
        if bare is not None:
            bare_of[col.name] = bare
        if source_expr is None and col.not_null and col.default is None:
            problems.append(f"columns[{i}]: {col.name!r} is NOT NULL but has no `from` "
                            f"(blue has no such column) and no `default`")

        default, identity, sequence, blue_sequence = col.default, "", None, None
        inherited = blue.column(bare) if bare == col.name and bare is not None else None
        if col.default is None and inherited is not None:
            if inherited.identity:
                identity = inherited.identity
            elif inherited.owned_sequence and inherited.default and "nextval(" in inherited.default:
                sequence = fit_name(f"{green.name}_{col.name}", "_seq")
                blue_sequence = inherited.owned_sequence
                default = f"nextval({_regclass_literal(green.schema, sequence)})"
            elif inherited.default is not None:
                default = inherited.default

        reverse_column = col.reverse_column or bare or (col.name if same_named else None)
        reverse_expr = col.reverse
        if reverse_expr is None and bare is not None and reverse_column == bare:
            reverse_expr = quote_ident(col.name)
        if col.reverse is not None and (reverse_column is None or blue.column(reverse_column) is None):
            problems.append(f"columns[{i}].reverse_column: blue table {blue.name.display()} has no column "
                            f"{reverse_column!r} to feed; set reverse_column")
        columns.append(GreenColumn(
            name=col.name, type=col.type, not_null=col.not_null, source_expr=source_expr, default=default,
            identity=identity, sequence=sequence, blue_sequence=blue_sequence,
            reverse_column=reverse_column if reverse_expr is not None else None, reverse_expr=reverse_expr))

    # Every blue column must get a value after cutover, or be allowed to go without one.
    fed: dict[str, str] = {}
    for green_col in columns:
        if green_col.reverse_column is None:
            continue
        if green_col.reverse_column in fed:
            problems.append(f"columns: blue column {green_col.reverse_column!r} is fed by both "
                            f"{fed[green_col.reverse_column]!r} and {green_col.name!r}")
        fed[green_col.reverse_column] = green_col.name
    for bcol in blue.columns:
        if bcol.name not in fed and bcol.not_null and not bcol.has_default:
            problems.append(f"columns: blue column {bcol.name!r} is NOT NULL without a default and no "
                            f"green column feeds it back (add `reverse` and `reverse_column`)")

    # The key: green names in the plan, copied unchanged from a unique NOT NULL key of blue.
    column_index = {c.name: i for i, c in enumerate(plan.columns)}
    green_key: list[str] = list(plan.key) if plan.key else []
    if not green_key:
        pk = blue.primary_key
        if pk is None:
            problems.append(f"key: source {blue.name.display()} has no primary key; set `key` to green columns "
                            f"copied from blue columns with a unique index")
        else:
            inverse = {b: g for g, b in bare_of.items()}
            for c in pk:
                if c in inverse:
                    continue
                if c in column_index:
                    problems.append(f"columns[{column_index[c]}].from: {_unchanged_key(c)}")
                else:
                    problems.append(f"key: blue primary key column {c} is not in green; add it (copied unchanged, "
                                    f"no `from`), or set `key` to green columns copied from a unique blue key")
            green_key = [inverse[c] for c in pk if c in inverse]
    blue_key: list[str] = []
    for i, gk in enumerate(green_key):
        if gk not in bare_of:
            problems.append(f"key[{i}]: {_unchanged_key(gk)} (columns[{column_index[gk]}].from)")
        else:
            blue_key.append(bare_of[gk])
    if blue_key and len(blue_key) == len(green_key):
        usable = [i for i in blue.unique_indexes if i.usable and set(i.columns) == set(blue_key)]
        if not usable:
            problems.append(f"key: blue columns {blue_key} have no valid unique index "
                            f"(non-partial, non-deferrable) on exactly those columns")
        for name in blue_key:
            key_col = blue.column(name)
            if key_col is not None and not key_col.not_null:
                problems.append(f"key: blue key column {name!r} is nullable")
        for i, gk in enumerate(green_key):
            gcol = next(c for c in plan.columns if c.name == gk)
            if not gcol.not_null:
                problems.append(f"key[{i}]: green key column {gk!r} must be not_null: true")
    blue_key_types = [c.type for c in (blue.column(k) for k in blue_key) if c is not None]

    indexes = [
        IndexSpec(name=ix.name or fit_name(f"{green.name}_{'_'.join(ix.columns)}", "_idx"),
                  columns=list(ix.columns), unique=ix.unique, where=ix.where)
        for ix in plan.indexes]
    checks = [CheckSpec(c.name, c.expression) for c in plan.checks]
    search_path = list(dict.fromkeys(["pg_catalog", blue.name.schema, "public", "pg_temp"]))
    if problems:
        return None, problems
    spec = MigrationSpec(
        name=plan.name, plan_hash=plan.structural_hash(), blue=blue.name, green=green, retired=retired,
        state_schema=state_schema, columns=columns, green_key=green_key, blue_key=blue_key,
        blue_key_types=blue_key_types, indexes=indexes, checks=checks, blue_owner=blue.owner,
        grants=[(g.grantee, g.privilege, g.grantable) for g in blue.grants], search_path=search_path,
        primary_key_name=fit_name(green.name, "_pkey"),
        forward_function=QualifiedName(state_schema, f"{plan.name}_forward"),
        triggers={op: f"bgsync_{plan.name}_fwd_{op}" for op in ("ins", "upd", "del", "trunc")})
    return spec, []


def _unchanged_key(column: str) -> str:
    return (f"key column {column} must be copied unchanged from blue (it identifies each row in both tables): "
            f"remove `from`, or change `key`")


def _regclass_literal(schema: str, name: str) -> str:
    qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
    return "'" + qualified.replace("'", "''") + "'::regclass"
