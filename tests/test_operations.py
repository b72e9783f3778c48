"""Issue 12: operations at production scale. Balanced partitions and row-sized batches on skewed keys;
pause/resume across processes; the global rate limit; --throttle-sql; --metrics-port; cutover
--cancel-blockers. Every claim is read from the journal (events, runs) or from the server, not timed."""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import bgsync, scalar, scalars, spawn_bgsync, wait_for

ITEMS_PLAN = {
    "name": "items_v2", "source": "public.items",
    "columns": [{"name": "id", "type": "bigint", "not_null": True},
                {"name": "v", "type": "integer", "not_null": True},
                {"name": "note", "type": "text"}],
}


def items(dsn: str, tmp_path: Path, dense: int, sparse: int = 0, **backfill: Any) -> Path:
    """public.items: keys 1..dense, then `sparse` keys spread up to 10^12 (built server-side)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.items (id bigint PRIMARY KEY, v integer NOT NULL, note text)")
        conn.execute("INSERT INTO public.items SELECT g, g %% 97, NULL FROM generate_series(1, %s) AS g", [dense])
        if sparse:
            conn.execute("INSERT INTO public.items SELECT %s + g * (1000000000000 / %s), g, 'sparse'"
                         "  FROM generate_series(1, %s) AS g", [dense, sparse, sparse])
        conn.execute("ANALYZE public.items")
    plan = {**ITEMS_PLAN, "backfill": {"workers": 4, "batch_rows": 10000, **backfill}}
    path = tmp_path / "items.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def batches(dsn: str) -> list[tuple[datetime, dict[str, Any], int]]:
    """Every committed batch: (when, its detail, the coordinator-independent backend pid)."""
    with psycopg.connect(dsn) as conn:
        return [(at, json.loads(detail), pid) for at, detail, pid in conn.execute(
            "SELECT at, detail, backend_pid FROM bgsync.events WHERE phase = 'backfill' AND outcome = 'ok'"
            " AND detail LIKE '{%%' AND detail::jsonb ? 'chunk' ORDER BY at")]


def status_json(dsn: str) -> dict[str, Any]:
    result = bgsync(dsn, "status", "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)["migrations"][0]["backfill"]  # type: ignore[no-any-return]


def test_skewed_keys_make_no_giant_batch_and_every_worker_copies(dsn: str, tmp_path: Path) -> None:
    """A dense block 1..1,000,000 plus 2,000 sparse ids up to 10^12: equal key spans would put the whole
    dense block in one batch; partitions by sampled rows and batches by LIMIT keep every batch near its
    target and give every worker work."""
    plan = items(dsn, tmp_path, dense=1_000_000, sparse=2_000)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    result = bgsync(dsn, "backfill", str(plan), "--workers", "4", "--batch-rows", "10000")
    assert result.code == 0, result.err
    assert scalar(dsn, "SELECT count(*) FROM public.items_v2") == 1_002_000
    done = batches(dsn)
    sizes = [d["rows"] for _, d, _ in done]
    assert sum(sizes) == 1_002_000
    assert max(sizes) <= 2 * 10000, f"largest batch {max(sizes)} rows, target 10000"
    assert all(d["rows"] <= d["target"] for _, d, _ in done)
    per_worker = {w: sum(d["rows"] for _, d, _ in done if d["worker"] == w) for w in range(4)}
    assert all(rows > 0 for rows in per_worker.values()), per_worker
    # balanced by rows: no worker copied more than half of the table
    assert max(per_worker.values()) < 1_002_000 / 2, per_worker
    print(f"skew: {len(sizes)} batches, max {max(sizes)} rows (target 10000), per worker {per_worker}")


def run_rows(dsn: str) -> dict[int, int]:
    """Rows copied so far by each live backfill process, from its heartbeat."""
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT id, rows_copied FROM bgsync.runs WHERE ended_at IS NULL").fetchall())


def test_pause_holds_every_worker_of_two_processes_and_resume_goes_on(dsn: str, tmp_path: Path) -> None:
    plan = items(dsn, tmp_path, dense=400_000)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    args = ("backfill", str(plan), "--workers", "2", "--batch-rows", "2000", "--max-rows-per-second", "20000")
    procs = [spawn_bgsync(dsn, *args), spawn_bgsync(dsn, *args)]
    try:
        wait_for(lambda: len({pid for _, _, pid in batches(dsn)}) >= 2 and status_json(dsn)["processes"] == 2)
        running = status_json(dsn)
        assert running["state"] == "running" and running["heartbeat_age_seconds"] is not None
        assert running["rows_per_second"] is not None

        paused = bgsync(dsn, "pause", str(plan))
        assert paused.code == 0, paused.err
        assert "2 backfill processes holding (2 confirmed)" in paused.err, paused.err
        paused_at = scalar(dsn, "SELECT paused_at FROM bgsync.migrations")
        assert isinstance(paused_at, datetime)
        time.sleep(3)
        after = [at for at, _, _ in batches(dsn) if at > paused_at]
        latest = max(after, default=paused_at)
        assert latest <= paused_at + timedelta(seconds=1), f"a batch committed {latest - paused_at} after pause"
        state = status_json(dsn)
        assert state["state"] == "paused" and state["processes"] == 2
        assert state["rows_per_second"] is None and state["eta_seconds"] is None
        text = bgsync(dsn, "status", str(plan)).out
        assert "paused (2 backfill processes" in text, text
        held = scalar(dsn, "SELECT count(DISTINCT backend_pid) FROM bgsync.events WHERE outcome = 'held'"
                           " AND detail LIKE 'paused%%'")
        assert held == 2, "each process journals its hold"
        print(f"pause: last batch {(latest - paused_at).total_seconds():.3f}s after the pause")

        copied = run_rows(dsn)
        assert len(copied) == 2
        assert bgsync(dsn, "resume", str(plan)).code == 0
        wait_for(lambda: all(now > copied[run] for run, now in run_rows(dsn).items()), timeout=30)
        assert status_json(dsn)["state"] == "running"

        # Ctrl-C ends one, kill -9 the other: nobody copies any more, and status says so
        procs[0].send_signal(signal.SIGINT)
        procs[1].send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait(timeout=60)
        wait_for(lambda: status_json(dsn)["processes"] == 0, timeout=30)
        gone = status_json(dsn)
        assert gone["state"] == "interrupted", gone
        assert gone["rows_per_second"] is None and gone["eta_seconds"] is None
        text = bgsync(dsn, "status", str(plan)).out
        assert "interrupted" in text and "rows/s" not in text and "ETA" not in text, text
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def max_window_rate(events: list[tuple[datetime, dict[str, Any], int]], window: float = 5.0,
                    skip: float = 1.0) -> float:
    """The most rows copied in any `window`-second window starting `skip` seconds after the first batch."""
    start = events[0][0] + timedelta(seconds=skip)
    times = [(at, d["rows"]) for at, d, _ in events if at >= start]
    best = 0
    for i, (at, _) in enumerate(times):
        end = at + timedelta(seconds=window)
        best = max(best, sum(rows for when, rows in times[i:] if when < end))
    return best / window


def test_two_processes_share_one_global_rate_limit(dsn: str, tmp_path: Path) -> None:
    rate = 8000
    plan = items(dsn, tmp_path, dense=80_000)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    args = ("backfill", str(plan), "--workers", "2", "--max-rows-per-second", str(rate))
    procs = [spawn_bgsync(dsn, *args), spawn_bgsync(dsn, *args)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    events = batches(dsn)
    assert sum(d["rows"] for _, d, _ in events) == 80_000
    per_run = [int(r) for r in scalars(dsn, "SELECT rows_copied FROM bgsync.runs")]
    assert len(per_run) == 2 and all(rows > 0 for rows in per_run), f"both processes copied: {per_run}"
    assert (events[-1][0] - events[0][0]).total_seconds() > 6
    best = max_window_rate(events)
    assert best <= 1.1 * rate, f"{best:,.0f} rows/s over 5 s with a global limit of {rate:,}"
    print(f"rate: max 5-s window {best:,.0f} rows/s, limit {rate:,}")


def test_throttle_sql_holds_while_true(dsn: str, tmp_path: Path) -> None:
    plan = items(dsn, tmp_path, dense=20_000)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.busy (now_busy boolean NOT NULL); INSERT INTO public.busy VALUES (true)")
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    bad = bgsync(dsn, "backfill", str(plan), "--throttle-sql", "SELECT 1")
    assert bad.code == 2 and "--throttle-sql" in bad.err, bad.err
    assert scalar(dsn, "SELECT count(*) FROM bgsync.chunks") == 0, "a refused backfill planned nothing"
    proc = spawn_bgsync(dsn, "backfill", str(plan), "--throttle-sql", "SELECT now_busy FROM public.busy")
    try:
        wait_for(lambda: bool(scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE outcome = 'held'"
                                          " AND detail = 'throttle-sql returned true'")))
        time.sleep(1.5)
        assert batches(dsn) == [], "no batch while the throttle query returns true"
        assert status_json(dsn)["held"] == ["throttle-sql returned true"]
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE public.busy SET now_busy = false")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "s of it held" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert scalar(dsn, "SELECT count(*) FROM public.items_v2") == 20_000
    assert float(scalar(dsn, "SELECT held_seconds FROM bgsync.runs")) >= 1.5  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.labels.get("migration") == "items_v2"}


def test_metrics_port_serves_prometheus_text_during_a_backfill(dsn: str, tmp_path: Path) -> None:
    plan = items(dsn, tmp_path, dense=60_000)
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE public.busy (now_busy boolean NOT NULL); INSERT INTO public.busy VALUES (true)")
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    port = free_port()
    proc = spawn_bgsync(dsn, "backfill", str(plan), "--metrics-port", str(port), "--max-rows-per-second", "10000",
                        "--throttle-sql", "SELECT now_busy FROM public.busy")
    seen: list[dict[str, float]] = []
    try:
        def held() -> bool:
            try:
                seen.append(scrape(port))
            except OSError:
                return False
            return seen[-1].get("bgsync_backfill_held_seconds_total", 0) > 0.5
        wait_for(held)
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE public.busy SET now_busy = false")
        wait_for(lambda: (seen.append(scrape(port)) or True)
                 and seen[-1].get("bgsync_backfill_rows_copied_total", 0) > 10_000)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    last = seen[-1]
    for name in ("bgsync_backfill_rows_copied_total", "bgsync_backfill_rows_per_second", "bgsync_backfill_eta_seconds",
                 "bgsync_backfill_held_seconds_total", "bgsync_backfill_rows_in_journal",
                 "bgsync_backfill_batch_seconds_count"):
        assert name in last, (name, sorted(last))
    assert last["bgsync_backfill_rows_per_second"] > 0
    assert last["bgsync_backfill_eta_seconds"] > 0
    assert last["bgsync_backfill_held_seconds_total"] >= 0.5
    assert last["bgsync_backfill_held"] == 0
    assert any(s.get("bgsync_backfill_held") == 1 for s in seen)


def verified(dsn: str, tmp_path: Path) -> Path:
    plan = items(dsn, tmp_path, dense=5_000)
    for command in ("prepare", "backfill", "verify"):
        result = bgsync(dsn, command, str(plan))
        assert result.code == 0, (command, result.err)
    return plan


def test_cutover_cancel_blockers_ends_an_idle_transaction_and_names_it(dsn: str, tmp_path: Path) -> None:
    plan = verified(dsn, tmp_path)
    holder = psycopg.connect(dsn, application_name="long reader")
    holder.execute("SELECT count(*) FROM public.items")       # ACCESS SHARE held, idle in transaction
    pid = holder.info.backend_pid
    try:
        refused = bgsync(dsn, "cutover", str(plan), "--lock-timeout", "200ms", "--attempts", "2")
        assert refused.code == 3, refused.err
        assert scalar(dsn, "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]) == "idle in transaction"
        assert scalar(dsn, "SELECT count(*) FROM bgsync.events WHERE outcome = 'cancelled'") == 0

        done = bgsync(dsn, "cutover", str(plan), "--lock-timeout", "200ms", "--attempts", "3", "--cancel-blockers")
        assert done.code == 0, done.err
        assert f"pid {pid}" in done.err and "long reader" in done.err and "terminated" in done.err, done.err
        journaled = scalar(dsn, "SELECT detail FROM bgsync.events WHERE outcome = 'cancelled'")
        assert f"pid {pid}" in str(journaled) and "idle in transaction" in str(journaled)
        assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "cut_over"
        assert scalar(dsn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]) == 0
    finally:
        holder.close()


def test_pause_refused_before_prepare(dsn: str, tmp_path: Path) -> None:
    plan = items(dsn, tmp_path, dense=10)
    refused = bgsync(dsn, "pause", str(plan))
    assert refused.code == 1 and "not prepared" in refused.err and "bgsync prepare" in refused.err, refused.err




def test_bad_operation_options_are_usage_errors_that_change_nothing(dsn: str, tmp_path: Path) -> None:
    plan = items(dsn, tmp_path, dense=1_000)
    assert bgsync(dsn, "prepare", str(plan)).code == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = bgsync(dsn, "backfill", str(plan), "--metrics-port", str(port))
    assert busy.code == 2 and "--metrics-port" in busy.err, busy.err
    no_unit = bgsync(dsn, "backfill", str(plan), "--max-replica-lag", "5")
    assert no_unit.code == 2 and "--max-replica-lag" in no_unit.err, no_unit.err
    assert scalar(dsn, "SELECT count(*) FROM bgsync.chunks") == 0
    assert scalar(dsn, "SELECT phase FROM bgsync.migrations") == "prepared"
