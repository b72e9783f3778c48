"""Connections: where the DSN comes from, and keeping its password out of every output."""

from __future__ import annotations

import os
import re

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from orchestrator.errors import DatabaseError

_secrets: set[str] = set()


def resolve_dsn(cli_dsn: str | None) -> str:
    """--dsn, else BGSYNC_DSN, else DATABASE_URL, else libpq's PG* variables (empty DSN)."""
    for candidate in (cli_dsn, os.environ.get("BGSYNC_DSN"), os.environ.get("DATABASE_URL")):
        if candidate:
            remember_secret(candidate)
            return candidate
    if os.environ.get("PGPASSWORD"):
        _secrets.add(os.environ["PGPASSWORD"])
    return ""


def remember_secret(dsn: str) -> None:
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        password = None
    if password:
        _secrets.add(str(password))


def redact(text: str) -> str:
    """Replace any known password, and any `password=`/URI password, with ***."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.I)
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def redacted_dsn(dsn: str) -> str:
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    if "password" in params:
        params["password"] = "***"
    return make_conninfo(**{k: str(v) for k, v in params.items()})


DEFAULT_LOCK_TIMEOUT = "10s"


def connect(dsn: str, purpose: str, *, autocommit: bool = False,
            lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> psycopg.Connection[tuple[object, ...]]:
    """Open a connection tagged with application_name (so holders can be named in refusals) whose
    every statement, even a catalog read, waits at most `lock_timeout` for a lock."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name=f"bgsync {purpose}"[:63])
    except psycopg.OperationalError as error:
        raise DatabaseError(f"cannot connect: {redact(str(error)).strip()}") from None
    conn.execute("SELECT set_config('lock_timeout', %s, false)", [lock_timeout])
    if not autocommit:
        conn.commit()
    return conn
