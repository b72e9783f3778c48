"""Read-only catalog queries with bound values; nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.names import QualifiedName, parse_qualified_name, quote_qualified

Conn = psycopg.Connection[Any]

INTEGER_TYPES = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str
    not_null: bool
    default: str | None          # pg_get_expr of the default, None when absent
    identity: str                # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str               # '' | 's' (stored generated)
    owned_sequence: str | None   # sequence owned by this column (serial), quoted regclass text
    collation: str | None = None  # the column's collation as SQL (schema-qualified, quoted); None: not collatable
    sequence_shared: bool = False  # another table's default also draws from the owned sequence
    own_collation: bool = False   # the collation differs from its type's default (`init` must write it)

    @property
    def has_default(self) -> bool:
        return self.default is not None or bool(self.identity) or bool(self.generated)


@dataclass(frozen=True)
class UniqueIndex:
    name: str
    columns: tuple[str, ...]
    primary: bool
    usable: bool                 # valid, immediate, no predicate, no expressions


@dataclass(frozen=True)
class Grant:
    grantee: str                 # role name, or PUBLIC
    privilege: str
    grantable: bool


@dataclass
class TableInfo:
    oid: int
    name: QualifiedName
    relkind: str
    owner: str
    columns: list[ColumnInfo]
    unique_indexes: list[UniqueIndex]
    grants: list[Grant]
    row_security: bool
    estimated_rows: float
    extra: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    def generated_columns(self) -> list[str]:
        """Columns the table computes itself (GENERATED ALWAYS AS ... STORED): never written."""
        return [c.name for c in self.columns if c.generated]

    @property
    def primary_key(self) -> tuple[str, ...] | None:
        return next((i.columns for i in self.unique_indexes if i.primary), None)


def regclass_oid(conn: Conn, text: str) -> int | None:
    """to_regclass never raises for a missing relation; a syntax error in the name does."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT to_regclass(%s)::oid", [text]).fetchone()
    except psycopg.errors.InvalidName:
        return None
    except psycopg.errors.SyntaxError:
        return None
    return int(row[0]) if row and row[0] is not None else None


def relation_exists(conn: Conn, name: QualifiedName) -> str | None:
    """The relkind of schema.name when something by that name exists, else None."""
    row = conn.execute(
        "SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s", [name.schema, name.name]).fetchone()
    return str(row[0]) if row else None


