"""Questions about the plan's SQL expressions, answered by PostgreSQL's own parser (pglast).

Plan expressions are SQL written by the plan's author; bgsync needs to know two things about them
without guessing with regular expressions: which columns an expression reads, and whether it is
nothing but a column (or a cast of one), in which case its inverse is known.
"""

from __future__ import annotations

from functools import cache

from pglast import ast, parse_sql
from pglast.parser import ParseError
from pglast.visitors import Visitor


@cache
def _expression(text: str) -> ast.Node | None:
    """The parse tree of `SELECT <text>`, or None when it is not exactly one expression."""
    try:
        statements = parse_sql(f"SELECT {text}")
    except ParseError:
        return None
    if not statements or len(statements) != 1:
        return None
    select = statements[0].stmt
    if not isinstance(select, ast.SelectStmt) or select.fromClause or select.whereClause is not None:
        return None
    targets = select.targetList or ()
    if len(targets) != 1 or not isinstance(targets[0], ast.ResTarget) or targets[0].name is not None:
        return None
    value: ast.Node | None = targets[0].val
    return value


def _column_name(node: ast.Node) -> str | None:
    if not isinstance(node, ast.ColumnRef) or not node.fields:
        return None
    last = node.fields[-1]
    return str(last.sval) if isinstance(last, ast.String) else None


class _Columns(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_ColumnRef(self, ancestors: object, node: ast.ColumnRef) -> None:
        name = _column_name(node)
        if name is not None:
            self.names.add(name)


def column_refs(text: str) -> set[str]:
    """Every column name the expression reads (the last part of each reference)."""
    tree = _expression(text)
    if tree is None:
        return set()
    visitor = _Columns()
    visitor(tree)
    return visitor.names


def bare_column(text: str) -> str | None:
    """The column when the expression is exactly one column reference (`amount`, `"Amount"`)."""
    tree = _expression(text)
    return None if tree is None else _column_name(tree)


def cast_column(text: str) -> str | None:
    """The column when the expression is a column or a cast (or casts) of one: `col::t`,
    `CAST(col AS t)`, `(col)::t1::t2`. Its inverse is the green value cast back."""
    tree = _expression(text)
    while isinstance(tree, ast.TypeCast):
        tree = tree.arg
    return None if tree is None else _column_name(tree)


def is_null(text: str) -> bool:
    """`NULL` (the explicit way to say a blue column receives NULL after cutover)."""
    tree = _expression(text)
    return isinstance(tree, ast.A_Const) and bool(tree.isnull)


def output_names(query: str) -> set[str]:
    """The column names a SELECT gives its rows; with a `*` in the list, every name counts as kept."""
    try:
        statements = parse_sql(query)
    except ParseError:
        return set()
    select = statements[0].stmt if statements else None
    if not isinstance(select, ast.SelectStmt):
        return set()
    names: set[str] = set()
    for target in select.targetList or ():
        if not isinstance(target, ast.ResTarget):
            continue
        if target.name:
            names.add(str(target.name))
            continue
        value = target.val
        if isinstance(value, ast.ColumnRef) and value.fields and isinstance(value.fields[-1], ast.A_Star):
            return _Everything()
        name = _column_name(value) if value is not None else None
        if name:
            names.add(name)
    return names


class _Everything(set[str]):
    def __contains__(self, item: object) -> bool:
        return True
