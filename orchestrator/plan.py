"""The plan file: a pydantic model with `extra="forbid"` and errors that name the field path."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import PlanError
from orchestrator.names import check_name_length, parse_qualified_name

DURATION = re.compile(r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)\s*$")
DURATION_UNITS = "us, ms, s, min, h, d"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _plain_name(value: str) -> str:
    problem = check_name_length(value)
    if problem:
        raise ValueError(f"name {problem}")
    return value


def _expression(value: str) -> str:
    if not value.strip():
        raise ValueError("expression must not be empty")
    if "\x00" in value:
        raise ValueError("expression must not contain a NUL character")
    return value


def _duration(value: Any) -> Any:
    """Validator of every duration field: a number and a PostgreSQL unit."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return parse_duration(str(value))   # YAML `2`: a number without a unit
    return parse_duration(value) if isinstance(value, str) else value


_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(value: str) -> float:
    """A duration (as `parse_duration` accepts it) in seconds."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)\s*$", parse_duration(value))
    assert match is not None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


PlainName = Annotated[str, Field(description="A plain name, taken literally (no quotes, no folding).")]
Expression = Annotated[str, Field(description="An SQL expression written by the plan's author.")]


class Column(_Strict):
    """One column of green, in order."""

    name: PlainName
    type: str = Field(description="SQL type of the green column, e.g. numeric(12,2).")
    not_null: bool = False
    from_: Expression | None = Field(
        default=None, alias="from",
        description="SQL expression over a blue row; default: the same-named blue column.")
    reverse: Expression | None = Field(
        default=None, description="SQL expression over a green row feeding blue `reverse_column`.")
    reverse_column: PlainName | None = Field(
        default=None, description="Blue column fed by `reverse`; default: the bare column named in `from`.")
    default: Expression | None = Field(default=None, description="SQL default expression of the green column.")

    _name = field_validator("name", "reverse_column")(lambda v: None if v is None else _plain_name(v))
    _expr = field_validator("from_", "reverse", "default")(lambda v: None if v is None else _expression(v))

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        return _expression(value)


class Index(_Strict):
    """A secondary index on green, built CONCURRENTLY after the backfill: either `columns` (with
    `unique` and `where`), or `definition`, the text that follows `ON <table>` in CREATE INDEX, for what
    the structured form cannot say (method, opclass, collation, expressions, INCLUDE, NULLS NOT DISTINCT)."""

    columns: list[PlainName] | None = Field(default=None, min_length=1)
    definition: Expression | None = Field(
        default=None, description='What follows `ON <table>` in CREATE INDEX, e.g. "USING gist (fulltext)".')
    unique: bool = False
    where: Expression | None = None
    name: PlainName | None = Field(default=None, description="Index name; default: derived from the columns.")

    _names = field_validator("columns")(lambda v: None if v is None else [_plain_name(c) for c in v])
    _where = field_validator("where")(lambda v: None if v is None else _expression(v))
    _name = field_validator("name")(lambda v: None if v is None else _plain_name(v))
    _definition = field_validator("definition")(lambda v: None if v is None else _expression(v))

    @model_validator(mode="after")
    def _one_form(self) -> Index:
        if (self.columns is None) == (self.definition is None):
            raise ValueError("give either `columns` or `definition`")
        if self.definition is not None and self.where is not None:
            raise ValueError("`where` goes inside `definition` (WHERE ...)")
        return self


class ViewQuery(_Strict):
    """The query a dependent view or materialized view has after cutover (its original comes back
    at rollback)."""

    name: str = Field(description="The view, as regclass reads it: schema.view.")
    query: Expression = Field(description="Its SELECT after cutover, written against the live name.")

    @field_validator("name")
    @classmethod
    def _qualified(cls, value: str) -> str:
        parse_qualified_name(value)
        return value


class Check(_Strict):
    name: PlainName
    expression: Expression

    _name = field_validator("name")(_plain_name)
    _expr = field_validator("expression")(_expression)


class Backfill(_Strict):
    mode: Literal["bulk", "direct"] = Field(
        default="bulk", description="bulk: green fills without indexes while the trigger records changed keys; "
                                    "indexes are built after the copy, the recorded keys re-read from blue, and "
                                    "the trigger switched to dual write under a short lock. direct: green has its "
                                    "primary key from the start and the trigger writes it. Fixed at prepare.")
    workers: int = Field(default=4, ge=1, le=64)
    batch_rows: int = Field(default=10000, ge=1, le=10_000_000)
    max_rows_per_second: float = Field(
        default=0, ge=0, description="Global: all workers of all processes of the migration together; 0 = unthrottled")
    batch_time: str = Field(
        default="500ms", description="Time target of one batch (PostgreSQL duration): batches start at `batch_rows` "
                                     "rows and are resized after each batch to take about this long, never above "
                                     "twice `batch_rows`.")
    held_partition_wait: str = Field(
        default="1min", description="How long the backfill waits for partitions that another session holds "
                                    "(a killed bgsync's session the server has not ended yet) while they make no "
                                    "progress, before it gives up naming the holder (PostgreSQL duration).")

    _wait = field_validator("held_partition_wait", "batch_time", mode="before")(_duration)


class Verify(_Strict):
    workers: int = Field(default=4, ge=1, le=64)
    snapshot_wait: str = Field(
        default="10min", description="How long verify waits for transactions whose snapshot predates the last "
                                     "backfill or repair before it refuses (PostgreSQL duration).")

    max_snapshot_age: str = Field(
        default="30s", description="No verify snapshot lives longer (PostgreSQL duration): partitions are compared in "
                                   "pieces sized to finish well within it, and a piece that does not is split.")

    _wait = field_validator("snapshot_wait", "max_snapshot_age", mode="before")(_duration)


class Cutover(_Strict):
    mode: Literal["rename", "view"] = "rename"
    retired_name: PlainName | None = Field(default=None, description="Default: <source table>_old.")
    lock_timeout: str = Field(default="2s", description="PostgreSQL duration, e.g. 200ms, 2s, 1min.")
    attempts: int = Field(default=10, ge=1, le=1000)

    _name = field_validator("retired_name")(lambda v: None if v is None else _plain_name(v))

    _timeout = field_validator("lock_timeout", mode="before")(_duration)


class Versions(_Strict):
    """The schemas `expose` creates: each holds one writable view named like the live table, in blue's
    or green's shape, so an application release picks its shape with search_path."""

    blue: PlainName = Field(description="Schema of the old release's view (blue's shape).")
    green: PlainName = Field(description="Schema of the new release's view (green's shape).")

    _names = field_validator("blue", "green")(_plain_name)

    @model_validator(mode="after")
    def _different(self) -> Versions:
        if self.blue == self.green:
            raise ValueError("blue and green need two different schemas")
        return self