def schema_exists(conn: Conn, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is not None


def load_table(conn: Conn, oid: int) -> TableInfo:
    """Blue's catalog entry; expressions (defaults) are read with every name schema-qualified."""
    from orchestrator.surroundings import qualified_names

    with qualified_names(conn):
        return _load_table(conn, oid)


def _load_table(conn: Conn, oid: int) -> TableInfo:
    row = conn.execute(
        """SELECT n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relrowsecurity,
                  c.reltuples::float8
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s""",
        [oid]).fetchone()
    assert row is not None
    columns = [
        ColumnInfo(name=r[0], type=r[1], not_null=r[2], default=r[3], identity=r[4], generated=r[5],
                   owned_sequence=r[6], collation=None if r[7] is None else quote_qualified(r[7], r[8]),
                   own_collation=bool(r[9]), sequence_shared=bool(r[10]))
        for r in conn.execute(
            """SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                      pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text,
                      (SELECT format('%%I.%%I', sn.nspname, sc.relname) FROM pg_class sc
                         JOIN pg_namespace sn ON sn.oid = sc.relnamespace WHERE sc.oid = seq.oid),
                      cn.nspname, co.collname, a.attcollation <> t.typcollation,
                      EXISTS (SELECT FROM pg_depend dep2 JOIN pg_attrdef ad ON ad.oid = dep2.objid
                               WHERE dep2.classid = 'pg_attrdef'::regclass AND dep2.refclassid = 'pg_class'::regclass
                                 AND dep2.refobjid = seq.oid AND ad.adrelid <> a.attrelid)
                 FROM pg_attribute a
                 LEFT JOIN LATERAL (SELECT s.oid FROM pg_depend dep
                                      JOIN pg_class s ON s.oid = dep.objid AND s.relkind = 'S'
                                     WHERE dep.classid = 'pg_class'::regclass AND dep.refobjid = a.attrelid
                                       AND dep.refobjsubid = a.attnum AND dep.deptype IN ('a', 'i') LIMIT 1) seq ON true
                 JOIN pg_type t ON t.oid = a.atttypid
                 LEFT JOIN pg_collation co ON co.oid = a.attcollation
                 LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
                 LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum""", [oid])]
    unique_indexes = [
        UniqueIndex(name=r[0], columns=tuple(r[1]), primary=r[2], usable=r[3])
        for r in conn.execute(
            """SELECT ic.relname,
                      ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                             ORDER BY k.ord)::text[],
                      i.indisprimary,
                      i.indisvalid AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                WHERE i.indrelid = %s AND i.indisunique
                ORDER BY NOT i.indisprimary, ic.relname""", [oid])]
    grants = [
        Grant(grantee=r[0], privilege=r[1], grantable=r[2])
        for r in conn.execute(
            """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                      a.privilege_type, a.is_grantable
                 FROM pg_class c, aclexplode(c.relacl) a
                WHERE c.oid = %s AND a.grantee <> c.relowner
                ORDER BY 1, 2""", [oid])]
    return TableInfo(oid=oid, name=QualifiedName(row[0], row[1]), relkind=row[2], owner=row[3],
                     columns=columns, unique_indexes=unique_indexes, grants=grants,
                     row_security=row[4], estimated_rows=max(0.0, row[5]))


def current_user(conn: Conn) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


@dataclass(frozen=True)
class Dependent:
    kind: str
    name: str
    action: str


# -- what a cutover moves ------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewDef:
    """A view or materialized view that reads blue (or reads such a view), with all that makes it up:
    re-created at cutover and at rollback exactly as it was, or with the plan's query."""

    name: QualifiedName
    definition: str
    options: list[str]
    kind: str                                   # v (view) | m (materialized view)
    owner: str
    grants: list[tuple[str, str, bool]]
    comment: str | None = None
    column_comments: dict[str, str] = field(default_factory=dict)
    column_defaults: dict[str, str] = field(default_factory=dict)
    triggers: list[str] = field(default_factory=list)          # CREATE TRIGGER texts (INSTEAD OF ...)
    indexes: list[tuple[str, str, bool]] = field(default_factory=list)  # materialized views: name, USING ..., unique
    reads: list[QualifiedName] = field(default_factory=list)    # the relations its query reads


@dataclass(frozen=True)
class ForeignKey:
    name: str
    table: QualifiedName
    columns: list[str]
    referenced_columns: list[str]
    on_update: str
    on_delete: str
    match: str
    deferrable: bool
    deferred: bool
    partitioned: bool = False     # the referencing table is partitioned (NOT VALID needs PostgreSQL 18)


@dataclass(frozen=True)
class IndexName:
    name: str
    columns: tuple[str, ...]
    unique: bool
    constraint: bool     # backs a PRIMARY KEY or UNIQUE constraint (renamed with RENAME CONSTRAINT)
    primary: bool
    definition: str = ""  # what follows `ON <table>` in CREATE INDEX


FK_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
FK_MATCH = {"f": "FULL", "p": "PARTIAL", "s": "SIMPLE"}


def dependent_views(conn: Conn, table: str) -> list[ViewDef]:
    """Views and materialized views reading `table`, and those reading them, parents before children,
    with definitions whose names are all schema-qualified, owners, grants, comments, column defaults,
    triggers and (materialized views) indexes."""
    from orchestrator.surroundings import qualified_names

    found: list[ViewDef] = []
    with qualified_names(conn):
        frontier = [table]
        seen: set[str] = set()
        while frontier:
            current = frontier.pop(0)
            for r in conn.execute(
                    """SELECT DISTINCT n.nspname, v.relname, pg_get_viewdef(v.oid), v.reloptions::text[],
                              v.relkind::text, pg_get_userbyid(v.relowner), v.oid,
                              ARRAY(SELECT ARRAY[CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                                      ELSE pg_get_userbyid(a.grantee) END,
                                                 a.privilege_type, a.is_grantable::text]
                                      FROM aclexplode(v.relacl) a WHERE a.grantee <> v.relowner)::text[]
                         FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
                         JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace n ON n.oid = v.relnamespace
                        WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                          AND d.refobjid = to_regclass(%s) AND v.oid <> d.refobjid
                        ORDER BY v.oid""", [current]):
                name = QualifiedName(r[0], r[1])
                if str(name) in seen:
                    found = [v for v in found if v.name != name]  # keep it after every view it reads
                seen.add(str(name))
                found.append(_view_details(conn, int(r[6]), ViewDef(
                    name, r[2], list(r[3] or []), r[4], r[5], [(g[0], g[1], g[2] == "true") for g in (r[7] or [])])))
                frontier.append(str(name))
    return found


def _view_details(conn: Conn, oid: int, view: ViewDef) -> ViewDef:
    comment = conn.execute("SELECT obj_description(%s, 'pg_class')", [oid]).fetchone()
    column_comments = {str(r[0]): str(r[1]) for r in conn.execute(
        """SELECT attname, col_description(attrelid, attnum) FROM pg_attribute
            WHERE attrelid = %s AND attnum > 0 AND col_description(attrelid, attnum) IS NOT NULL""", [oid])}
    defaults = {str(r[0]): str(r[1]) for r in conn.execute(
        """SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE d.adrelid = %s""", [oid])}
    triggers = [str(r[0]) for r in conn.execute(
        "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal ORDER BY tgname",
        [oid])]
    indexes = [(str(r[0]), index_definition(str(r[1])), bool(r[2])) for r in conn.execute(
        """SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s ORDER BY c.relname""", [oid])]
    reads = [QualifiedName(str(r[0]), str(r[1])) for r in conn.execute(
        """SELECT DISTINCT n.nspname, c.relname FROM pg_rewrite r JOIN pg_depend d ON d.objid = r.oid
             JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
              AND r.ev_class = %s AND c.oid <> %s ORDER BY 1, 2""", [oid, oid])]
    return ViewDef(view.name, view.definition, view.options, view.kind, view.owner, view.grants,
                   comment=comment[0] if comment else None, column_comments=column_comments,
                   column_defaults=defaults, triggers=triggers, indexes=indexes, reads=reads)


def inbound_foreign_keys(conn: Conn, table: str) -> list[ForeignKey]:
    return [ForeignKey(name=r[0], table=QualifiedName(r[1], r[2]), columns=list(r[3]), referenced_columns=list(r[4]),
                       on_update=FK_ACTIONS[r[5]], on_delete=FK_ACTIONS[r[6]], match=FK_MATCH[r[7]],
                       deferrable=r[8], deferred=r[9], partitioned=r[10])
            for r in conn.execute(
        """SELECT c.conname, n.nspname, t.relname,
                  ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o)::text[],
                  ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)::text[],
                  c.confupdtype::text, c.confdeltype::text, c.confmatchtype::text, c.condeferrable, c.condeferred,
                  t.relkind = 'p'
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE c.contype = 'f' AND c.confrelid = to_regclass(%s) AND c.conrelid <> c.confrelid
              AND c.conparentid = 0
            ORDER BY n.nspname, t.relname, c.conname""", [table])]


def index_names(conn: Conn, table: str) -> list[IndexName]:
    return [IndexName(r[0], tuple(r[1]), r[2], r[3], r[4], index_definition(r[5])) for r in conn.execute(
        """SELECT ic.relname,
                  ARRAY(SELECT coalesce(a.attname, '') FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                          LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                         ORDER BY k.o)::text[],
                  i.indisunique,
                  EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid
                             AND c.contype IN ('p', 'u')),
                  i.indisprimary, pg_get_indexdef(i.indexrelid)
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
            WHERE i.indrelid = to_regclass(%s) ORDER BY ic.relname""", [table])]


def index_validity(conn: Conn, table: str) -> dict[str, bool]:
    """Each index of `table` by name, and whether it is valid (an interrupted build leaves it invalid)."""
    return {r[0]: r[1] for r in conn.execute(
        """SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = to_regclass(%s)""", [table])}


def serial_sequence(conn: Conn, table: str, column: str) -> QualifiedName | None:
    row = conn.execute("SELECT pg_get_serial_sequence(%s, %s)", [table, column]).fetchone()
    if not row or row[0] is None:
        return None
    schema, name = parse_qualified_name(row[0])
    return QualifiedName(schema or "public", name)


def triggers_on(conn: Conn, table: str) -> dict[str, str]:
    """Trigger name -> tgenabled ('O' origin, 'A' always, 'R' replica, 'D' disabled)."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT tgname, tgenabled::text FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND NOT tgisinternal",
        [table])}


@dataclass(frozen=True)
class Session:
    pid: int
    application: str
    state: str
    xact_start: Any

    def describe(self) -> str:
        since = f", transaction since {self.xact_start:%H:%M:%S}" if self.xact_start is not None else ""
        return f"pid {self.pid} ({self.application or 'no application_name'}, {self.state or 'unknown state'}{since})"


def sessions_with_snapshot_before(conn: Conn, moment: Any) -> list[Session]:
    """Client sessions of this database holding a snapshot in a transaction that began before `moment`."""
    return [Session(*r) for r in conn.execute(
        """SELECT pid, coalesce(application_name, ''), coalesce(state, ''), xact_start FROM pg_stat_activity
            WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
              AND backend_xmin IS NOT NULL AND xact_start < %s
            ORDER BY xact_start, pid""", [moment])]


def sessions_hidden_from_us(conn: Conn) -> int:
    """Client sessions of this database whose transaction details this role may not read."""
    row = conn.execute(
        """SELECT count(*) FROM pg_stat_activity
            WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()
              AND state IS NULL""").fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class IndexDef:
    """A secondary index as `init` writes it: what follows `ON <table>` in CREATE INDEX."""

    name: str
    definition: str
    unique: bool
    columns: tuple[str, ...]


def secondary_indexes(conn: Conn, oid: int) -> list[IndexDef]:
    """Every index of the table but the primary key, exactly as PostgreSQL would re-create it."""
    out = []
    for name, indexdef, unique, columns in conn.execute(
            """SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique,
                      ARRAY(SELECT coalesce(a.attname, '') FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(n, o)
                              LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                             ORDER BY k.o)::text[]
                 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE i.indrelid = %s AND NOT i.indisprimary
                ORDER BY c.relname""", [oid]):
        out.append(IndexDef(name, index_definition(str(indexdef)), bool(unique), tuple(columns)))
    return out


def index_definition(indexdef: str) -> str:
    """`CREATE [UNIQUE] INDEX name ON [ONLY] table USING ...` -> `USING ...`."""
    return "USING " + indexdef.split(" USING ", 1)[1]
