"""cutover: flip the live name to green in one short transaction under lock_timeout, with bounded
retries; sequences, index names, views, materialized views, functions, user triggers, row-level
security, publications and inbound foreign keys follow; reverse sync keeps blue current so rollback
is instant and loses nothing.

Green's shape (its key, indexes and own sequences) comes from the plan, not from green's catalog,
so the cutover's SQL can be printed before prepare has created green; what a real run reads from
the catalog (blue's index and sequence names, what surrounds blue, the name PostgreSQL gives an
identity column's sequence) is read when it runs, and marked in the SQL. Everything a rollback must
put back is recorded in the journal with the cutover."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from orchestrator import catalog, surroundings
from orchestrator.catalog import IndexName, ViewDef
from orchestrator.errors import GateRefused
from orchestrator.executor import Statement, Unit
from orchestrator.names import NAMEDATALEN_BYTES, QualifiedName
from orchestrator.phases.keys import keys_to_add, keys_units, self_keys_after_flip
from orchestrator.render import render_steps
from orchestrator.rewrite import on_relation, retarget
from orchestrator.spec import GreenColumn, MigrationSpec, fit_name, forward_sync, reverse_sync
from orchestrator.surroundings import FunctionDef, Membership, PolicyDef, RowSecurity, TriggerDef

Conn = psycopg.Connection[Any]


@dataclass
class Rename:
    kind: str          # table | index | constraint | sequence | view | matview
    schema: str
    old: str
    new: str
    table: str = ""    # for constraints: the table's name when the rename runs

    def inverse(self) -> Rename:
        return Rename(self.kind, self.schema, self.new, self.old, self.table)


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


def _retired_index_name(index: str, blue: str, retired: str) -> str:
    return retired + index[len(blue):] if index.startswith(blue) else f"{retired}_{index}"


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
    return [key, *(IndexName(ix.name, tuple(ix.columns), ix.unique, False, False, ix.definition or "")
                   for ix in spec.indexes)]


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


def copied_unchanged(spec: MigrationSpec) -> dict[str, str]:
    """blue column -> the green column that copies it unchanged (or cast): the names a foreign key, a
    publication's column list or a comment follows."""
    out: dict[str, str] = {}
    for col in spec.columns:
        if col.reverse_column is not None and col.reverse_origin in ("column", "cast"):
            out[col.reverse_column] = col.name
    return out


# -- what surrounds the table ---------------------------------------------------------------------
@dataclass
class MatviewSwap:
    """A materialized view over blue: a populated copy over green is built before the lock and swapped
    in by rename inside it; the old one is kept (renamed) for a rollback and dropped by finalize."""

    name: QualifiedName
    copy: str
    retired: str
    query: str                                   # the copy's query, over green
    indexes: list[list[Any]] = field(default_factory=list)   # [name, definition, unique, copy name, retired name]


@dataclass
class Surround:
    """Everything around blue that follows the live name, as it was on blue (what rollback restores)."""

    views: list[ViewDef] = field(default_factory=list)
    functions: list[FunctionDef] = field(default_factory=list)
    triggers: list[TriggerDef] = field(default_factory=list)
    rls: RowSecurity = field(default_factory=lambda: RowSecurity(False, False, []))
    publications: list[Membership] = field(default_factory=list)
    matviews: list[MatviewSwap] = field(default_factory=list)

    @property
    def plain_views(self) -> list[ViewDef]:
        return [v for v in self.views if v.kind == "v"]


def read_surround(conn: Conn, spec: MigrationSpec, free: FreeNames) -> Surround:
    oid = catalog.regclass_oid(conn, str(spec.blue))
    if oid is None:
        return Surround()
    views = own_views_excluded(spec, catalog.dependent_views(conn, str(spec.blue)))
    queries = view_queries(spec, views)
    matviews = []
    for view in views:
        if view.kind != "m":
            continue
        if spec.blue not in view.reads:
            raise GateRefused(f"materialized view {view.name.display()} reads the table through another view; "
                              f"bgsync re-creates materialized views that read the table directly: drop it "
                              f"before cutover and re-create it after")
        schema = view.name.schema
        copy = free.get(schema, view.name.name, "_bgsync_new")
        retired = free.get(schema, view.name.name, "_bgsync_old")
        query = retarget(queries[str(view.name)], {spec.blue: spec.green})
        indexes = [[name, definition, unique, free.get(schema, name, "_bgsync_new"),
                    free.get(schema, name, "_bgsync_old")] for name, definition, unique in view.indexes]
        matviews.append(MatviewSwap(view.name, copy, retired, query, indexes))
    return Surround(views=views, functions=surroundings.dependent_functions(conn, oid),
                    triggers=surroundings.user_triggers(conn, oid), rls=surroundings.row_security(conn, oid),
                    publications=surroundings.publications(conn, oid), matviews=matviews)


