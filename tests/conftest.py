from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fix_db import fresh_database, server_dsn


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    with server_dsn() as dsn:
        yield dsn


@pytest.fixture
def dsn(admin_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    with fresh_database(admin_dsn) as url:
        yield url
