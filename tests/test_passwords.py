"""Issue 9, item 2: a DSN's password never reaches stdout, stderr, `--json` output or the journal.

The server requires the password (its own embedded PostgreSQL: scram-sha-256 for the test role on the
Unix socket and on 127.0.0.1), so a command that succeeds used it. Checked: every command with the right
password, from each source (--dsn, BGSYNC_DSN, DATABASE_URL, PGPASSWORD; URI and key=value, the password
in the userinfo, in the query string, percent-encoded); wrong passwords; an unreachable port and an
unresolvable host; malformed DSNs of both forms (exit 2); a DSN typed where the plan belongs. The password
holds every character a DSN must escape between distinctive fragments, and no fragment may show."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from orchestrator.embedded import FAST_SETTINGS, EmbeddedServer
from orchestrator.workload import load_sample_schema, seed_sample
from tests.helpers import PLANS, ROOT, Result

ROLE = "bgsync_pw"
PASSWORD = "Qv7Kp\"Wz9Rt@Lm3Xs;Hn5Bd Jc8Fg%Yu4Ne'Tx6Va\\Mq2Ze/Rb5Lo:Gw3Ui=Pn8Cy&Dh4Ks?Fm7Ja#Vo2Xq"
WRONG = "Zk4Hd\"Wq8Ny@Pc2Vb Fo9Le%Sa6Tm'Xe1Rj\\Bu3Gi"
FRAGMENTS = re.findall(r"[A-Za-z0-9]{5}", PASSWORD + WRONG)
CLEARED = ("BGSYNC_DSN", "DATABASE_URL", "PGPASSWORD", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE",
           "PGSERVICE", "PGPASSFILE")


@dataclass(frozen=True)
class Scram:
    socket_dir: str
    port: int
    admin: str            # trust, as the superuser: to set up and to read the journal
    dbname: str = "shop"

    def uri(self, password: str = PASSWORD, host: str = "127.0.0.1", port: int | str | None = None,
            dbname: str | None = None) -> str:
        return (f"postgresql://{ROLE}:{quote(password, safe='')}@{host}:{port or self.port}/"
                f"{dbname or self.dbname}")

    def keywords(self, password: str = PASSWORD, host: str | None = None) -> str:
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        return (f"host={host or self.socket_dir} port={self.port} user={ROLE} dbname={self.dbname} "
                f"password='{escaped}'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def scram() -> Iterator[Scram]:
    """A dedicated embedded PostgreSQL on its Unix socket and 127.0.0.1 where ROLE must give its password."""
    server = EmbeddedServer()
    try:
        server.configure(FAST_SETTINGS)
        socket_dir, port = server.pgdata, _free_port()
        server.restart(f"-h 127.0.0.1 -p {port} -k {socket_dir}")
        admin = f"host={socket_dir} port={port} user=postgres dbname=postgres"
        hba = Path(server.pgdata) / "pg_hba.conf"
        hba.write_text(f"local all {ROLE} scram-sha-256\nhost all {ROLE} 127.0.0.1/32 scram-sha-256\n"
                       f"host all {ROLE} ::1/128 scram-sha-256\n" + hba.read_text())
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(PASSWORD)))
            conn.execute(sql.SQL("CREATE DATABASE shop OWNER {}").format(sql.Identifier(ROLE)))
            conn.execute("SELECT pg_reload_conf()")
        found = Scram(socket_dir, port, admin)
        shop = f"host={socket_dir} port={port} user=postgres dbname=shop"
        load_sample_schema(shop)
        seed_sample(shop, orders=3_000)
        # the password is required, on the socket and over TCP, and it works
        for host in (socket_dir, "127.0.0.1"):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(f"host={host} port={port} user={ROLE} dbname=shop").close()
            with psycopg.connect(found.keywords(host=host)) as conn:
                assert conn.execute("SELECT current_user").fetchone() == (ROLE,)
        yield found
    finally:
        server.stop()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """The CLI as a user runs it, with only the connection settings given here."""
    full = {k: v for k, v in os.environ.items() if k not in CLEARED}
    full.update({"COLUMNS": "200", **(env or {})})
    proc = subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=300, env=full, cwd=ROOT)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def shown(text: str) -> list[str]:
    return [f for f in FRAGMENTS if f in text]


def journal_text(scram: Scram) -> str:
    with psycopg.connect(scram.admin.replace("dbname=postgres", f"dbname={scram.dbname}")) as conn:
        return " ".join(str(conn.execute(sql.SQL("SELECT coalesce(string_agg(t::text, ' '), '') FROM {} AS t").format(
            sql.Identifier("bgsync", table))).fetchone()) for table in ("events", "migrations", "verify_runs",
                                                                       "chunks"))


def test_every_command_with_the_right_password_shows_it_nowhere(scram: Scram, tmp_path: Path) -> None:
    plan = tmp_path / "orders_v2.yaml"
    shutil.copy(PLANS / "orders_v2.yaml", plan)
    pgvars = {"PGHOST": scram.socket_dir, "PGPORT": str(scram.port), "PGUSER": ROLE, "PGDATABASE": scram.dbname,
              "PGPASSWORD": PASSWORD}
    in_query = (f"postgresql://{ROLE}@127.0.0.1:{scram.port}/{scram.dbname}"
                f"?password={quote(PASSWORD, safe='')}&application_name=x")
    # (command, where the connection comes from); every source and form is used at least once
    steps: list[tuple[list[str], list[str], dict[str, str]]] = [
        (["init", "public.orders", "-o", str(tmp_path / "scaffold.yaml")], ["--dsn", scram.uri()], {}),
        (["validate", str(plan)], [], {"BGSYNC_DSN": scram.keywords()}),
        (["sql", str(plan)], [], {"DATABASE_URL": scram.uri()}),
        (["prepare", str(plan)], [], pgvars),
        (["backfill", str(plan)], ["--dsn", scram.keywords(host="127.0.0.1")], {}),
        (["verify", str(plan)], [], {"BGSYNC_DSN": in_query}),
        (["verify", str(plan), "--json"], [], {"DATABASE_URL": scram.keywords()}),
        (["cutover", str(plan)], [], {"BGSYNC_DSN": scram.uri()}),
        (["status", "--json"], [], pgvars),
        (["rollback", str(plan)], ["--dsn", in_query], {}),
        (["verify", str(plan), "--json"], [], {"BGSYNC_DSN": scram.uri()}),
        (["cutover", str(plan)], ["--dsn", scram.keywords()], {}),
        (["finalize", str(plan), "--yes"], [], {"DATABASE_URL": scram.uri()}),
        (["status"], [], {"BGSYNC_DSN": scram.keywords(host="127.0.0.1")}),
    ]
    for command, options, env in steps:
        result = run(*command, *options, env=env)
        assert result.code == 0, (command, result.err)
        assert shown(result.out + result.err) == [], (command, result.out, result.err)
        if "--json" in command:
            assert isinstance(json.loads(result.out), dict)
    assert "finalized" in run("status", "--json", env=pgvars).out
    assert shown(journal_text(scram)) == []


def _failures(scram: Scram, plan: str) -> list[tuple[str, list[str], dict[str, str], int, str]]:
    """(label, arguments, environment, exit code, a phrase of the message)."""
    enc = quote(PASSWORD, safe="")
    kv_escaped = PASSWORD.replace("\\", "\\\\").replace("'", "\\'")
    wrong = "password authentication failed"
    malformed = "malformed"
    return [
        # the server says no
        ("wrong password, --dsn URI", ["status", "--json", "--dsn", scram.uri(WRONG)], {}, 3, wrong),
        ("wrong password, BGSYNC_DSN key=value", ["validate", plan], {"BGSYNC_DSN": scram.keywords(WRONG)}, 3, wrong),
        ("wrong password, DATABASE_URL over TCP", ["prepare", plan], {"DATABASE_URL": scram.uri(WRONG)}, 3, wrong),
        ("wrong PGPASSWORD", ["verify", plan, "--json"],
         {"PGHOST": scram.socket_dir, "PGPORT": str(scram.port), "PGUSER": ROLE, "PGDATABASE": scram.dbname,
          "PGPASSWORD": WRONG}, 3, wrong),
        ("right PGPASSWORD, wrong one in the DSN", ["backfill", plan],
         {"BGSYNC_DSN": scram.uri(WRONG), "PGPASSWORD": PASSWORD}, 3, wrong),
        # nobody answers
        ("unreachable port", ["cutover", plan, "--dsn", scram.uri(port=1)], {}, 3, "cannot connect"),
        ("unresolvable host", ["status", "--json"], {"BGSYNC_DSN": scram.uri(host="no-such-host.invalid")}, 3,
         "cannot connect"),
        ("unreachable, PGPASSWORD", ["rollback", plan],
         {"PGHOST": "127.0.0.1", "PGPORT": "1", "PGUSER": ROLE, "PGPASSWORD": PASSWORD}, 3, "cannot connect"),
        # libpq cannot parse it (exit 2, nothing tried)
        ("URI, raw password", ["status", "--json", "--dsn",
                               f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{scram.port}/shop"], {}, 2, ""),
        ("URI, bad percent-encoding after the password",
         ["validate", plan], {"BGSYNC_DSN": f"postgresql://{ROLE}:{enc}%zz@127.0.0.1:{scram.port}/shop"}, 2,
         malformed),
        ("URI, raw quote in the password, bad percent-encoding",
         ["sql", plan], {"DATABASE_URL": f"postgresql://{ROLE}:Qv7Kp\"Wz9Rt%zz@127.0.0.1/shop"}, 2, malformed),
        ("URI, password in the query string, unknown parameter",
         ["init", "public.orders", "--dsn", f"postgresql://{ROLE}@127.0.0.1/shop?password={enc}&colour=red"], {}, 2,
         malformed),
        ("URI, password in the query string, bad port",
         ["status", "--dsn", f"postgresql://{ROLE}@127.0.0.1:notaport/shop?password={enc}"], {}, 2, "not usable"),
        ("URI, password in the user's place, bad port",
         ["finalize", plan, "--yes"], {"BGSYNC_DSN": f"postgresql://{enc}@127.0.0.1:notaport/shop"}, 2,
         "not usable"),
        ("URI, unterminated IPv6 host",
         ["verify", plan, "--json", "--dsn", f"postgresql://{ROLE}:{enc}@[::1/shop"], {}, 2, malformed),
        ("key=value, unterminated quote", ["status", "--json"],
         {"BGSYNC_DSN": f"host=127.0.0.1 user={ROLE} password='{kv_escaped}"}, 2, malformed),
        ("key=value, unquoted password", ["validate", plan],
         {"DATABASE_URL": f"host=127.0.0.1 user={ROLE} password={PASSWORD} dbname=shop"}, 2, malformed),
        ("key=value, unknown option after the password", ["backfill", plan, "--dsn",
                                                          f"{scram.keywords()} colour=red"], {}, 2, malformed),
        ("key=value, bad sslmode", ["cutover", plan], {"BGSYNC_DSN": f"{scram.keywords()} sslmode=sometimes"}, 2,
         "not usable"),
        # a DSN typed where the plan belongs
        ("DSN as the plan", ["validate", scram.uri()], {}, 2, ""),
        ("DSN as an extra argument", ["status", plan, scram.uri(), "--json"], {}, 2, ""),
        ("key=value DSN as the plan", ["prepare", scram.keywords()], {}, 2, ""),
    ]


def test_failed_and_malformed_connections_show_the_password_nowhere(scram: Scram, tmp_path: Path) -> None:
    plan = tmp_path / "orders_v2.yaml"
    shutil.copy(PLANS / "orders_v2.yaml", plan)
    cases = _failures(scram, str(plan))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: run(*case[1], env=case[2]), cases))
    for (label, args, _, code, phrase), result in zip(cases, results, strict=True):
        assert result.code == code, (label, result.err)
        assert "Traceback" not in result.err, (label, result.err)
        assert phrase in result.err, (label, result.err)
        assert shown(result.out + result.err) == [], (label, result.out, result.err)
        if "--json" in args:
            error = json.loads(result.out)["error"]
            assert error["exit_code"] == code and shown(error["message"]) == [], (label, error)
