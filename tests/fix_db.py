"""The test database server: BGSYNC_TEST_DSN, else testcontainers when Docker answers, else an
embedded PostgreSQL 18 started once per session. Each test gets a fresh database on it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


Restart = Callable[[], None] | None


@contextlib.contextmanager
def server_dsn() -> Iterator[tuple[str, Restart]]:
    """Yield a superuser DSN of a server the tests may create databases on, and a way to restart
    it (fast shutdown) when there is one: the embedded server's pg_ctl, or BGSYNC_TEST_RESTART."""
    explicit = os.environ.get("BGSYNC_TEST_DSN")
    if explicit:
        command = os.environ.get("BGSYNC_TEST_RESTART")
        yield explicit, (None if not command else lambda: subprocess.run(command, shell=True, check=True,
                                                                          timeout=120))
        return
    if _docker_answers():
        try:
            from testcontainers.postgres import PostgresContainer
        except ImportError:
            pass
        else:
            with PostgresContainer("postgres:18", driver=None) as container:
                yield container.get_connection_url(), None
            return
    from orchestrator.embedded import FAST_SETTINGS, embedded_server

    with embedded_server(settings=FAST_SETTINGS) as server:  # tests need speed, not durability
        yield server.dsn, server.restart


@contextlib.contextmanager
def fresh_database(admin_dsn: str) -> Iterator[str]:
    from orchestrator.embedded import create_database, drop_database

    name = f"bgsync_test_{uuid.uuid4().hex[:12]}"
    try:
        yield create_database(admin_dsn, name)
    finally:
        drop_database(admin_dsn, name)
