"""Run `bgsync` in a new process forked from a server that has already imported the third-party
libraries (psycopg, pydantic, pglast, jinja2, typer, rich): the same command line, environment,
working directory and exit code as `python -m orchestrator`, without paying ~0.7 s of interpreter
start and imports per command (hundreds of commands per suite run).

bgsync's own modules are imported in the child after its environment is set (some read it at import:
the console's width, the default lock_timeout). This module imports nothing of bgsync's, so the server
never does either. What the interpreter reads only as it starts (PYTHON* variables, the locale) is the
test process's, as no test sets them. BGSYNC_TEST_SUBPROCESS=1 runs every command as a real
`python -m orchestrator`.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# "__main__": the test runner's main script (pytest's, which only imports pytest) is imported once by the
# server instead of by every forked command
PRELOAD = ["__main__", "psycopg", "psycopg.sql", "psycopg.errors", "pydantic", "pglast", "jinja2", "typer", "click",
           "rich.console", "rich.progress", "rich.table", "yaml", "prometheus_client"]

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def _child(args: list[str], env: dict[str, str], cwd: str, out_path: str, err_path: str) -> None:
    """In the forked process: become `python -m orchestrator ARGS` and exit with its code."""
    import runpy

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115 - fd 1 lives as long as the process
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.argv = ["bgsync", *args]
    code: int = 0
    try:
        runpy.run_module("orchestrator", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            code = 1
        else:
            code = done.code or 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bgsync ARGS`; subprocess.TimeoutExpired past `timeout`."""
    if os.environ.get("BGSYNC_TEST_SUBPROCESS") == "1":
        proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd)
        return proc.returncode, proc.stdout, proc.stderr
    with tempfile.TemporaryDirectory(prefix="bgsync-cli-") as folder:
        out_path, err_path = Path(folder) / "out", Path(folder) / "err"
        out_path.touch()
        err_path.touch()
        process = _server().Process(target=_child, args=(args, env, str(cwd), str(out_path), str(err_path)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["bgsync", *args], timeout)
        code = process.exitcode
        assert code is not None
        return code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