class Plan(_Strict):
    """A bgsync migration plan."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=40, description="Migration id in the journal.")
    source: str = Field(description="The live (blue) table, as regclass accepts it: schema.table.")
    target: str | None = Field(default=None, description="The green table; default: <source>_v2.")
    key: list[PlainName] | None = Field(default=None, min_length=1,
                                        description="Green key columns; default: the source primary key.")
    columns: list[Column] = Field(min_length=1, description="The complete, ordered column list of green.")
    indexes: list[Index] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    backfill: Backfill = Field(default_factory=Backfill)
    verify: Verify = Field(default_factory=Verify)
    cutover: Cutover = Field(default_factory=Cutover)
    views: list[ViewQuery] = Field(
        default_factory=list, description="Replacement queries for dependent views that cannot read green as they are.")
    versions: Versions | None = Field(
        default=None, description="Schemas that show each shape under the live name, created by `expose`.")

    @field_validator("source", "target")
    @classmethod
    def _qualified(cls, value: str | None) -> str | None:
        if value is not None:
            parse_qualified_name(value)
        return value

    @model_validator(mode="after")
    def _cross_references(self) -> Plan:
        problems: list[str] = []
        names = [c.name for c in self.columns]
        seen: set[str] = set()
        for i, name in enumerate(names):
            if name in seen:
                problems.append(f"columns[{i}].name: duplicate column {name!r}")
            seen.add(name)
        for i, k in enumerate(self.key or []):
            if k not in seen:
                problems.append(f"key[{i}]: {k!r} is not a green column")
        for i, index in enumerate(self.indexes):
            for j, col in enumerate(index.columns or []):
                if col not in seen:
                    problems.append(f"indexes[{i}].columns[{j}]: {col!r} is not a green column")
        named: set[str] = set()
        for i, ix in enumerate(self.indexes):
            if ix.name and ix.name in named:
                problems.append(f"indexes[{i}].name: duplicate index name {ix.name!r}")
            named.add(ix.name or "")
        view_names = [v.name for v in self.views]
        for i, name in enumerate(view_names):
            if view_names.index(name) != i:
                problems.append(f"views[{i}].name: {name!r} is given twice")
        check_names = [c.name for c in self.checks]
        for i, name in enumerate(check_names):
            if check_names.index(name) != i:
                problems.append(f"checks[{i}].name: duplicate check {name!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def structural_dump(self) -> dict[str, Any]:
        """The fields that define green; tuning knobs (workers, rates, timeouts) are left out."""
        data = self.model_dump(mode="json", by_alias=True)
        for knob in ("backfill", "verify"):
            data.pop(knob)
        data["cutover"] = {k: v for k, v in data["cutover"].items() if k in ("mode", "retired_name")}
        return data

    def structural_hash(self) -> str:
        text = json.dumps(self.structural_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_duration(text: str) -> str:
    """A PostgreSQL duration with its unit (`200ms`, `2s`, `1min`), stripped; a bare number is refused:
    `2` would mean 2 ms to PostgreSQL's lock_timeout and 2 s to a reader."""
    if DURATION.match(text):
        return text.strip()
    number = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", number):
        raise ValueError(f"{number} has no unit: write it with one of PostgreSQL's units ({DURATION_UNITS}), "
                         f"e.g. {number}s or {number}ms")
    raise ValueError(f"not a PostgreSQL duration such as 200ms, 2s or 1min: a number and a unit ({DURATION_UNITS})")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(plan)"


