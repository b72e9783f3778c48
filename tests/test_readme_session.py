"""Issue 13: the README's "A full session" is what a DBA sees. Each `$ bgsync ...` line runs against a
test database; its exit code must be the one the transcript shows (`$ echo $?`, else 0), and every output
line the transcript shows must appear, in order (digits may differ, `...` stands for anything)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.helpers import PLANS, ROOT, load_schema, seed

README = ROOT / "README.md"
EXAMPLE_SERVER = "database shop on db.example.com:5432"


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0


def session_steps() -> list[Step]:
    text = README.read_text()
    block = text.split("## A full session", 1)[1].split("```console\n", 1)[1].split("```", 1)[0]
    steps: list[Step] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        assert line.startswith("$ "), f"README session: output line before any command: {line!r}"
        command = line[2:]
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        if command == "echo $?":
            assert steps and len(output) == 1, "README session: `echo $?` follows a command and shows one code"
            steps[-1].exit_code = int(output[0])
            continue
        steps.append(Step(command, output))
    return steps


def line_pattern(expected: str) -> re.Pattern[str]:
    """Digits may differ (counts, times, dates), `...` stands for anything, bars may be any length."""
    parts = []
    for piece in expected.strip().split("..."):
        escaped = re.escape(piece)
        escaped = re.sub(r"\d+", r"\\d+", escaped)
        escaped = re.sub(r"(?:━)+", "[━╸ ]+", escaped)
        parts.append(escaped)
    return re.compile(".*?".join(parts))


def test_the_readme_session_runs_as_shown(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=20_000)
    with psycopg.connect(dsn) as conn:
        server = f"database {conn.info.dbname} on {conn.info.host}:{conn.info.port}"
    # run this checkout's bgsync from the session's own directory, as `bgsync` would
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "BGSYNC_DSN": dsn, "COLUMNS": "", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    steps = session_steps()
    assert [s.command.split()[1] for s in steps if s.command.startswith("bgsync ")] == [
        "init", "validate", "sql", "cutover", "prepare", "backfill", "verify", "cutover", "status", "rollback",
        "status", "cutover", "verify", "cutover", "cutover", "finalize", "finalize"]
    ran = 0
    for step in steps:
        words = shlex.split(step.command, comments=True)
        if words[0] == "export":
            continue                                   # the test database stands for the DBA's server
        if words[0] == "$EDITOR":
            shutil.copy(PLANS / words[1], tmp_path / words[1])   # the edit: the example plan
            continue
        assert words[0] == "bgsync", step.command
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *words[1:]], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300, cwd=tmp_path, env=env)
        ran += 1
        assert proc.returncode == step.exit_code, (step.command, proc.stdout)
        position = 0
        for expected in step.expected:
            if expected.strip() == "...":
                continue
            pattern = line_pattern(expected.replace(EXAMPLE_SERVER, server))
            found = pattern.search(proc.stdout, position)
            assert found is not None, (step.command, expected, proc.stdout[position:])
            position = found.end()
    assert ran == 17
