"""Run bgsync phases through its public API in a process of their own, and print what each took.

    python -m bench.phases --dsn DSN --plan PLAN [--workers N] prepare backfill verify cutover finalize

The bench starts this as a child so that (a) the memory figure is the peak RSS of a process that
only runs bgsync (its parent reads it with wait4), and (b) the interpreter's start-up and imports
are not counted in a phase's time (pg_repack, the reference, is a C binary that starts at once).
Prints one JSON line on stdout: {"seconds": {phase: s}, "maxrss_kb": N, "mismatch": bool}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import time
from pathlib import Path

from orchestrator import commands
from orchestrator.commands import Options
from orchestrator.errors import ParityMismatch

PHASES = ("prepare", "backfill", "verify", "expose", "cutover", "rollback", "finalize")


def run_phase(options: Options, plan: Path, phase: str, workers: int | None) -> bool:
    """One phase; True when verify found differences."""
    with contextlib.redirect_stdout(io.StringIO()):
        if phase == "prepare":
            commands.prepare(options, plan)
        elif phase == "backfill":
            commands.backfill(options, plan, workers=workers)
        elif phase == "verify":
            try:
                commands.verify(options, plan, workers=workers)
            except ParityMismatch:
                return True
        elif phase == "expose":
            commands.expose(options, plan)
        elif phase == "cutover":
            commands.cutover(options, plan)
        elif phase == "rollback":
            commands.rollback(options, plan)
        elif phase == "finalize":
            commands.finalize(options, plan, yes=True)
        else:
            raise SystemExit(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    return False


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--workers", type=int)
    parser.add_argument("phases", nargs="+", choices=PHASES)
    args = parser.parse_args()
    options = Options(dsn=args.dsn, hints=False)
    seconds: dict[str, float] = {}
    mismatch = False
    for phase in args.phases:
        started = time.perf_counter()
        mismatch = run_phase(options, args.plan, phase, args.workers) or mismatch
        seconds[phase] = round(time.perf_counter() - started, 4)
    sys.stdout.write(json.dumps({"seconds": seconds, "mismatch": mismatch,
                                 "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")


if __name__ == "__main__":
    main()
