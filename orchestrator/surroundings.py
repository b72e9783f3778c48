"""What surrounds the live table and must follow its name: read-only catalog queries with bound values.

Definitions are read with `search_path = pg_catalog`, so every name in them is schema-qualified and
means the same object whatever session re-creates it later.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.names import QualifiedName, quote_qualified

Conn = psycopg.Connection[Any]
Grant = tuple[str, str, bool]


@contextmanager
def qualified_names(conn: Conn) -> Iterator[None]:
    """Definitions read inside name every user object with its schema (rolled back afterwards)."""
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT set_config('search_path', 'pg_catalog', true)")
        yield


@dataclass(frozen=True)
class TableProperties:
    """Blue's own properties that green takes at prepare."""

    comment: str | None = None
    column_comments: dict[str, str] = field(default_factory=dict)
    reloptions: list[str] = field(default_factory=list)
    toast_reloptions: list[str] = field(default_factory=list)
    replica_identity: str = "d"                 # d(efault) n(othing) f(ull) i(ndex)
    replica_index: str | None = None            # the index's definition (after ON) when 'i'
    statistics: dict[str, int] = field(default_factory=dict)
    storage: dict[str, str] = field(default_factory=dict)     # column -> PLAIN | EXTERNAL | EXTENDED | MAIN
    compression: dict[str, str] = field(default_factory=dict)  # column -> pglz | lz4


STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "x": "EXTENDED", "m": "MAIN"}
COMPRESSION = {"p": "pglz", "l": "lz4"}


def table_properties(conn: Conn, oid: int) -> TableProperties:
    row = conn.execute(
        """SELECT obj_description(c.oid, 'pg_class'), coalesce(c.reloptions, '{}'),
                  coalesce((SELECT t.reloptions FROM pg_class t WHERE t.oid = c.reltoastrelid), '{}'),
                  c.relreplident::text,
                  (SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
             FROM pg_class c WHERE c.oid = %s""", [oid]).fetchone()
    assert row is not None
    comments, statistics, storage, compression = {}, {}, {}, {}
    for name, comment, target, attstorage, typstorage, attcompression in conn.execute(
            """SELECT a.attname, col_description(a.attrelid, a.attnum), a.attstattarget::int,
                      a.attstorage::text, t.typstorage::text, a.attcompression::text
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""", [oid]):
        if comment is not None:
            comments[name] = comment
        if target is not None and target >= 0:
            statistics[name] = int(target)
        if attstorage != typstorage:
            storage[name] = STORAGE[attstorage]
        if attcompression:
            compression[name] = COMPRESSION.get(attcompression, attcompression)
    replica_index = None
    if row[4]:
        replica_index = "USING " + str(row[4]).split(" USING ", 1)[1]
    return TableProperties(comment=row[0], column_comments=comments, reloptions=list(row[1]),
                           toast_reloptions=list(row[2]), replica_identity=row[3], replica_index=replica_index,
                           statistics=statistics, storage=storage, compression=compression)


@dataclass(frozen=True)
class OutboundKey:
    """A foreign key of blue's that green takes after the backfill."""

    name: str
    columns: list[str]
    referenced: QualifiedName
    referenced_columns: list[str]
    on_update: str
    on_delete: str
    match: str
    deferrable: bool
    deferred: bool
    self_reference: bool


FK_ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
FK_MATCH = {"f": "FULL", "p": "PARTIAL", "s": "SIMPLE"}


def outbound_keys(conn: Conn, oid: int) -> list[OutboundKey]:
    return [OutboundKey(name=r[0], columns=list(r[1]), referenced=QualifiedName(r[2], r[3]),
                        referenced_columns=list(r[4]), on_update=FK_ACTIONS[r[5]], on_delete=FK_ACTIONS[r[6]],
                        match=FK_MATCH[r[7]], deferrable=r[8], deferred=r[9], self_reference=r[10])
            for r in conn.execute(
        """SELECT c.conname,
                  ARRAY(SELECT a.attname FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o)::text[],
                  n.nspname, t.relname,
                  ARRAY(SELECT a.attname FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)::text[],
                  c.confupdtype::text, c.confdeltype::text, c.confmatchtype::text, c.condeferrable, c.condeferred,
                  c.confrelid = c.conrelid
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.confrelid JOIN pg_namespace n ON n.oid = t.relnamespace
            WHERE c.contype = 'f' AND c.conrelid = %s AND c.conparentid = 0
            ORDER BY c.conname""", [oid])]


@dataclass(frozen=True)
class TriggerDef:
    """A user trigger on blue: it follows the live name, so it fires once per write."""

    name: str
    definition: str          # CREATE [CONSTRAINT] TRIGGER ..., names qualified
    enabled: str             # O (origin) | D (disabled) | R (replica) | A (always)
    comment: str | None


def user_triggers(conn: Conn, oid: int) -> list[TriggerDef]:
    with qualified_names(conn):
        return [TriggerDef(r[0], r[1], r[2], r[3]) for r in conn.execute(
            """SELECT tgname, pg_get_triggerdef(oid), tgenabled::text, obj_description(oid, 'pg_trigger')
                 FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal AND tgname NOT LIKE 'bgsync\\_%%'
                ORDER BY tgname""", [oid])]


@dataclass(frozen=True)
class PolicyDef:
    name: str
    command: str             # ALL | SELECT | INSERT | UPDATE | DELETE
    permissive: bool
    roles: list[str]         # role names, or PUBLIC
    using: str | None
    check: str | None