def own_views_excluded(spec: MigrationSpec, views: list[ViewDef]) -> list[ViewDef]:
    """The views of `expose`'s version schemas are bgsync's own, each tied to one table on purpose."""
    schemas = set(spec.versions.values())
    return [v for v in views if v.name.schema not in schemas]


def view_queries(spec: MigrationSpec, views: list[ViewDef]) -> dict[str, str]:
    """Each dependent view's query after cutover: the plan's, else its own definition."""
    given = {str(v.name): v.query for v in spec.views}
    return {str(v.name): given.get(str(v.name), v.definition).strip().rstrip(";") for v in views}


def surround_to_json(surround: Surround) -> dict[str, Any]:
    return asdict(surround)


def surround_from_json(data: dict[str, Any] | None) -> Surround:
    if not data:
        return Surround()

    def qn(d: dict[str, str]) -> QualifiedName:
        return QualifiedName(d["schema"], d["name"])

    views = [ViewDef(**{**v, "name": qn(v["name"]), "grants": [tuple(g) for g in v["grants"]],
                        "indexes": [tuple(i) for i in v["indexes"]], "reads": [qn(r) for r in v["reads"]]})
             for v in data.get("views", [])]
    functions = [FunctionDef(**{**f, "acl": None if f["acl"] is None else [tuple(g) for g in f["acl"]]})
                 for f in data.get("functions", [])]
    rls = data.get("rls") or {"enabled": False, "forced": False, "policies": []}
    return Surround(
        views=views, functions=functions, triggers=[TriggerDef(**t) for t in data.get("triggers", [])],
        rls=RowSecurity(rls["enabled"], rls["forced"], [PolicyDef(**p) for p in rls["policies"]]),
        publications=[Membership(**m) for m in data.get("publications", [])],
        matviews=[MatviewSwap(**{**m, "name": qn(m["name"])}) for m in data.get("matviews", [])])


def view_columns_kept(view: ViewDef, query: str) -> ViewDef:
    """A view whose query the plan replaces keeps the comments and defaults of the columns it still has."""
    if query.strip().rstrip(";") == view.definition.strip().rstrip(";"):
        return view
    from orchestrator.expressions import output_names

    kept = output_names(query)
    return ViewDef(view.name, view.definition, view.options, view.kind, view.owner, view.grants, view.comment,
                   {c: t for c, t in view.column_comments.items() if c in kept},
                   {c: d for c, d in view.column_defaults.items() if c in kept}, view.triggers, view.indexes,
                   view.reads)


@dataclass
class Flip:
    """What one cutover moves: read from blue's catalog, with green's side known from the plan."""

    mode: str
    live: QualifiedName                 # the table the application writes after the flip
    views: list[ViewDef]
    sequences: list[dict[str, Any]]     # from_seq (blue's), to_seq (green's), column, table
    renames: list[Rename]
    surround: Surround = field(default_factory=Surround)
    queries: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> dict[str, Any]:
        """What the journal keeps, so that rollback undoes exactly this flip."""
        return {"mode": self.mode, "renames": [asdict(r) for r in self.renames],
                "surround": surround_to_json(self.surround)}


