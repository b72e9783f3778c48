"""One error hierarchy; the CLI edge turns each into `FAILED: ...` and its exit code."""

from __future__ import annotations


class BgsyncError(Exception):
    """Base of every error bgsync reports on purpose."""

    exit_code = 3


class UsageError(BgsyncError):
    """Invalid command-line usage or plan: nothing was changed (exit 2)."""

    exit_code = 2


class PlanError(UsageError):
    """The plan is invalid; `problems` holds one `field: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid plan:\n  " + "\n  ".join(problems))


class GateRefused(BgsyncError):
    """A safety gate refused the command in the current state (exit 1)."""

    exit_code = 1


class Cancelled(BgsyncError):
    """The operator declined a confirmation: nothing was changed (exit 1, reported without `FAILED:`)."""

    exit_code = 1


class ParityMismatch(BgsyncError):
    """Blue and green differ (exit 1)."""

    exit_code = 1


class Interrupted(BgsyncError):
    """The operator pressed Ctrl-C; progress was recorded (exit 130)."""

    exit_code = 130


class DatabaseError(BgsyncError):
    """A database or lock error that retries did not overcome (exit 3)."""

    exit_code = 3
