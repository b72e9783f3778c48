"""Logs and progress go to stderr; results go to stdout."""

from __future__ import annotations

from rich.console import Console

from orchestrator.db import redact

# soft_wrap: a log line is never broken by rich, whatever the width (a pipe or a file has none);
# a terminal wraps long lines itself.
console = Console(stderr=True, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    console.print(redact(message), markup=False)


def warn(message: str) -> None:
    console.print("WARNING: " + redact(message), style="yellow", markup=False)


def success(message: str) -> None:
    console.print(redact(message), style="green", markup=False)