def plan_flip(conn: Conn, spec: MigrationSpec, mode: str) -> Flip:
    """The renames, sequence moves, views, foreign keys and everything else a cutover moves, the same
    before prepare (green predicted from the plan) as when it runs."""
    blue, green, retired = spec.blue, spec.green, spec.retired
    if mode == "rename" and green.schema != blue.schema:
        raise GateRefused(f"rename cutover needs green in blue's schema {blue.schema!r}; use cutover.mode: view")
    free = FreeNames(conn, reserved=green_names(conn, spec))
    surround = read_surround(conn, spec, free)
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
    for mv in surround.matviews:
        schema = mv.name.schema
        renames.append(Rename("matview", schema, mv.name.name, mv.retired))
        renames += [Rename("index", schema, ix[0], ix[4]) for ix in mv.indexes]
        renames.append(Rename("matview", schema, mv.copy, mv.name.name))
        renames += [Rename("index", schema, ix[3], ix[0]) for ix in mv.indexes]
    if mode == "rename":
        blue_indexes = catalog.index_names(conn, str(blue))
        for ix in blue_indexes:
            new = free.get(blue.schema, _retired_index_name(ix.name, blue.name, retired.name))
            renames.append(Rename("constraint" if ix.constraint else "index", blue.schema, ix.name, new, blue.name))
        renames.append(Rename("table", blue.schema, blue.name, retired.name))
        renames.append(Rename("table", green.schema, green.name, blue.name))
        for gx in green_indexes(spec):
            match = next((bx for bx in blue_indexes
                          if (bx.primary and gx.primary)
                          or (not bx.primary and not gx.primary and bx.unique == gx.unique
                              and ((gx.definition and bx.definition == gx.definition)
                                   or (not gx.definition and bx.columns == gx.columns)))), None)
            if match is not None:
                blue_indexes.remove(match)
                renames.append(Rename("constraint" if gx.constraint else "index", green.schema, gx.name,
                                      match.name, blue.name))
        live = blue
    else:
        renames.append(Rename("table", blue.schema, blue.name, retired.name))
        live = green
    return Flip(mode=mode, live=live, views=surround.views, sequences=sequences, renames=renames,
                surround=surround, queries=view_queries(spec, surround.views))


def trigger_statements(triggers: list[TriggerDef], table: QualifiedName) -> list[TriggerDef]:
    """User triggers moved onto `table` (the definition's ON clause rewritten by the parser)."""
    return [TriggerDef(t.name, on_relation(t.definition, table), t.enabled, t.comment) for t in triggers]


def publication_columns(spec: MigrationSpec, memberships: list[Membership], *, to_green: bool) -> list[Membership]:
    mapping = copied_unchanged(spec)
    if not to_green:
        mapping = {g: b for b, g in mapping.items()}
    return [Membership(m.publication, None if m.columns is None else [mapping.get(c, c) for c in m.columns],
                       m.row_filter) for m in memberships]


def window_defaults(spec: MigrationSpec, flip: Flip) -> list[tuple[QualifiedName, str, str]]:
    """After a cutover in the window of `expose`, both version views draw ids from the live table's
    sequence: green's, which the flip gives blue's old name (or keeps its own in another schema)."""
    from orchestrator.phases.expose import version_views

    blue_view, green_view = version_views(spec)
    out = []
    for pair in flip.sequences:
        seq = pair["from_seq"] if pair["to_seq"].schema == pair["from_seq"].schema else pair["to_seq"]
        col = next(c for c in spec.columns if c.name == pair["column"])
        if col.reverse_column is not None:
            out += [(blue_view, col.reverse_column, str(seq)), (green_view, col.name, str(seq))]
    for col in spec.columns:
        if col.shared_sequence and col.reverse_column is not None:
            out += [(blue_view, col.reverse_column, col.shared_sequence), (green_view, col.name, col.shared_sequence)]
    return out


