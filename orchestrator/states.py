"""The journal's phases in the DBA's words, and the command that moves each one forward.

Refusals and `status` use these instead of the internal phase names, and always name the command
to run next, written with the plan file as the user typed it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

WORDS: dict[str | None, str] = {
    None: "not prepared",
    "prepared": "prepared, not backfilled yet",
    "backfilling": "being backfilled (backfill in progress or interrupted)",
    "backfilled": "backfilled, not verified yet",
    "verified": "verified (the last verify found parity)",
    "mismatch": "mismatched (the last verify found differences)",
    "exposed": "exposed (both releases write, through their version schemas)",
    "cut_over": "cut over",
    "reverted": "rolled back after cutover",
    "rolled_back": "rolled back (green dropped)",
    "finalizing": "being finalized (the reverse sync is gone; the retired table is not dropped yet)",
    "finalized": "finalized",
}

# Phases in which green holds the whole history (the backfill is done).
BACKFILLED = ("backfilled", "verified", "mismatch", "reverted")

# The command that moves a migration on from each phase (None: nothing comes next).
NEXT: dict[str | None, str | None] = {
    None: "prepare",
    "prepared": "backfill",
    "backfilling": "backfill",
    "backfilled": "verify",
    "verified": "cutover",
    "exposed": "cutover",
    "mismatch": "verify --repair",
    "cut_over": "finalize",
    "reverted": "verify",
    "rolled_back": "prepare",
    "finalizing": "finalize",
    "finalized": None,
}


def words(phase: str | None) -> str:
    """The phase as a DBA would say it, to follow `migration NAME is`."""
    return WORDS.get(phase, phase or "not prepared")


def command(verb: str, plan: Path | str) -> str:
    """`bgsync VERB PLAN [flags]`, with the plan path quoted for a shell when it needs it."""
    name, *flags = verb.split()
    return " ".join(["bgsync", name, shlex.quote(str(plan)), *flags])


def next_command(phase: str | None, plan: Path | str) -> str | None:
    verb = NEXT.get(phase)
    return None if verb is None else command(verb, plan)


def run_next(phase: str | None, plan: Path | str) -> str:
    """`; run `bgsync backfill PLAN``: the next step from a phase, to end a message with."""
    if phase == "cut_over":
        return f"; run `{command('finalize', plan)}` to finish, or `{command('rollback', plan)}` to go back"
    following = next_command(phase, plan)
    return "; nothing comes after finalize" if following is None else f"; run `{following}`"
