"""Jinja2 SQL templates with StrictUndefined; identifiers only through psycopg.sql quoting."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from psycopg import sql

import sql_templates
from orchestrator.names import QualifiedName

TEMPLATE_DIR = Path(sql_templates.__file__).parent
STEP_MARK = "-- step:"


def _ident(value: str | QualifiedName | tuple[str, ...] | list[str]) -> str:
    """Quote a name (or a qualified name) through psycopg.sql.Identifier."""
    if isinstance(value, QualifiedName):
        return value.ident().as_string(None)
    if isinstance(value, (tuple, list)):
        return sql.Identifier(*value).as_string(None)
    return sql.Identifier(value).as_string(None)


def _idents(values: list[str], prefix: str = "") -> str:
    """Comma list of quoted names, optionally qualified by an alias (`o.` for o."id")."""
    return ", ".join(prefix + _ident(v) for v in values)


def _collated(values: list[str], collations: list[str | None], prefix: str = "") -> str:
    """Key columns for a range or an ORDER BY, each with blue's collation spelled out, so both tables
    are cut and sorted in one order whatever collation green's column has."""
    return ", ".join(prefix + _ident(v) + (f" COLLATE {c}" if c else "")
                     for v, c in zip(values, collations, strict=True))


def _pct(expression: str) -> str:
    """Escape `%` in SQL text that runs with bound parameters (psycopg reads `%` as a placeholder)."""
    return expression.replace("%", "%%")


def as_server_text(query: str) -> str:
    """A parameterized query as the server receives it: `%s` -> `$n`, `%%` -> `%`."""
    counter = iter(range(1, 10_000))
    return re.sub(r"%%|%s", lambda m: "%" if m.group(0) == "%%" else f"${next(counter)}", query)


def _dollar_quote(body: str) -> str:
    """Wrap a function body in a dollar quote whose tag the body does not contain, so no name or
    expression inside it can ever end the quote."""
    tag, n = "$bgsync$", 0
    while tag in body:
        n += 1
        tag = f"$bgsync{n}$"
    return f"{tag}\n{body.strip(chr(10))}\n{tag}"


def _literal(value: Any) -> str:
    return sql.Literal(value).as_string(None)


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["ident"] = _ident
    env.filters["idents"] = _idents
    env.filters["literal"] = _literal
    env.filters["pct"] = _pct
    env.filters["collated"] = _collated
    env.filters["dollar_quote"] = _dollar_quote
    return env


def render(template: str, **context: Any) -> str:
    return environment().get_template(template).render(**context)


def render_steps(template: str, **context: Any) -> list[tuple[str, str]]:
    """Render a template whose statements are each introduced by `-- step: <what>`."""
    steps: list[tuple[str, str]] = []
    description: str | None = None
    lines: list[str] = []
    for line in render(template, **context).splitlines():
        if line.startswith(STEP_MARK):
            if description is not None:
                steps.append((description, _clean(lines)))
            description, lines = line[len(STEP_MARK):].strip(), []
        elif description is not None:
            lines.append(line)
    if description is not None:
        steps.append((description, _clean(lines)))
    return [s for s in steps if s[1]]


def _clean(lines: list[str]) -> str:
    text = "\n".join(line.rstrip() for line in lines).strip()
    return text.removesuffix(";").rstrip()
