"""Arrow schemas of the store's tables, and the check that turns rows into an Arrow table.

Each table is one `TableSpec`: its schema (the key column first, never null; `run_id`
never null) and the name of its key. Columns are a minimum: add what lineage needs, old
shards stay readable because the views union Parquet files by column name.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import SchemaMismatch, UnknownTable

_JSON = b"rlaif.json"
_CHOICES = b"rlaif.choices"


def text(name: str) -> pa.Field:
    return pa.field(name, pa.string())


def integer(name: str) -> pa.Field:
    return pa.field(name, pa.int64())


def real(name: str) -> pa.Field:
    return pa.field(name, pa.float64())


def flag(name: str) -> pa.Field:
    return pa.field(name, pa.bool_())


def timestamp(name: str) -> pa.Field:
    return pa.field(name, pa.timestamp("us", tz="UTC"))


def strings(name: str) -> pa.Field:
    return pa.field(name, pa.list_(pa.string()))


def json_text(name: str) -> pa.Field:
    """A JSON document stored as a string; write() also accepts dicts and lists."""
    return pa.field(name, pa.string(), metadata={_JSON: b"1"})


def choice(name: str, *options: str) -> pa.Field:
    return pa.field(name, pa.string(), metadata={_CHOICES: ",".join(options).encode()})


RUN_ID = pa.field("run_id", pa.string(), nullable=False)


class TableSpec(NamedTuple):
    schema: pa.Schema
    key: str
    view: str | None = None  # name of the view over all shards, when not the table's name


def _spec(key: str, *fields: pa.Field, view: str | None = None) -> TableSpec:
    schema = pa.schema([pa.field(key, pa.string(), nullable=False), *fields])
    return TableSpec(schema, key, view)


# fmt: off
TABLES: dict[str, TableSpec] = {
    # One row per status change; the `runs` view shows the latest row of each run.
    "runs": _spec(
        "event_id", RUN_ID, integer("iteration"),
        choice("status", "running", "completed", "failed"),
        timestamp("started_at"), timestamp("finished_at"), timestamp("updated_at"),
        json_text("config"), text("constitution_id"), text("policy_model"), text("judge_model"),
        view="run_events",
    ),
    # run_id: the run that first stored this constitution version.
    "constitutions": _spec(
        "constitution_id", RUN_ID, text("name"), text("version"), text("content"), text("path"),
    ),
    # text: a conversation's last user turn; messages: the whole conversation (JSON list of
    # {role, content}), null for a one-turn text prompt.
    "prompts": _spec(
        "prompt_id", RUN_ID, text("text"), text("source"), text("split"), text("category"),
        json_text("messages"),
    ),
    "responses": _spec(
        "response_id", text("prompt_id"), RUN_ID, text("model"), text("text"),
        integer("sample_index"), text("finish_reason"), integer("num_tokens"),
        json_text("sampling"),
    ),
    "critiques": _spec(
        "critique_id", text("response_id"), RUN_ID, text("principle_id"),
        text("constitution_id"), integer("round"), text("input_text"), text("critique"),
        text("revision"), text("model"),
    ),
    "judgments": _spec(
        "judgment_id", text("prompt_id"), RUN_ID, text("response_a_id"),
        text("response_b_id"),  # null for pointwise scoring
        text("principle_id"), text("constitution_id"), text("judge_model"),
        # The judge config's mode names and checks; pairwise and pointwise are what stores
        # written before the config's names were used hold for logprob (alignment/judge_config.py).
        choice(
            "mode", "logprob", "cot", "contrast", "likelihood", "ensemble", "checks",
            "pairwise", "pointwise",
        ),
        real("p_a_first"), real("p_a_second"), real("p_a"), flag("position_consistent"),
        real("option_mass"), text("status"), text("rationale"),
        # contrast modes: each response's principle-conditioned log-likelihood ratio
        real("delta_a"), real("delta_b"),
    ),
    "preference_pairs": _spec(
        "pair_id", text("prompt_id"), text("prompt"), text("chosen"), text("rejected"),
        text("chosen_response_id"), text("rejected_response_id"), real("p_chosen"),
        strings("principle_ids"), strings("judgment_ids"), text("constitution_id"),
        text("policy_model"), text("judge_model"), RUN_ID, integer("iteration"), text("split"),
        json_text("messages"),  # the prompt's conversation, as in `prompts`
    ),
    # "A run's rows": every row a run expects, whichever run stored it first (a row made
    # once is reused by every run that expects it). member_id: "<run_id>/<table>/<row_id>".
    "run_rows": _spec(
        "member_id", RUN_ID, text("table_name"), text("row_id"),
    ),
    "models": _spec(
        "model_id", text("stage"), text("path"), text("base_model"), text("parent_model_id"),
        integer("iteration"), json_text("metrics"), flag("promoted"), RUN_ID,
        timestamp("created_at"),
        # the data it saw: the runs its rows came from, how many, under which constitutions
        strings("data_runs"), integer("examples"), strings("constitution_ids"),
        json_text("config"),
        integer("world_size"),  # processes that trained it together (null: before this column)
        view="model_registrations",  # `models` adds promotions from `iterations`
    ),
    "evals": _spec(
        "eval_id", text("model_id"), text("baseline_model_id"), text("metric"), real("value"),
        integer("n"), real("ci_low"), real("ci_high"), RUN_ID,
    ),
    # One row per metric of one judge evaluation on a labelled preference set
    # (`rlaif judge eval`, and the loop's audit each iteration). run_id: the audit's run.
    "judge_evals": _spec(
        "judge_eval_id", RUN_ID, text("judge_model"), text("judge_config_id"), text("mode"),
        text("dataset"), text("dataset_id"), text("metric"), real("value"), integer("n"),
        json_text("judge_config"), integer("iteration"), text("loop"), timestamp("created_at"),
    ),
    # One row per self-improvement iteration: what was trained from what, how it was
    # judged, and whether it became the incumbent. run_id: the loop session.
    "iterations": _spec(
        "iteration_id", RUN_ID, text("loop"), integer("iteration"), text("method"),
        text("incumbent_model_id"), text("candidate_model_id"), text("data_run_id"),
        text("eval_run_id"),
        text("start_eval_run_id"),  # the candidate against the loop's starting policy
        integer("pairs"),
        choice("decision", "promoted", "rejected", "skipped"), flag("promoted"),
        json_text("gates"),  # [{gate, metric, value, threshold, passed, message}]
        strings("reasons"), timestamp("started_at"), timestamp("finished_at"),
        text("flow_run_id"),
        # loop.merge: every model tried, the trained candidate first:
        # [{model_id, merge: {method, weight} | null, eval_run_id, passed, gates}]; null without
        json_text("tried"),
    ),
    # One row per batch of engine requests a stage sent: what ran it (kind engine | actor |
    # endpoint, ran_on its name), on which node, how many requests, when and for how long;
    # a failed batch (ok false) was retried elsewhere and has a row of its own there.
    "batches": _spec(
        "batch_id", RUN_ID, text("stage"), text("table_name"), text("kind"), text("ran_on"),
        text("node"), integer("requests"), flag("ok"), text("error"),
        timestamp("started_at"), real("seconds"),
    ),
}
# fmt: on

# Views computed from other views, created after the table views.
DERIVED_VIEWS: dict[str, str] = {
    "runs": (
        "SELECT * FROM run_events QUALIFY row_number() OVER "
        "(PARTITION BY run_id ORDER BY updated_at DESC NULLS LAST, event_id DESC) = 1"
    ),
    # A model is promoted once a loop iteration made it the incumbent.
    "models": (
        "SELECT m.* REPLACE (coalesce(m.promoted, false) OR m.model_id IN "
        "(SELECT candidate_model_id FROM iterations WHERE promoted) AS promoted) "
        "FROM model_registrations m"
    ),
}


def table_spec(table: str) -> TableSpec:
    try:
        return TABLES[table]
    except KeyError:
        raise UnknownTable(table, TABLES) from None


def shard_view(table: str) -> str:
    """Name of the view that shows every stored row of `table`."""
    return table_spec(table).view or table


def to_arrow(table: str, rows: Sequence[Mapping[str, Any]], run_id: str) -> pa.Table:
    """Check rows against the table's schema and build an Arrow table.

    Missing nullable columns become null; a missing `run_id` becomes `run_id`.
    Raises SchemaMismatch naming the table, column and problem.
    """
    schema = table_spec(table).schema
    alike = _alike(rows)
    _reject_unknown_columns(table, schema, rows[:1] if alike else rows)
    inferred = _inferred(rows) if alike else None
    columns = {f.name: _column(table, f, rows, run_id, inferred) for f in schema}
    return pa.Table.from_pydict(columns, schema=schema)


def _alike(rows: Sequence[Mapping]) -> bool:
    """Whether every row is a dict with the first row's columns."""
    if not rows or type(rows[0]) is not dict:
        return False
    first = rows[0].keys()
    return all(type(row) is dict and row.keys() == first for row in rows)


