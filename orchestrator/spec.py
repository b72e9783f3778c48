"""A plan resolved against the live blue table: every name and expression bgsync will place.

Pure code (no database): phases render SQL from a MigrationSpec, so rendering is testable offline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from orchestrator.catalog import INTEGER_TYPES, TableInfo
from orchestrator.expressions import bare_column, cast_column, column_refs, is_null
from orchestrator.names import NAMEDATALEN_BYTES, QualifiedName, parse_qualified_name, quote_ident
from orchestrator.plan import Plan

DEFAULT_STATE_SCHEMA = "bgsync"
# Settings that change what an expression computes or how a value reads as text. When a plan's
# expression is not IMMUTABLE, bgsync pins them (values recorded at prepare) in its trigger
# functions and in every session of its own, so a writer's session never changes green.
PINNED_SETTINGS = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits", "bytea_output",
                   "lc_monetary", "lc_numeric", "lc_time", "xmloption")


@dataclass(frozen=True)
class GreenColumn:
    name: str
    type: str
    not_null: bool
    source_expr: str | None      # SQL over a blue row; None: the value comes from green's default
    default: str | None          # green's default expression (plan's, or inherited from blue)
    identity: str                # '' | 'a' | 'd': green's identity once live (ALWAYS is BY DEFAULT while synced)
    sequence: str | None         # green's own sequence name (inherited serial), in green's schema
    blue_sequence: str | None    # blue's owned sequence this one mirrors
    reverse_column: str | None   # blue column fed after cutover
    reverse_expr: str | None     # SQL over a green row
    generated: str | None = None   # green's generation expression (inherited): computed, never written
    shared_sequence: str | None = None  # blue's sequence, also drawn by other tables: green uses it too
    default_inherited: bool = False
    reverse_origin: str = ""       # explicit | column | cast | null

    @property
    def written(self) -> bool:
        """Does the sync (and the backfill) write this column? Generated columns compute themselves."""
        return self.source_expr is not None and self.generated is None


@dataclass(frozen=True)
class IndexSpec:
    name: str
    columns: list[str]
    unique: bool
    where: str | None
    definition: str | None = None    # what follows `ON <table>` in CREATE INDEX (method, opclass, ...)


@dataclass(frozen=True)
class ViewSpec:
    """A dependent view's query after cutover, from the plan."""

    name: QualifiedName
    query: str


@dataclass(frozen=True)
class CheckSpec:
    name: str
    expression: str


@dataclass(frozen=True)
class Feed:
    """What keeps one blue column current after cutover (validate and `sql` print these)."""

    blue_column: str
    source: str          # SQL text over a green row, or a description
    how: str             # explicit reverse | copied back | cast back | NULL | generated | default | identity


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
    blue_key_collations: list[str | None] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    blue_generated: list[str] = field(default_factory=list)
    blue_identity_always: list[str] = field(default_factory=list)
    feeds: list[Feed] = field(default_factory=list)
    views: list[ViewSpec] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)   # {"blue": schema, "green": schema} for expose
    blue_columns: list[str] = field(default_factory=list)     # blue's columns, in order (blue's shape)
    bulk: bool = False     # backfill.mode bulk, fixed at prepare: green fills without indexes, changes logged

    @property
    def log_table(self) -> QualifiedName:
        """The keys blue's writers changed while green fills in bulk mode (dropped at the switch)."""
        return QualifiedName(self.state_schema, fit_name(self.name, "_log"))

    @property
    def integer_key(self) -> bool:
        return len(self.blue_key_types) == 1 and self.blue_key_types[0] in INTEGER_TYPES

    @property
    def copied_columns(self) -> list[GreenColumn]:
        """Green columns whose values come from blue (verify compares them all)."""
        return [c for c in self.columns if c.source_expr is not None]

    @property
    def written_columns(self) -> list[GreenColumn]:
        """Copied columns that the backfill and the forward sync write (generated ones compute)."""
        return [c for c in self.columns if c.written]

    @property
    def key_collations(self) -> list[str | None]:
        """Blue's collation for each key column (ranges on both tables follow blue's order)."""
        if len(self.blue_key_collations) == len(self.blue_key):
            return self.blue_key_collations
        return [None] * len(self.blue_key)

    @property
    def identity_always(self) -> list[str]:
        """Green columns that are GENERATED ALWAYS once live (BY DEFAULT while the sync writes them)."""
        return [c.name for c in self.columns if c.identity == "a"]


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
    settings: dict[str, str] = field(default_factory=dict)
    two_way: bool = False            # the window of `expose`: both directions on, loop-guarded
    # in the window, the other direction's mapping (source column, SQL expression over a target row): a
    # mirrored row is mapped back and written to the source where a trigger of the target changed it
    back_columns: list[tuple[str, str]] = field(default_factory=list)
    # the target has generated columns (known when the sync is rendered: a column of the mapping can stop
    # being generated later, never start; a column added later is outside the mapping)
    target_generated: bool = False

    @property
    def target_columns(self) -> list[str]:
        return [name for name, _ in self.columns]

    @property
    def update_columns(self) -> list[str]:
        return [name for name, _ in self.columns if name not in self.target_key]

    @property
    def back_update_columns(self) -> list[str]:
        return [name for name, _ in self.back_columns if name not in self.source_key]


