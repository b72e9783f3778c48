"""What a bench figure is, and the helpers every section uses to measure one."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Figure:
    name: str
    measured: str
    reference: str
    ratio: float | None
    target: str
    met: bool | None          # None: skipped (the reference or the feature is not there), or (target "-") information

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "-" if self.target == "-" else "skipped"
        return "met" if self.met else "NOT met"


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def quiet(action: Callable[[], object]) -> None:
    """Run a command without its stdout report (the bench prints its own table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        action()


def ratio_figure(name: str, ours: Sequence[float], reference: str, theirs: Sequence[float], target: float,
                 unit: str = "s") -> Figure:
    """Ours / theirs, lower is better."""
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = a / b if b else float("inf")
    return Figure(name, f"{a:.2f} {unit}", f"{reference}: {b:.2f} {unit}", round(ratio, 3),
                  f"<= {target:.2f}x", ratio <= target)


def stall_figure(name: str, worst: float, baseline: float, target_ms: float) -> Figure:
    return Figure(name, f"{worst * 1000:.0f} ms", f"same writers, no flip: {baseline * 1000:.0f} ms", None,
                  f"<= {target_ms:.0f} ms", worst * 1000 <= target_ms)


@dataclass
class ChildRun:
    seconds: dict[str, float]
    mismatch: bool
    maxrss_kb: int            # the child's own report (RUSAGE_SELF)
    wait4_maxrss_kb: int      # what the kernel reports to the parent for the child and its descendants
    log: list[str]            # bgsync's own log lines (stderr), progress bars left out


def run_phases(dsn: str, plan: Path, phases: Sequence[str], workers: int | None = None) -> ChildRun:
    """bgsync's phases in a child process (bench/phases.py): per-phase seconds and its peak RSS."""
    command = [sys.executable, "-m", "bench.phases", "--dsn", dsn, "--plan", str(plan)]
    if workers:
        command += ["--workers", str(workers)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([*command, *phases], stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise RuntimeError(f"bgsync {' '.join(phases)} failed (exit {child.returncode}):\n{stderr[-3000:]}")
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and "\u2501" not in line]
    return ChildRun(report["seconds"], report["mismatch"], report["maxrss_kb"], usage.ru_maxrss, lines)


def markdown(figures: list[Figure], machine: str, notes: list[str]) -> str:
    lines = [f"Measured on {machine}.", "",
             "| figure | bgsync | reference | ratio | target | met |", "|---|---:|---|---:|---|---|"]
    for f in figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        lines.append(f"| {f.name} | {f.measured} | {f.reference} | {ratio} | {f.target} | {f.verdict} |")
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
