"""The demo runs end to end on its own embedded server (the README's first command)."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.demo import DEMO_PLAN
from tests.helpers import PLANS, ROOT


def test_demo_plan_is_the_example_plan() -> None:
    assert (PLANS / "orders_numeric.yaml").read_text() == DEMO_PLAN


def test_demo_runs_to_its_summary() -> None:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "demo", "--rows", "20000"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bgsync demo summary" in proc.stdout
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in proc.stdout.splitlines() if line.count("│") == 3}
    assert lines["parity before finalize (independent EXCEPT ALL)"] == "OK"
    assert lines["reverse sync after cutover (EXCEPT ALL)"] == "OK"
    assert lines["writer errors"] == "0"
    assert "verify caught it" in proc.stderr
    assert "RuntimeDirWarning" not in proc.stderr and "XDG_RUNTIME_DIR" not in proc.stderr
    for phase in ("validate", "prepare", "backfill", "verify", "verify --repair", "cutover", "rollback",
                  "cutover again", "finalize"):
        assert f"time: {phase}" in lines
