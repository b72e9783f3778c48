"""Issue 5.5: a fuzzed plan generator never produces a traceback, only exit 2 with a field path.
(A DSN's password never reaching any output is tests/test_passwords.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator import commands
from orchestrator.errors import BgsyncError, PlanError
from orchestrator.plan import load_plan, parse_plan, plan_json_schema
from tests.helpers import load_schema, seed

# `path: message`, the path a real plan field path (`columns[2].from`, `cutover.lock_timeout`, `key[0]`) or
# one of the markers for the file as a whole: `(yaml)`, `(plan)`, `(file)`; an unknown field is named as
# written after the real path of its parent (`columns[1].colour: unknown field`, `0: unknown field`)
PATH = r"[a-z_]+(?:\[\d+\])*(?:\.[a-z_]+(?:\[\d+\])*)*"
FIELD_LINE = re.compile(rf"^(?P<path>\((?:yaml|plan|file)\)|{PATH}): (?P<message>\S.*)$", re.S)
UNKNOWN_LINE = re.compile(rf"^(?:(?P<path>{PATH})\.)?(?P<key>.+): unknown field$", re.S)


def _plan_field_names() -> set[str]:
    schema = plan_json_schema()
    names = set(schema["properties"])
    for definition in schema["$defs"].values():
        names |= set(definition.get("properties", {}))
    return names


FIELD_NAMES = _plan_field_names()
odd_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True), odd_text)
names = st.one_of(st.sampled_from(["id", "customer_id", "amount", "state", "note", "created_at", "Id", 'a"b',
                                   "x; DROP TABLE orders", "ünï", "select", "", "a" * 70]), odd_text, scalars)
expressions = st.one_of(st.sampled_from(["amount::numeric", "state", "1; SELECT 1", "$bgsync_body$", "now()",
                                         "(", "NULL", "amount %% 2", "'x'", "round(amount)::int"]), odd_text, scalars)
column = st.fixed_dictionaries(
    {"name": names},
    optional={"type": st.one_of(st.sampled_from(["bigint", "text", "numeric(12,2)", "txet", "int[]"]), scalars),
              "not_null": scalars, "from": expressions, "reverse": expressions, "reverse_column": names,
              "default": expressions, "colour": scalars})
plans = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(st.sampled_from(["orders_v2", "Orders", "a" * 50, "x-y"]), scalars),
        "source": st.one_of(st.sampled_from(["public.orders", "orders", 'public."Orders"', "a.b.c", "public.nope",
                                             "public.orders; drop table x"]), scalars),
        "target": st.one_of(st.sampled_from(["public.orders_v2", "public.accounts"]), scalars),
        "key": st.one_of(st.lists(names, max_size=3), scalars),
        "columns": st.one_of(st.lists(column, max_size=6), scalars),
        "indexes": st.one_of(st.lists(st.fixed_dictionaries({"columns": st.lists(names, max_size=2)},
                                                            optional={"where": expressions, "unique": scalars}),
                                      max_size=2), scalars),
        "checks": st.one_of(st.lists(st.fixed_dictionaries({"name": names, "expression": expressions}), max_size=2),
                            scalars),
        "backfill": st.one_of(st.dictionaries(st.sampled_from(["workers", "batch_rows", "max_rows_per_second",
                                                               "speed"]), scalars, max_size=3), scalars),
        "cutover": st.one_of(st.dictionaries(st.sampled_from(["mode", "retired_name", "lock_timeout", "attempts"]),
                                             scalars, max_size=3), scalars),
        "surprise": scalars,
    })


def _check_problems(error: PlanError) -> None:
    """Each problem starts with the path of a field the plan has (an unknown field only as its last part)."""
    assert error.exit_code == 2 and error.problems
    for line in error.problems:
        match = UNKNOWN_LINE.match(line) or FIELD_LINE.match(line)
        assert match, line
        path = match["path"] or ""
        if not path.startswith("("):
            assert set(re.findall(r"[a-z_]+", path)) <= FIELD_NAMES, line


@settings(max_examples=400, deadline=None)
@given(plans)
def test_fuzzed_plans_are_valid_or_name_the_field(data: dict[str, Any]) -> None:
    try:
        parse_plan(data)
    except PlanError as error:
        _check_problems(error)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(odd_text, st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
@example("0:")                    # a key that is not a name: reported as written, not as a list index
@example("columns:\n  - {1: x}\n")
def test_fuzzed_plan_files_never_trace_back(tmp_path: Path, text: str) -> None:
    file = tmp_path / "fuzz.yaml"
    file.write_text(text, encoding="utf-8")
    try:
        load_plan(file)
    except PlanError as error:
        _check_problems(error)


def test_fuzzed_plans_against_a_live_database_exit_2_and_change_nothing(dsn: str, tmp_path: Path) -> None:
    load_schema(dsn)
    seed(dsn, orders=50, accounts=20)
    options = commands.Options(dsn=dsn)
    file = tmp_path / "plan.yaml"
    import yaml

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(plans)
    def check(data: dict[str, Any]) -> None:
        file.write_text(yaml.safe_dump(data, allow_unicode=True))
        try:
            commands.validate(options, file)
        except BgsyncError as error:
            assert error.exit_code == 2, error
            if isinstance(error, PlanError):
                _check_problems(error)

    check()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regnamespace('bgsync')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname LIKE '%%v2%%'").fetchone() == (0,)