def forward_sync(spec: MigrationSpec, *, source: QualifiedName | None = None, target: QualifiedName | None = None,
                 two_way: bool = False) -> SyncSpec:
    """blue -> green, from prepare until cutover (and again after a rollback of the cutover); in the
    window of `expose` also after cutover, from the retired blue (`source`) to the live table (`target`)."""
    return SyncSpec(function=spec.forward_function, source=source or spec.blue, target=target or spec.green,
                    columns=_forward_columns(spec), target_key=spec.green_key, source_key=spec.blue_key,
                    triggers=spec.triggers, search_path=spec.search_path, settings=spec.settings, two_way=two_way,
                    back_columns=_reverse_columns(spec) if two_way else [],
                    target_generated=any(c.generated for c in spec.columns))


def reverse_sync(spec: MigrationSpec, live: QualifiedName, *, target: QualifiedName | None = None,
                 two_way: bool = False) -> SyncSpec:
    """green (under its live name) -> retired blue, from cutover until finalize; in the window of
    `expose` also before cutover, into blue under its own name (`target`)."""
    return SyncSpec(function=QualifiedName(spec.state_schema, f"{spec.name}_reverse"), source=live,
                    target=target or spec.retired, columns=_reverse_columns(spec),
                    target_key=spec.blue_key, source_key=spec.green_key,
                    triggers={op: f"bgsync_{spec.name}_rev_{op}" for op in ("ins", "upd", "del", "trunc")},
                    search_path=spec.search_path, settings=spec.settings, two_way=two_way,
                    back_columns=_forward_columns(spec) if two_way else [], target_generated=bool(spec.blue_generated))


def _forward_columns(spec: MigrationSpec) -> list[tuple[str, str]]:
    """(green column, SQL expression over a blue row) for every green column the sync writes."""
    return [(c.name, c.source_expr) for c in spec.written_columns if c.source_expr is not None]


def _reverse_columns(spec: MigrationSpec) -> list[tuple[str, str]]:
    """(blue column, SQL expression over a green row) for every blue column the reverse sync feeds."""
    return [(c.reverse_column, c.reverse_expr) for c in spec.columns
            if c.reverse_column is not None and c.reverse_expr is not None
            and c.reverse_column not in spec.blue_generated]


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


# How strongly a green column claims to feed a blue column after cutover (highest wins).
_CLAIM_RANK = {"explicit": 3, "null": 3, "column": 2, "cast": 1}


