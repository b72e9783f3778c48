"""SQL names as PostgreSQL reads them: parsing `schema.table` the way regclass does."""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

NAMEDATALEN_BYTES = 63

_UNQUOTED = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_PLAIN = re.compile(r"[a-z_][a-z0-9_]*")
_QUOTED = re.compile(r'"((?:[^"]|"")+)"')


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified relation name, both parts taken literally."""

    schema: str
    name: str

    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    def __str__(self) -> str:
        return quote_qualified(self.schema, self.name)

    def display(self) -> str:
        """For people: quotes only where a part needs them (SQL always uses ident())."""
        return ".".join(p if _PLAIN.fullmatch(p) else quote_ident(p) for p in (self.schema, self.name))


def quote_ident(name: str) -> str:
    """Quote one identifier exactly as psycopg.sql.Identifier does."""
    return sql.Identifier(name).as_string(None)


def quote_qualified(*parts: str) -> str:
    return sql.Identifier(*parts).as_string(None)


def check_name_length(name: str) -> str | None:
    """PostgreSQL silently truncates long names; bgsync refuses them instead."""
    if not name:
        return "must not be empty"
    if "\x00" in name:
        return "must not contain a NUL character"
    if len(name.encode()) > NAMEDATALEN_BYTES:
        return f"is longer than {NAMEDATALEN_BYTES} bytes"
    return None


def parse_qualified_name(text: str) -> tuple[str | None, str]:
    """Split `schema.table` (with SQL quoting rules) into its parts, or raise ValueError.

    Unquoted parts fold to lower case (ASCII only, as PostgreSQL does for UTF-8);
    quoted parts are taken literally with `""` standing for one quote.
    """
    parts: list[str] = []
    pos = 0
    while True:
        quoted = _QUOTED.match(text, pos)
        if quoted:
            part = quoted.group(1).replace('""', '"')
            pos = quoted.end()
        else:
            bare = _UNQUOTED.match(text, pos)
            if not bare:
                raise ValueError(f"not a valid SQL name at position {pos + 1}: {text!r}")
            part = bare.group(0).translate(_ASCII_LOWER)
            pos = bare.end()
        problem = check_name_length(part)
        if problem:
            raise ValueError(f"name part {part!r} {problem}")
        parts.append(part)
        if pos == len(text):
            break
        if text[pos] != "." or len(parts) == 2:
            raise ValueError(f"not a valid SQL name at position {pos + 1}: {text!r}")
        pos += 1
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def bare_column(expression: str) -> str | None:
    """The column an expression names when it is nothing but one column reference."""
    text = expression.strip()
    quoted = _QUOTED.fullmatch(text)
    if quoted:
        return quoted.group(1).replace('""', '"')
    if _UNQUOTED.fullmatch(text) and text.lower() not in _NOT_COLUMNS:
        return text.translate(_ASCII_LOWER)
    return None


# Bare words that are values or keywords rather than column references.
_NOT_COLUMNS = frozenset({"null", "true", "false", "default", "current_date", "current_time",
                          "current_timestamp", "localtime", "localtimestamp", "current_user",
                          "session_user", "user", "current_role", "current_schema", "current_catalog"})
