"""Connections: where the DSN comes from, and keeping its password out of every output."""

from __future__ import annotations

import json
import os
import re
import threading
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from orchestrator.errors import DatabaseError, UsageError

_secrets: set[str] = set()


# libpq's words for a connection string it cannot use, before it tries any server
_BAD_OPTION = re.compile(r"invalid [^\n]* value|invalid integer value|invalid port number|invalid connection option"
                         r"|could not match \d+ host names|missing \"=\" after|unterminated quoted string"
                         r"|invalid URI|end of string reached|invalid percent-encoded token", re.I)


def resolve_dsn(cli_dsn: str | None) -> str:
    """--dsn, else BGSYNC_DSN, else DATABASE_URL, else libpq's PG* variables (empty DSN).

    A connection string libpq cannot parse is a usage error (exit 2) whose message never repeats
    the string: libpq's own message quotes it, password included."""
    if os.environ.get("PGPASSWORD"):
        _secrets.add(os.environ["PGPASSWORD"])
    for source, candidate in (("--dsn", cli_dsn), ("BGSYNC_DSN", os.environ.get("BGSYNC_DSN")),
                              ("DATABASE_URL", os.environ.get("DATABASE_URL"))):
        if candidate:
            remember_secret(candidate)
            try:
                conninfo_to_dict(candidate)
            except psycopg.ProgrammingError as error:
                raise UsageError(f"the DSN from {source} is malformed ({_reason(str(error))}); "
                                 f"write it as postgresql://user@host:port/dbname or 'host=... dbname=...'") from None
            return candidate
    return ""


def _reason(message: str) -> str:
    """libpq's complaint without the quoted connection string it carries."""
    text = redact(message.strip().splitlines()[0] if message.strip() else "unparsable")
    return re.sub(r'"[^"]*"', '"…"', text)


def remember_secret(dsn: str) -> None:
    """Remember the password of a DSN, also of one libpq cannot parse, so no output can show it."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        password = None
    if password:
        _remember(str(password))
    for pattern in (r"^[A-Za-z][A-Za-z0-9+.-]*:/*[^:/@\s]*:([^@\s]+)@", r"password\s*=\s*'((?:[^'\\]|\\.)*)'",
                    r"password\s*=\s*([^\s']+)"):
        for found in re.findall(pattern, dsn, flags=re.I):
            if found:
                _remember(found)


def _remember(password: str) -> None:
    """The password as it may be written: raw, percent-encoded, quoted for key=value, escaped by Python or JSON."""
    _secrets.update({password, quote(password, safe=""), quote(password),
                     password.replace("\\", "\\\\").replace("'", "\\'"), repr(password)[1:-1],
                     json.dumps(password)[1:-1]})


def remember_arguments(arguments: list[str]) -> None:
    """Remember the password of every command-line argument that looks like a DSN (one typed where a
    plan or a table belongs is echoed by the error that says so)."""
    for argument in arguments:
        if re.match(r"postgres(?:ql)?:", argument, flags=re.I) or re.search(r"password\s*=", argument, flags=re.I):
            remember_secret(argument)


def redact(text: str) -> str:
    """Replace any known password, and any `password=`/URI password, with ***."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.I)
    return re.sub(r"(postgres(?:ql)?:/+[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


# lock_timeout of the sessions no plan value governs (backfill, verify, status, init): 10s, or
# BGSYNC_LOCK_TIMEOUT (a PostgreSQL duration with its unit; the tests shorten it)
LOCK_TIMEOUT_VARIABLE = "BGSYNC_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = os.environ.get(LOCK_TIMEOUT_VARIABLE, "").strip() or "10s"
_main_lock_timeout = DEFAULT_LOCK_TIMEOUT


def _checked_lock_timeout(value: str) -> str:
    if value == DEFAULT_LOCK_TIMEOUT and os.environ.get(LOCK_TIMEOUT_VARIABLE, "").strip():
        from orchestrator.plan import parse_duration

        try:
            parse_duration(value)
        except ValueError as error:
            raise UsageError(f"{LOCK_TIMEOUT_VARIABLE}: {error}") from None
    return value


def lock_timeout_hint(error: BaseException, lock_timeout: str | None = None) -> str:
    """What a lock timeout means, to append to its message ('' for any other error)."""
    if not isinstance(error, psycopg.errors.LockNotAvailable):
        return ""
    return (f" (another session held a lock bgsync needed for longer than lock_timeout "
            f"{lock_timeout or _main_lock_timeout})")


def connect(dsn: str, purpose: str, *, autocommit: bool = False,
            lock_timeout: str = DEFAULT_LOCK_TIMEOUT) -> psycopg.Connection[tuple[object, ...]]:
    """Open a connection tagged with application_name (so holders can be named in refusals) whose
    every statement, even a catalog read, waits at most `lock_timeout` for a lock."""
    global _main_lock_timeout
    lock_timeout = _checked_lock_timeout(lock_timeout)
    if threading.current_thread() is threading.main_thread():
        _main_lock_timeout = lock_timeout
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, application_name=f"bgsync {purpose}"[:63])
    except psycopg.OperationalError as error:
        message = redact(str(error)).strip()
        if _BAD_OPTION.search(message):
            raise UsageError(f"the DSN is not usable: {_reason(message)}") from None
        raise DatabaseError(f"cannot connect: {message}") from None
    conn.execute("SELECT set_config('lock_timeout', %s, false)", [lock_timeout])
    if not autocommit:
        conn.commit()
    return conn