def format_validation_error(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if p not in ("function-after",))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("extra_forbidden", "invalid_key") and loc:
            # the unknown key as written (`0:` in YAML is the key 0, not a list index)
            parent = _loc(loc[:-1]) if loc[:-1] else ""
            lines.append(f"{parent}{'.' if parent else ''}{loc[-1]}: unknown field")
            continue
        lines.append(f"{_loc(loc)}: {message}")
    return lines


def parse_plan(data: Any) -> Plan:
    if not isinstance(data, dict):
        raise PlanError(["(plan): the plan must be a YAML mapping of fields"])
    try:
        return Plan.model_validate(data)
    except ValidationError as error:
        raise PlanError(format_validation_error(error)) from None


def load_plan(path: str | Path) -> Plan:
    """Read and check a plan file offline; every problem raises PlanError (exit 2)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise PlanError([f"(file): cannot read {file}: {reason}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise PlanError([f"(yaml): malformed YAML{where}: {problem}"]) from None
    return parse_plan(data)


def plan_json_schema() -> dict[str, Any]:
    return Plan.model_json_schema(by_alias=True)


def diff_fields(old: Any, new: Any, path: str = "") -> list[str]:
    """Field paths where two plan dumps differ, for naming what changed since prepare."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            sub = f"{path}.{key}" if path else str(key)
            out += diff_fields(old.get(key), new.get(key), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            out += diff_fields(a, b, f"{path}[{i}]")
        return out
    return [] if old == new else [f"{path or '(plan)'}: {json.dumps(old)} -> {json.dumps(new)}"]
