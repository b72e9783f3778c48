"""SQL definitions pointed at another relation, through PostgreSQL's own parser (pglast).

A view, trigger, index or function read from the catalog names blue; to build a materialized view's
copy over green before the flip, to rehearse re-creating an object over a temporary table of green's
shape, or to move a trigger to green in view mode, the same definition must name another relation.
The parse tree is changed (relation references, row-type names, the object's own name) and printed
back; the text is never edited with string operations.
"""

from __future__ import annotations

from typing import Any

from pglast import ast, parse_sql
from pglast.stream import RawStream
from pglast.visitors import Visitor

from orchestrator.names import QualifiedName

Mapping = dict[QualifiedName, QualifiedName]


def _target(mapping: Mapping, schema: str | None, name: str) -> QualifiedName | None:
    for old, new in mapping.items():
        if old.name == name and (schema is None or schema == old.schema):
            return new
    return None


class _Retarget(Visitor):
    def __init__(self, mapping: Mapping) -> None:
        super().__init__()
        self.mapping = mapping

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> ast.RangeVar | None:
        new = _target(self.mapping, node.schemaname, str(node.relname))
        if new is None:
            return None
        # without an alias, columns qualified by the old name (`orders.id`) must keep resolving
        alias = node.alias if node.alias is not None or new.name == node.relname else ast.Alias(
            aliasname=node.relname)
        return ast.RangeVar(schemaname=new.schema, relname=new.name, inh=node.inh,
                            relpersistence=node.relpersistence, alias=alias)

    def visit_TypeName(self, ancestors: Any, node: ast.TypeName) -> ast.TypeName | None:
        names = [getattr(n, "sval", None) for n in (node.names or ())]
        if not names or None in names or len(names) > 2:
            return None
        schema, name = (None, names[0]) if len(names) == 1 else (names[0], names[1])
        new = _target(self.mapping, schema, str(name))
        if new is None:
            return None
        return ast.TypeName(names=(ast.String(sval=new.schema), ast.String(sval=new.name)), setof=node.setof,
                            pct_type=node.pct_type, typmods=node.typmods, typemod=node.typemod,
                            arrayBounds=node.arrayBounds)


def retarget(sql: str, mapping: Mapping, *, rename: QualifiedName | None = None) -> str:
    """`sql` (one statement) with every reference to a relation (or its row type) in `mapping` replaced;
    `rename` also renames the object a CREATE statement creates (function, index, view, trigger's
    function stays). SQL function bodies given as strings are rewritten too."""
    tree = parse_sql(sql)
    _Retarget(mapping)(tree)
    for raw in tree:
        statement = raw.stmt
        relation = getattr(statement, "relation", None)
        if isinstance(statement, (ast.CreateTrigStmt, ast.IndexStmt, ast.CreatePolicyStmt)) \
                and isinstance(relation, ast.RangeVar) and relation.alias is not None:
            relation.alias = None        # these statements take no alias for their relation
        if isinstance(statement, ast.CreateFunctionStmt):
            _rewrite_sql_body(statement, mapping)
            if rename is not None:
                statement.funcname = (ast.String(sval=rename.schema), ast.String(sval=rename.name))
        elif isinstance(statement, ast.IndexStmt) and rename is not None:
            statement.idxname = rename.name
        elif isinstance(statement, ast.ViewStmt) and rename is not None:
            statement.view = ast.RangeVar(schemaname=rename.schema, relname=rename.name, inh=True,
                                          relpersistence="p")
    return str(RawStream()(tree))


def _rewrite_sql_body(statement: ast.CreateFunctionStmt, mapping: Mapping) -> None:
    """`AS $$ ... $$` of a LANGUAGE sql function: PostgreSQL checks it at creation, so rewrite it too."""
    options = list(statement.options or ())
    language = next((str(o.arg.sval) for o in options if o.defname == "language"
                     and isinstance(o.arg, ast.String)), "")
    if language.lower() != "sql":
        return
    for i, option in enumerate(options):
        if option.defname != "as" or not option.arg:
            continue
        parts = list(option.arg)
        if len(parts) != 1 or not isinstance(parts[0], ast.String):
            continue
        try:
            body = retarget(str(parts[0].sval), mapping)
        except Exception:   # a body pglast cannot parse is left as it is: PostgreSQL judges it
            continue
        options[i] = ast.DefElem(defname="as", arg=(ast.String(sval=body),), defaction=option.defaction)
    statement.options = tuple(options)


def on_relation(sql: str, table: QualifiedName) -> str:
    """A CREATE TRIGGER (or CREATE INDEX) statement moved onto `table`."""
    tree = parse_sql(sql)
    statement: Any = tree[0].stmt
    relation = getattr(statement, "relation", None)
    if isinstance(relation, ast.RangeVar):
        statement.relation = ast.RangeVar(schemaname=table.schema, relname=table.name, inh=relation.inh,
                                          relpersistence=relation.relpersistence, alias=relation.alias)
    return str(RawStream()(tree))


def index_statement(name: str, table: QualifiedName, definition: str, unique: bool) -> str:
    """CREATE INDEX `name` ON `table` <definition>, built through the parser so names are quoted."""
    text = f"CREATE {'UNIQUE ' if unique else ''}INDEX bgsync_placeholder ON bgsync_placeholder {definition}"
    tree = parse_sql(text)
    statement = tree[0].stmt
    assert isinstance(statement, ast.IndexStmt)
    statement.idxname = name
    statement.relation = ast.RangeVar(schemaname=table.schema, relname=table.name, inh=True, relpersistence="p")
    return str(RawStream()(tree))
