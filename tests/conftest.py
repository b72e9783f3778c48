from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from tests.fix_db import Restart, fresh_database, server_dsn


@pytest.fixture(scope="session")
def server() -> Iterator[tuple[str, Restart]]:
    with server_dsn() as found:
        yield found


@pytest.fixture(scope="session")
def admin_dsn(server: tuple[str, Restart]) -> str:
    return server[0]


@pytest.fixture
def dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    with fresh_database(admin_dsn) as url:
        yield url


@pytest.fixture
def restart_server(server: tuple[str, Restart]) -> Callable[[], None]:
    """Restart the test server (fast shutdown) and wait until it answers again."""
    dsn, restart = server
    if restart is None:
        pytest.skip("no way to restart this server: set BGSYNC_TEST_RESTART to a command that does")

    def run() -> None:
        assert restart is not None
        restart()
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    return run