def _inferred(rows: Sequence[Mapping]) -> pa.Table | None:
    """The rows as Arrow infers them (fast, in C++), given rows with the same columns; a
    column whose inferred type is the schema's needs no value-by-value check."""
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return None  # mixed kinds in a column: the value-by-value check says where


def _reject_unknown_columns(table: str, schema: pa.Schema, rows: Sequence[Mapping]) -> None:
    known = set(schema.names)
    if all(type(row) is dict and known.issuperset(row) for row in rows):
        return
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SchemaMismatch(table, "*", f"row {i} is a {type(row).__name__}, not a mapping")
        unknown = sorted(set(row) - known)
        if unknown:
            columns = ", ".join(schema.names)
            raise SchemaMismatch(table, unknown[0], f"unknown column (row {i}); columns: {columns}")


def _column(
    table: str, field: pa.Field, rows: Sequence[Mapping], run_id: str, inferred: pa.Table | None
) -> list[Any] | pa.ChunkedArray:
    if inferred is not None and field.name != "run_id" and field.name in inferred.column_names:
        column = inferred.column(field.name)
        if column.type == pa.null() and field.nullable:
            return pa.chunked_array([pa.nulls(len(column), field.type)])
        if _arrow_fits(field, column):
            return column
    values = [row.get(field.name) for row in rows]
    if field.name == "run_id":
        if set(values) <= {None, run_id}:
            return [run_id] * len(values)
    elif _plainly_fits(field, values):
        return values
    # The value-by-value check: the first value that does not fit is named with its row.
    checked = []
    for i, value in enumerate(values):
        try:
            if field.name == "run_id":
                value = _same_run(value, run_id)
            checked.append(_check(field, value))
        except ValueError as e:
            raise SchemaMismatch(table, field.name, f"row {i}: {e}") from None
    return checked


