"""Logs and progress go to stderr; results go to stdout."""

from __future__ import annotations

from rich.console import Console

from orchestrator.db import redact

console = Console(stderr=True, highlight=False)


def info(message: str) -> None:
    console.print(redact(message), markup=False)


def warn(message: str) -> None:
    console.print("WARNING: " + redact(message), style="yellow", markup=False)


def success(message: str) -> None:
    console.print(redact(message), style="green", markup=False)