def cutover_units(conn: Conn, spec: MigrationSpec, mode: str, lock_timeout: str, attempts: int,
                  current_user: str, *, with_keys: bool = True, window: bool = False) -> tuple[list[Unit], Unit]:
    """(units before the lock: foreign keys green still lacks, green analyzed, the materialized views'
    copies), then the flip itself. Before the backfill, green's foreign keys are the backfill's to add
    (`with_keys=False`: a printed cutover shows what cutover itself runs after it)."""
    flip = plan_flip(conn, spec, mode)
    surround = flip.surround
    record = {**flip.record, "window": window}
    lock = [spec.blue, spec.green, *(v.name for v in surround.plain_views)]
    if window:
        from orchestrator.phases.expose import version_views

        lock = [*version_views(spec), *lock]     # the version views change too; their writers hold them first
    forward = forward_sync(spec, source=spec.retired, target=flip.live, two_way=True) if window else forward_sync(spec)
    steps = render_steps(
        "cutover.sql.j2", spec=spec, spec_mode=mode, forward=forward,
        reverse=reverse_sync(spec, flip.live, two_way=window), sequences=flip.sequences, renames=flip.renames,
        window=window, defaults=window_defaults(spec, flip) if window else [],
        views=surround.plain_views, fk_target=flip.live,
        view_columns=[c.name for c in spec.columns], current_user=current_user, record=json.dumps(record),
        lock_relations=list(dict.fromkeys(lock)), lock_timeout=lock_timeout,
        create_views=[view_columns_kept(v, flip.queries[str(v.name)]) for v in surround.plain_views],
        queries=flip.queries, functions=surround.functions, drop_triggers=surround.triggers,
        trigger_source=spec.blue, create_triggers=trigger_statements(surround.triggers, flip.live),
        rls=surround.rls, rls_table=flip.live, publications=surround.publications, publication_source=spec.blue,
        add_publications=publication_columns(spec, surround.publications, to_green=True),
        shared_sequences=[(c.shared_sequence, c.name) for c in spec.columns if c.shared_sequence],
        self_keys=self_keys_after_flip(conn, spec, blue=spec.blue, blue_written=True, green=spec.green,
                                       green_written=window, green_gets=frozenset(
                                           k.name for k in keys_to_add(conn, spec) if k.table == spec.green)))
    statements = [Statement(d, s) for d, s in steps]
    statements[-1] = Statement(statements[-1].description, statements[-1].sql,
                               expect_rows=f"cutover {spec.name} refused: the migration is no longer "
                                           f"{'exposed' if window else 'verified'}")
    unit = Unit(f"cutover {spec.name}: {spec.blue.display()} becomes green ({mode} mode)", statements,
                lock_timeout=lock_timeout, attempts=attempts, phase="cutover")
    before = keys_units(conn, spec, lock_timeout, attempts, "cutover") if with_keys else []
    before.append(Unit(f"cutover {spec.name}: green analyzed and materialized views copied over green before the lock",
                       [Statement(d, s) for d, s in render_steps(
                           "cutover_prepare.sql.j2", spec=spec, matviews=surround.matviews,
                           views={str(v.name): v for v in surround.views}, current_user=current_user)],
                       atomic=False, phase="cutover"))
    return before, unit


def server_version(conn: Conn) -> int:
    return int(conn.info.server_version)


@dataclass
class BlockerCanceller:
    """`cutover --cancel-blockers`: after a lock attempt failed, the sessions whose transactions hold a lock
    on blue or green and have been open longer than lock_timeout (the ones that kept the flip from its
    lock; short transactions come and go and are left alone) are cancelled with pg_cancel_backend, or, when
    idle in transaction (a cancel does not reach them), terminated with pg_terminate_backend. Each one is
    named on stderr and in the journal (outcome 'cancelled')."""

    conn: Conn
    spec: MigrationSpec
    lock_timeout: str
    cancelled: list[str] = field(default_factory=list)

    def cancel(self, unit: Any) -> None:
        from orchestrator import log
        from orchestrator.render import render

        [(_d, text)] = render_steps("cutover_blockers.sql.j2")
        try:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.rollback()
            rows = self.conn.execute(text, [self.lock_timeout,
                                            [str(self.spec.blue), str(self.spec.green)]]).fetchall()
            for pid, user, application, state, age, query, how, done in rows:
                who = (f"pid {pid} (user {user}, application {application or '-'}, {state}, transaction open "
                       f"{age:.1f}s, last query: {' '.join((query or '').split())[:120]})")
                outcome = f"{'terminated' if how == 'terminate' else 'cancelled'}" if done else \
                    f"could not be {'terminated' if how == 'terminate' else 'cancelled'} (privileges?)"
                message = f"blocker of the cutover lock {outcome}: {who}"
                log.warn(f"cutover {self.spec.name}: {message}")
                self.cancelled.append(message)
                self.conn.execute(render("journal_event.sql.j2", schema=self.spec.state_schema),
                                  [self.spec.name, "cutover", "cancel blockers", None, None, "cancelled", message])
            self.conn.commit()
        except psycopg.Error as error:
            log.warn(f"cutover {self.spec.name}: could not cancel the blockers: {error}")
            if not self.conn.closed:
                self.conn.rollback()