# The exact Python types a column takes as they are. Anything else (a numpy value, a
# subclass, a JSON column) goes through `_check`, which accepts or names what is wrong.
_PLAIN_TYPES: dict[pa.DataType, set[type]] = {
    pa.string(): {str},
    pa.int64(): {int},
    pa.float64(): {float, int},
    pa.bool_(): {bool},
    pa.timestamp("us", tz="UTC"): {datetime},
    pa.list_(pa.string()): {list, tuple},
}


def _arrow_fits(field: pa.Field, column: pa.ChunkedArray) -> bool:
    """`_check` on a column Arrow inferred; False means "check each value"."""
    metadata = field.metadata or {}
    # Arrow reads a naive datetime next to an aware one as UTC; the schema refuses it.
    if _JSON in metadata or column.type != field.type or pa.types.is_timestamp(field.type):
        return False
    if not field.nullable and column.null_count:
        return False
    if pa.types.is_list(field.type):
        return pc.list_flatten(column).null_count == 0
    if _CHOICES in metadata:
        options = pa.array(metadata[_CHOICES].decode().split(","))
        return pc.all(pc.is_in(column.drop_null(), value_set=options)).as_py() is not False
    if pa.types.is_string(field.type) and not field.nullable:
        return not pc.any(pc.equal(column, "")).as_py()
    return True


def _plainly_fits(field: pa.Field, values: list[Any]) -> bool:
    """Whole-column version of `_check` for the common case; False means "check each"."""
    metadata = field.metadata or {}
    plain = _PLAIN_TYPES.get(field.type)
    if plain is None or _JSON in metadata:
        return False
    types = set(map(type, values))
    if type(None) in types:
        if not field.nullable:
            return False
        types.discard(type(None))
        values = [v for v in values if v is not None]
    if not types <= plain:
        return False
    if pa.types.is_list(field.type):
        return all(type(item) is str for value in values for item in value)
    if pa.types.is_timestamp(field.type):
        return all(value.utcoffset() is not None for value in values)
    if _CHOICES in metadata:
        return set(values) <= set(metadata[_CHOICES].decode().split(","))
    return field.nullable or "" not in values


def _same_run(value: Any, run_id: str) -> Any:
    if value is None or value == run_id:
        return run_id
    raise ValueError(f"{value!r} differs from the run_id given to write(), {run_id!r}")


def _check(field: pa.Field, value: Any) -> Any:
    """The value to store, or ValueError saying why it does not fit `field`."""
    if value is None:
        if not field.nullable:
            raise ValueError("missing; this column is required")
        return None
    metadata = field.metadata or {}
    if _JSON in metadata:
        return _json_string(value)
    expected = _expected(field.type, value)
    if expected:
        raise ValueError(f"expected {expected}, got {type(value).__name__} {_short(value)}")
    if _CHOICES in metadata:
        options = metadata[_CHOICES].decode().split(",")
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(options)}")
    if not field.nullable and value == "":
        raise ValueError("empty string; this column is required")
    return value


def _expected(type_: pa.DataType, value: Any) -> str | None:
    """What `type_` needs, when `value` is not that; None when it fits."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        return None if pa.types.is_boolean(type_) else _describe(type_)
    if pa.types.is_string(type_):
        ok = isinstance(value, str)
    elif pa.types.is_integer(type_):
        ok = isinstance(value, numbers.Integral)
    elif pa.types.is_floating(type_):
        ok = isinstance(value, numbers.Real)
    elif pa.types.is_timestamp(type_):
        if isinstance(value, datetime) and value.utcoffset() is None:
            return "a timezone-aware datetime (naive datetimes are ambiguous; use UTC)"
        ok = isinstance(value, datetime)
    elif pa.types.is_list(type_):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, bool)
    return None if ok else _describe(type_)


def _is_numpy_bool(value: Any) -> bool:
    return getattr(value, "dtype", None) == "bool"


def _describe(type_: pa.DataType) -> str:
    names = {"string": "a string", "int64": "an integer", "double": "a number", "bool": "a bool"}
    if pa.types.is_timestamp(type_):
        return "a timezone-aware datetime"
    if pa.types.is_list(type_):
        return "a list of strings"
    return names.get(str(type_), str(type_))


def _json_string(value: Any) -> str:
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError as e:
            raise ValueError(f"not valid JSON ({e}): {_short(value)}") from None
        return value
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot be stored as JSON: {e}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
