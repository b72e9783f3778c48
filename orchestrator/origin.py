"""Where bgsync is connected: which server and database, and where the connection string came from.

Messages about missing objects or a failed connection name both, so that a DBA who forgot to set a
DSN sees at once that bgsync looked in libpq's default database rather than in the intended one.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]

_source = "libpq defaults"


def dsn_source(cli_dsn: str | None) -> str:
    """Which setting gave the connection string, in the order `db.resolve_dsn` reads them."""
    if cli_dsn:
        return "--dsn"
    for variable in ("BGSYNC_DSN", "DATABASE_URL"):
        if os.environ.get(variable):
            return variable
    used = sorted(v for v in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")
                  if os.environ.get(v))
    if used:
        return f"libpq defaults and {', '.join(used)}; no --dsn, BGSYNC_DSN or DATABASE_URL is set"
    return "libpq defaults; no --dsn, BGSYNC_DSN, DATABASE_URL or PG* variable is set"


def remember(cli_dsn: str | None) -> str:
    """Note where this process's connection string comes from; returns the description."""
    global _source
    _source = dsn_source(cli_dsn)
    return _source


def source() -> str:
    return _source


def server(conn: Conn) -> str:
    """`database shop on db.example.com:5432` (a Unix socket shows as its directory)."""
    info = conn.info
    return f"database {info.dbname} on {info.host}:{info.port}"


def describe(conn: Conn) -> str:
    """The server and database, and where the connection came from."""
    return f"{server(conn)} (connection from {_source})"