POLICY_COMMANDS = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


@dataclass(frozen=True)
class RowSecurity:
    enabled: bool
    forced: bool
    policies: list[PolicyDef]


def row_security(conn: Conn, oid: int) -> RowSecurity:
    row = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s", [oid]).fetchone()
    assert row is not None
    with qualified_names(conn):
        policies = [PolicyDef(r[0], POLICY_COMMANDS[r[1]], r[2], list(r[3]), r[4], r[5]) for r in conn.execute(
            """SELECT polname, polcmd::text, polpermissive,
                      ARRAY(SELECT CASE WHEN r = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(r) END
                              FROM unnest(polroles) AS r ORDER BY 1)::text[],
                      pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
                 FROM pg_policy WHERE polrelid = %s ORDER BY polname""", [oid])]
    return RowSecurity(bool(row[0]), bool(row[1]), policies)


@dataclass(frozen=True)
class Membership:
    """Blue in a publication (named explicitly, not FOR ALL TABLES / TABLES IN SCHEMA)."""

    publication: str
    columns: list[str] | None
    row_filter: str | None


def publications(conn: Conn, oid: int) -> list[Membership]:
    with qualified_names(conn):
        return [Membership(r[0], list(r[1]) if r[1] else None, r[2]) for r in conn.execute(
            """SELECT p.pubname,
                      CASE WHEN pr.prattrs IS NOT NULL THEN
                          ARRAY(SELECT a.attname FROM unnest(pr.prattrs::int2[]) WITH ORDINALITY k(n, o)
                                  JOIN pg_attribute a ON a.attrelid = pr.prrelid AND a.attnum = k.n
                                 ORDER BY k.o)::text[]
                      END,
                      pg_get_expr(pr.prqual, pr.prrelid)
                 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                WHERE pr.prrelid = %s ORDER BY p.pubname""", [oid])]


@dataclass(frozen=True)
class FunctionDef:
    """A function that depends on blue (a SQL-standard body reading or writing it, its row type in the
    signature): dropped before the flip and re-created after it, so it follows the live name."""

    signature: str           # regprocedure text, names qualified
    kind: str                # FUNCTION | PROCEDURE
    definition: str          # pg_get_functiondef (CREATE OR REPLACE ...)
    owner: str
    acl: list[Grant] | None  # None: the default (EXECUTE to PUBLIC)
    comment: str | None
    why: str                 # what ties it to blue
    blockers: list[str] = field(default_factory=list)   # objects that depend on the function itself


def dependent_functions(conn: Conn, oid: int) -> list[FunctionDef]:
    with qualified_names(conn):
        rows = conn.execute(
            """WITH blue AS (SELECT c.oid, c.reltype, t.typarray FROM pg_class c JOIN pg_type t ON t.oid = c.reltype
                              WHERE c.oid = %s),
                    deps AS (
                        SELECT d.objid AS fn,
                               CASE WHEN d.refclassid = 'pg_class'::regclass THEN 'its body reads or writes the table'
                                    ELSE 'the table''s row type is in its signature' END AS why
                          FROM pg_depend d, blue
                         WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'n'
                           AND ((d.refclassid = 'pg_class'::regclass AND d.refobjid = blue.oid)
                             OR (d.refclassid = 'pg_type'::regclass AND d.refobjid IN (blue.reltype, blue.typarray))))
               SELECT p.oid::regprocedure::text, CASE p.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                      pg_get_functiondef(p.oid), pg_get_userbyid(p.proowner),
                      CASE WHEN p.proacl IS NULL THEN NULL ELSE
                          ARRAY(SELECT ARRAY[CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                                             a.privilege_type, a.is_grantable::text]
                                  FROM aclexplode(p.proacl) a WHERE a.grantee <> p.proowner)::text[] END,
                      obj_description(p.oid, 'pg_proc'), string_agg(DISTINCT deps.why, '; '),
                      ARRAY(SELECT pg_describe_object(d2.classid, d2.objid, d2.objsubid) FROM pg_depend d2
                             WHERE d2.refclassid = 'pg_proc'::regclass AND d2.refobjid = p.oid AND d2.deptype = 'n'
                               AND d2.classid <> 'pg_rewrite'::regclass)::text[]
                 FROM deps JOIN pg_proc p ON p.oid = deps.fn
                GROUP BY p.oid ORDER BY 1""", [oid]).fetchall()
    return [FunctionDef(signature=r[0], kind=r[1], definition=r[2], owner=r[3],
                        acl=None if r[4] is None else [(g[0], g[1], g[2] == "true") for g in r[4]],
                        comment=r[5], why=r[6], blockers=list(r[7] or [])) for r in rows]


def dependent_types(conn: Conn, oid: int) -> list[str]:
    """Types built on blue's row type (composite attributes, domains, ranges): bgsync cannot move them."""
    return [str(r[0]) for r in conn.execute(
        """SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid)
             FROM pg_depend d JOIN pg_class c ON c.oid = %s
            WHERE d.refclassid = 'pg_type'::regclass AND d.refobjid = c.reltype AND d.deptype = 'n'
              AND d.classid <> 'pg_proc'::regclass
              AND NOT (d.classid = 'pg_class'::regclass AND d.objid = c.oid)
            ORDER BY 1""", [oid])]


def object_names(defs: list[Any]) -> str:
    return ", ".join(str(getattr(d, "signature", getattr(d, "name", d))) for d in defs)


def quoted(*parts: str) -> str:
    return quote_qualified(*parts)
