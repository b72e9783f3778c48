"""What operates a running backfill from outside: pause/resume, the holds (pause, replica lag, a DBA's
throttle query), the heartbeat `status` reads, and the Prometheus metrics.

The backfill's coordinator (its main thread) evaluates the holds every quarter second and the workers wait
while one is on; a worker also reads the pause flag last in each batch's transaction and rolls the batch
back when it is set, so no batch commits after a pause has committed, whichever process runs it.

Replica lag: for each walsender of `pg_stat_replication` the lag is the greater of its `replay_lag` and
the time since the primary's WAL position (sampled by the coordinator) first passed the standby's
`replay_lsn`: `replay_lag` alone stops growing while replay is stuck (it is measured when replay
progresses). A standby seen once and gone (disconnected), or whose replay position cannot be read (no
pg_read_all_stats; a WAL receiver that replays nothing, such as pg_receivewal), holds the backfill (fail
closed) until it is back; a DBA who removed it for good restarts the backfill. Base backups' senders are
not standbys and are ignored.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator import log
from orchestrator.errors import UsageError
from orchestrator.executor import Executor, Statement
from orchestrator.plan import duration_seconds
from orchestrator.render import render, render_steps
from orchestrator.spec import MigrationSpec

Conn = psycopg.Connection[Any]
THROTTLE_SQL_TIMEOUT = "5s"


def _statement(template: str, params: list[Any] | None = None, **context: Any) -> Statement:
    [(description, text)] = render_steps(template, **context)
    return Statement(description, text, params)


def pause_statement(spec_schema: str, name: str, pause: bool) -> Statement:
    return _statement("migration_pause.sql.j2", schema=spec_schema, name=name, pause=pause)


def journal_event(conn: Conn, spec: MigrationSpec, step: str, outcome: str, detail: str) -> None:
    conn.execute(render("journal_event.sql.j2", schema=spec.state_schema),
                 [spec.name, "backfill", step, None, None, outcome, detail])


# -- replica lag ----------------------------------------------------------------------------------
@dataclass
class ReplicaLag:
    limit: float                                    # seconds
    statement: Statement
    seen: set[str] = field(default_factory=set)     # standbys followed since the start (fail closed when gone)
    history: deque[tuple[float, float]] = field(default_factory=deque)   # (monotonic time, primary WAL position)

    def check(self, conn: Conn, executor: Executor) -> str | None:
        [(current, standbys)] = executor.execute(conn, self.statement)
        conn.commit()
        now = time.monotonic()
        self.history.append((now, float(current)))
        while len(self.history) > 2 and self.history[1][0] < now - max(60.0, 4 * self.limit):
            self.history.popleft()
        reasons: list[str] = []
        present: set[str] = set()
        for standby in standbys if isinstance(standbys, list) else json.loads(standbys):
            if standby.get("state") == "backup":
                continue           # a base backup's sender, not a standby
            name = str(standby["name"])
            present.add(name)
            self.seen.add(name)
            replay = standby.get("replay")
            if replay is None or standby.get("state") not in ("streaming", "catchup", "startup", "backup"):
                reasons.append(f"standby {name}: lag unknown (state {standby.get('state')}, replay position "
                               f"{'unreadable: grant pg_read_all_stats' if replay is None else replay})")
                continue
            lag = float(standby.get("replay_lag") or 0.0)
            if float(replay) < float(current):
                passed = next((t for t, lsn in self.history if lsn > float(replay)), now)
                lag = max(lag, now - passed)
            if lag > self.limit:
                reasons.append(f"standby {name} lags {lag:.1f}s > {self.limit:g}s")
        for name in sorted(self.seen - present):
            reasons.append(f"standby {name} disconnected: its lag is unknown (fail closed; restart the backfill to "
                           f"stop following it)")
        return "replica lag: " + "; ".join(reasons) if reasons else None


# -- throttle-sql ---------------------------------------------------------------------------------
@dataclass
class ThrottleSql:
    query: str

    def run(self, conn: Conn) -> bool:
        with conn.transaction():
            conn.execute("SELECT set_config('statement_timeout', %s, true)", [THROTTLE_SQL_TIMEOUT])
            row = conn.execute(self.query).fetchone()   # the DBA's own SQL, used as SQL (like the plan's expressions)
        if row is None or len(row) != 1 or not isinstance(row[0], bool):
            raise ValueError(f"it must return one row with one boolean column, returned {row!r}")
        return bool(row[0])

    def validate(self, conn: Conn) -> None:
        try:
            self.run(conn)
        except (psycopg.Error, ValueError) as error:
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            message = error.diag.message_primary if isinstance(error, psycopg.Error) else str(error)
            raise UsageError(f"--throttle-sql: {message}") from None
        conn.commit()

    def check(self, conn: Conn) -> str | None:
        try:
            holds = self.run(conn)
        except (psycopg.Error, ValueError) as error:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            message = error.diag.message_primary if isinstance(error, psycopg.Error) else str(error)
            return f"throttle-sql failed (held until it answers false): {message}"
        conn.commit()
        return "throttle-sql returned true" if holds else None


# -- metrics --------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of this backfill process on --metrics-port (text format at /metrics)."""

    def __init__(self, port: int, migration: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        labels = ["migration"]
        self.rows = Counter("bgsync_backfill_rows_copied", "Rows this process copied into green", labels,
                            registry=self.registry).labels(migration)
        self.rows_total = Gauge("bgsync_backfill_rows_in_journal", "Rows copied by every run so far (journal)",
                                labels, registry=self.registry).labels(migration)
        self.rate = Gauge("bgsync_backfill_rows_per_second", "Rows per second this process copies", labels,
                          registry=self.registry).labels(migration)
        self.eta = Gauge("bgsync_backfill_eta_seconds", "Estimated seconds left (NaN while held or unknown)", labels,
                         registry=self.registry).labels(migration)
        self.held = Gauge("bgsync_backfill_held", "1 while a hold (pause, replica lag, throttle-sql) holds the "
                          "workers", labels, registry=self.registry).labels(migration)
        self.held_seconds = Counter("bgsync_backfill_held_seconds", "Seconds the workers were held", labels,
                                    registry=self.registry).labels(migration)
        self.batch = Histogram("bgsync_backfill_batch_seconds", "Time of one batch's copy", labels,
                               registry=self.registry).labels(migration)
        try:
            self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        except OSError as error:
            raise UsageError(f"--metrics-port: cannot listen on 127.0.0.1:{port}: {error.strerror}") from None
        log.info(f"metrics on http://127.0.0.1:{port}/metrics")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the holds ------------------------------------------------------------------------------------
@dataclass
class Holds:
    """Everything that holds this process's workers, the heartbeat, and the time spent held."""

    spec: MigrationSpec
    replica: ReplicaLag | None = None
    throttle: ThrottleSql | None = None
    reason: str | None = None            # read by the workers: while set they start no batch
    held_seconds: float = 0.0
    run_id: int | None = None
    _since: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def statement(self, action: str, params: list[Any]) -> Statement:
        return _statement("backfill_run.sql.j2", params, spec=self.spec, action=action)

    def start(self, conn: Conn, executor: Executor) -> None:
        client = f"{socket.gethostname()} pid {os.getpid()}"
        [(self.run_id,)] = executor.execute(conn, self.statement("start", [client]))
        conn.commit()

    def held_now(self) -> float:
        with self._lock:
            return self.held_seconds + (time.monotonic() - self._since if self.reason else 0.0)

    def tick(self, conn: Conn, executor: Executor, rows: int) -> str | None:
        """Heartbeat, then every hold in turn; journal each change of what holds the workers."""
        rows_paused = executor.execute(conn, self.statement(
            "heartbeat", [self.reason, round(self.held_now(), 3), rows, self.run_id]))
        conn.commit()
        reason = "paused (bgsync pause)" if rows_paused and rows_paused[0][0] else None
        if reason is None and self.replica is not None:
            reason = self.replica.check(conn, executor)
        if reason is None and self.throttle is not None:
            reason = self.throttle.check(conn)
        self._change(conn, reason)
        return reason

    def _change(self, conn: Conn, reason: str | None) -> None:
        if reason == self.reason:
            return
        now = time.monotonic()
        with self._lock:
            was, since = self.reason, self._since
            if was is not None:
                self.held_seconds += now - since
            self.reason, self._since = reason, now
        if reason is not None:
            log.warn(f"backfill {self.spec.name}: holding: {reason}")
            journal_event(conn, self.spec, "hold", "held", reason)
        else:
            log.info(f"backfill {self.spec.name}: going on after {now - since:.1f}s held ({was})")
            journal_event(conn, self.spec, "hold ended", "resumed", f"held {now - since:.3f}s: {was}")
        conn.commit()

    def end(self, conn: Conn, executor: Executor, rows: int) -> None:
        if self.run_id is None or conn.closed:
            return
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            self._change(conn, None)
            executor.execute(conn, self.statement("end", [round(self.held_seconds, 3), rows, self.run_id]))
            conn.commit()
        except psycopg.Error:
            pass


def replica_lag(spec: MigrationSpec, limit: str | None) -> ReplicaLag | None:
    if limit is None:
        return None
    return ReplicaLag(duration_seconds(limit), _statement("backfill_replicas.sql.j2", spec=spec))