def build_spec(plan: Plan, blue: TableInfo, state_schema: str = DEFAULT_STATE_SCHEMA,
               settings: dict[str, str] | None = None) -> tuple[MigrationSpec | None, list[str]]:
    """Resolve the plan against blue's catalog entry; returns (spec, problems)."""
    problems: list[str] = []
    green = resolve_target(plan, blue.name)
    retired = QualifiedName(blue.name.schema, plan.cutover.retired_name or fit_name(blue.name.name, "_old"))

    columns: list[GreenColumn] = []
    bare_of: dict[str, str] = {}     # green column -> the blue column it copies unchanged
    read_by: dict[str, list[int]] = {}   # blue column -> plan columns whose `from` reads it
    claims: list[tuple[int, str, str, str]] = []   # (plan index, blue column, reverse SQL, origin)
    for i, col in enumerate(plan.columns):
        same_named = blue.column(col.name)
        if col.from_ is None:
            source_expr = quote_ident(col.name) if same_named else None
            bare = cast = col.name if same_named else None
            reads = {col.name} if same_named else set()
        else:
            source_expr = col.from_
            named, cast_of = bare_column(col.from_), cast_column(col.from_)
            bare = named if named is not None and blue.column(named) else None
            cast = cast_of if cast_of is not None and blue.column(cast_of) else None
            if cast_of is not None and cast is None:
                problems.append(f"columns[{i}].from: blue table {blue.name.display()} has no column {cast_of!r}")
            reads = {r for r in column_refs(col.from_) if blue.column(r)}
        for name in reads:
            read_by.setdefault(name, []).append(i)
        if bare is not None:
            bare_of[col.name] = bare
        if source_expr is None and col.not_null and col.default is None:
            problems.append(f"columns[{i}]: {col.name!r} is NOT NULL but has no `from` "
                            f"(blue has no such column) and no `default`")

        # A green column that reads its same-named blue column keeps that column's default.
        default, identity, sequence, blue_sequence, generated = col.default, "", None, None, None
        shared_sequence: str | None = None
        inherited = same_named if col.name in reads else None
        if col.default is None and inherited is not None:
            if inherited.generated and cast == col.name:
                generated = inherited.default
            elif inherited.identity:
                identity = inherited.identity
            elif inherited.owned_sequence and inherited.sequence_shared:
                default, shared_sequence = inherited.default, inherited.owned_sequence
            elif inherited.owned_sequence and inherited.default and "nextval(" in inherited.default:
                sequence = fit_name(f"{green.name}_{col.name}", "_seq")
                blue_sequence = inherited.owned_sequence
                default = f"nextval({_regclass_literal(green.schema, sequence)})"
            elif inherited.default is not None and not inherited.generated:
                default = inherited.default

        if col.reverse is not None:
            target = col.reverse_column or cast or (col.name if same_named else None)
            if target is None or blue.column(target) is None:
                problems.append(f"columns[{i}].reverse_column: blue table {blue.name.display()} has no column "
                                f"{target!r} to feed; set reverse_column")
            else:
                claims.append((i, target, col.reverse, "null" if is_null(col.reverse) else "explicit"))
        elif col.reverse_column is not None:
            problems.append(f"columns[{i}].reverse_column: set `reverse` too (the SQL that feeds blue column "
                            f"{col.reverse_column!r} from green)")
        elif cast is not None:
            claims.append((i, cast, quote_ident(col.name), "column" if bare is not None else "cast"))
        columns.append(GreenColumn(
            name=col.name, type=col.type, not_null=col.not_null, source_expr=source_expr, default=default,
            identity=identity, sequence=sequence, blue_sequence=blue_sequence, reverse_column=None,
            reverse_expr=None, generated=generated, shared_sequence=shared_sequence,
            default_inherited=col.default is None and default is not None and inherited is not None))

    # Each blue column is fed by at most one green column: explicit reverses first, then unchanged
    # copies, then casts (a same-named green column wins a tie).
    chosen: dict[str, tuple[int, str, str]] = {}
    for i, target, expr, origin in claims:
        if target in blue.generated_columns():
            continue
        current = chosen.get(target)
        if current is None:
            chosen[target] = (i, expr, origin)
            continue
        if _CLAIM_RANK[origin] == _CLAIM_RANK[current[2]] == 3:
            problems.append(f"columns[{i}].reverse: blue column {target!r} is already fed by "
                            f"columns[{current[0]}] ({plan.columns[current[0]].name!r})")
        elif _CLAIM_RANK[origin] > _CLAIM_RANK[current[2]] or (
                _CLAIM_RANK[origin] == _CLAIM_RANK[current[2]] and plan.columns[i].name == target
                and plan.columns[current[0]].name != target):
            chosen[target] = (i, expr, origin)
    for target, (i, expr, origin) in chosen.items():
        columns[i] = _with_reverse(columns[i], target, expr, origin)

    feeds: list[Feed] = []
    for bcol in blue.columns:
        if bcol.generated:
            feeds.append(Feed(bcol.name, "(computed by blue)", "generated"))
        elif bcol.name in chosen:
            i, expr, origin = chosen[bcol.name]
            how = {"explicit": "reverse", "null": "reverse: NULL", "column": "copied back",
                   "cast": "cast back"}[origin]
            source = {"null": "NULL", "explicit": expr}.get(origin, plan.columns[i].name)
            feeds.append(Feed(bcol.name, source, how))
            if origin == "null" and bcol.not_null:
                problems.append(f"columns[{i}].reverse: blue column {bcol.name!r} is NOT NULL; it cannot "
                                f"receive NULL after cutover")
        elif bcol.name in read_by:
            readers = ", ".join(f"columns[{i}] ({plan.columns[i].name})" for i in read_by[bcol.name])
            problems.append(f"columns: blue column {bcol.name!r} is read by {readers} but nothing feeds it "
                            f"after cutover, so a rollback would lose the writes made to it: add `reverse` "
                            f"(and `reverse_column: {bcol.name}`), or `reverse: \"NULL\"` to let it go NULL")
        elif bcol.identity:
            feeds.append(Feed(bcol.name, "(its identity sequence)", "identity"))
        elif bcol.default is not None:
            feeds.append(Feed(bcol.name, bcol.default, "default (not in green)"))
        elif bcol.not_null:
            problems.append(f"columns: blue column {bcol.name!r} is NOT NULL without a default and no "
                            f"green column feeds it back (add `reverse` and `reverse_column`)")
        else:
            feeds.append(Feed(bcol.name, "NULL", "not in green"))

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
    key_columns = [c for c in (blue.column(k) for k in blue_key) if c is not None]

    indexes = [
        IndexSpec(name=ix.name or fit_name(f"{green.name}_{'_'.join(ix.columns or [str(i)])}", "_idx"),
                  columns=list(ix.columns or []), unique=ix.unique, where=ix.where, definition=ix.definition)
        for i, ix in enumerate(plan.indexes)]
    views: list[ViewSpec] = []
    for view in plan.views:
        schema, name = parse_qualified_name(view.name)
        views.append(ViewSpec(QualifiedName(schema or blue.name.schema, name), view.query))
    checks = [CheckSpec(c.name, c.expression) for c in plan.checks]
    search_path = list(dict.fromkeys(["pg_catalog", blue.name.schema, "public", "pg_temp"]))
    if problems:
        return None, problems
    written_back = {c.reverse_column for c in columns if c.reverse_column is not None}
    spec = MigrationSpec(
        name=plan.name, plan_hash=plan.structural_hash(), blue=blue.name, green=green, retired=retired,
        state_schema=state_schema, columns=columns, green_key=green_key, blue_key=blue_key,
        blue_key_types=[c.type for c in key_columns], indexes=indexes, checks=checks, blue_owner=blue.owner,
        grants=[(g.grantee, g.privilege, g.grantable) for g in blue.grants], search_path=search_path,
        primary_key_name=fit_name(green.name, "_pkey"),
        forward_function=QualifiedName(state_schema, f"{plan.name}_forward"),
        triggers={op: f"bgsync_{plan.name}_fwd_{op}" for op in ("ins", "upd", "del", "trunc")},
        blue_key_collations=[c.collation for c in key_columns], settings=dict(settings or {}),
        blue_generated=blue.generated_columns(),
        blue_identity_always=[c.name for c in blue.columns if c.identity == "a" and c.name in written_back],
        feeds=feeds, views=views,
        versions={} if plan.versions is None else {"blue": plan.versions.blue, "green": plan.versions.green},
        blue_columns=[c.name for c in blue.columns], bulk=plan.backfill.mode == "bulk")
    return spec, []


def _with_reverse(col: GreenColumn, target: str, expr: str, origin: str) -> GreenColumn:
    return GreenColumn(**{**col.__dict__, "reverse_column": target, "reverse_expr": expr, "reverse_origin": origin})


def _unchanged_key(column: str) -> str:
    return (f"key column {column} must be copied unchanged from blue (it identifies each row in both tables): "
            f"remove `from`, or change `key`")


def _regclass_literal(schema: str, name: str) -> str:
    qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
    return "'" + qualified.replace("'", "''") + "'::regclass"
