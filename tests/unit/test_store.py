"""The store against real Parquet files and a real DuckDB file in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import (
    TABLES,
    QueryError,
    SchemaMismatch,
    Store,
    StoreLocked,
    StoreNotFound,
    UnknownTable,
    sql,
)
from storage import views as views_module

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
RUN = "run-1"

SAMPLES: dict[str, dict[str, Any]] = {
    "runs": {
        "event_id": "e1", "run_id": RUN, "iteration": 0, "status": "running",
        "started_at": NOW, "finished_at": None, "updated_at": NOW, "config": '{"lr": 0.1}',
        "constitution_id": "c1", "policy_model": "tiny", "judge_model": "tiny-judge",
    },
    "constitutions": {
        "constitution_id": "c1", "run_id": RUN, "name": "harmless", "version": "1",
        "content": "Be kind.", "path": "constitutions/harmless.yaml",
    },
    "prompts": {
        "prompt_id": "p1", "run_id": RUN, "text": "Hi?", "source": "seed", "split": "train",
        "category": "chat", "messages": None,
    },
    "responses": {
        "response_id": "r1", "prompt_id": "p1", "run_id": RUN, "model": "tiny", "text": "Hello",
        "sample_index": 0, "finish_reason": "stop", "num_tokens": 2,
        "sampling": '{"temperature": 0.7}',
    },
    "critiques": {
        "critique_id": "k1", "response_id": "r1", "run_id": RUN, "principle_id": "kind",
        "constitution_id": "c1", "round": 1, "input_text": "Hello", "critique": "Fine",
        "revision": "Hello!", "model": "tiny",
    },
    "judgments": {
        "judgment_id": "j1", "prompt_id": "p1", "run_id": RUN, "response_a_id": "r1",
        "response_b_id": None, "principle_id": "kind", "constitution_id": "c1",
        "judge_model": "tiny-judge", "mode": "pointwise", "p_a_first": 0.6, "p_a_second": 0.7,
        "p_a": 0.65, "position_consistent": True, "option_mass": None, "status": "ok",
        "rationale": None, "delta_a": None, "delta_b": None,
    },
    "preference_pairs": {
        "pair_id": "pp1", "prompt_id": "p1", "prompt": "Hi?", "chosen": "Hello!",
        "rejected": "Go away", "chosen_response_id": "r1", "rejected_response_id": "r2",
        "p_chosen": 0.9, "principle_ids": ["kind", "honest"], "judgment_ids": ["j1"],
        "constitution_id": "c1", "policy_model": "tiny", "judge_model": "tiny-judge",
        "run_id": RUN, "iteration": 0, "split": "train",
        "messages": '[{"role":"user","content":"Hi?"}]',
    },
    "models": {
        "model_id": "m1", "stage": "dpo", "path": "/models/m1", "base_model": "tiny",
        "parent_model_id": None, "iteration": 1, "metrics": '{"loss": 0.5}', "promoted": False,
        "run_id": RUN, "created_at": NOW, "data_runs": [RUN], "examples": 8,
        "constitution_ids": ["c1"], "config": '{"beta": 0.1}', "world_size": 1,
    },
    "evals": {
        "eval_id": "v1", "model_id": "m1", "baseline_model_id": "m0", "metric": "win_rate",
        "value": 0.6, "n": 100, "ci_low": 0.5, "ci_high": 0.7, "run_id": RUN,
    },
    "judge_evals": {
        "judge_eval_id": "je1", "run_id": RUN, "judge_model": "tiny", "judge_config_id": "jc1",
        "mode": "contrast", "dataset": "builtin", "dataset_id": "d1", "metric": "accuracy",
        "value": 0.7, "n": 48, "judge_config": '{"mode": "contrast"}', "iteration": 1,
        "loop": "demo", "created_at": NOW,
    },
    "run_rows": {
        "member_id": "run-1/judgments/j1", "run_id": "run-1", "table_name": "judgments",
        "row_id": "j1",
    },
    "iterations": {
        "iteration_id": "i1", "run_id": RUN, "loop": "demo", "iteration": 1, "method": "dpo",
        "incumbent_model_id": "tiny", "candidate_model_id": "m1", "data_run_id": RUN,
        "eval_run_id": "e1", "start_eval_run_id": "e0", "pairs": 8, "decision": "promoted",
        "promoted": True,
        "gates": '[{"gate": "kl", "passed": true}]', "reasons": [], "started_at": NOW,
        "finished_at": NOW, "flow_run_id": None, "tried": None,
    },
    "batches": {
        "batch_id": "b1", "run_id": RUN, "stage": "sample", "table_name": "responses",
        "kind": "actor", "ran_on": "actor-0", "node": "127.0.0.1", "requests": 8, "ok": True,
        "error": None, "started_at": NOW, "seconds": 1.5,
    },
}  # fmt: skip


def prompt(i: int, **extra: Any) -> dict[str, Any]:
    return {"prompt_id": f"p{i}", "text": f"prompt {i}", "source": "seed", **extra}


def shards(store: Store, table: str) -> list[Path]:
    return sorted((store.root / "parquet" / table).rglob("*.parquet"))


def all_files(store: Store) -> list[Path]:
    return sorted(p for p in (store.root / "parquet").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def test_samples_cover_every_table() -> None:
    assert set(SAMPLES) == set(TABLES)
    for table, (schema, _key, _view) in TABLES.items():
        assert set(SAMPLES[table]) == set(schema.names), table


@pytest.mark.parametrize("table", list(TABLES))
def test_write_then_read_back(store: Store, table: str) -> None:
    row = SAMPLES[table]
    result = store.write(table, [row], RUN)
    assert (result.written, result.skipped) == (1, 0)
    assert result.path is not None and result.path.parent.name == table
    assert store.query(f"SELECT * FROM {table}") == [row]
    assert store.count(table) == 1
    assert pq.read_table(result.path).column("run_id").to_pylist() == [RUN]


def test_init_creates_nothing(tmp_path: Path) -> None:
    Store(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_ensure_is_idempotent(store: Store) -> None:
    store.ensure()
    store.ensure()
    assert store.db_path.is_file()
    assert all((store.root / "parquet" / t).is_dir() for t in TABLES)


def test_second_identical_write_writes_nothing(store: Store) -> None:
    rows = [prompt(1), prompt(2)]
    store.write("prompts", rows, RUN)
    before = all_files(store)
    result = store.write("prompts", rows, "run-2")
    assert (result.path, result.written, result.skipped) == (None, 0, 2)
    assert all_files(store) == before
    assert store.count("prompts") == 2


def test_partial_overlap_writes_only_new_rows(store: Store) -> None:
    store.write("prompts", [prompt(1), prompt(2)], RUN)
    result = store.write("prompts", [prompt(2), prompt(3)], RUN)
    assert (result.written, result.skipped) == (1, 1)
    assert pq.read_table(result.path).column("prompt_id").to_pylist() == ["p3"]
    ids = [r["prompt_id"] for r in store.query("SELECT prompt_id FROM prompts ORDER BY 1")]
    assert ids == ["p1", "p2", "p3"]


def test_keys_repeated_within_a_batch_keep_the_first(store: Store) -> None:
    rows = [prompt(1, text="first"), prompt(1, text="second"), prompt(2)]
    result = store.write("prompts", rows, RUN)
    assert (result.written, result.skipped) == (2, 1)
    assert store.query("SELECT text FROM prompts WHERE prompt_id = 'p1'") == [{"text": "first"}]


def test_existing_keys(store: Store) -> None:
    assert store.existing_keys("prompts", ["p1"]) == set()
    store.write("prompts", [prompt(1), prompt(2)], RUN)
    assert store.existing_keys("prompts", ["p1", "p3", "p1"]) == {"p1"}
    assert store.existing_keys("prompts", []) == set()


def test_empty_rows_touch_nothing(store: Store) -> None:
    assert store.write("prompts", [], RUN).written == 0
    assert not store.root.exists()


def test_no_temp_files_left(store: Store) -> None:
    store.write("prompts", [prompt(1)], RUN)
    store.write("prompts", [prompt(2)], RUN)
    names = [p.name for p in all_files(store)]
    assert len(names) == 2 and all(n.startswith("part-") and n.endswith(".parquet") for n in names)


def test_crash_before_rename_leaves_no_partial_shard(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("prompts", [prompt(1)], RUN)
    before = all_files(store)

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        store.write("prompts", [prompt(2)], RUN)
    monkeypatch.undo()
    assert all_files(store) == before
    assert store.count("prompts") == 1
    assert store.write("prompts", [prompt(2)], RUN).written == 1


def test_empty_tables_have_typed_views(store: Store) -> None:
    store.ensure()
    for table in [*TABLES, "run_events"]:
        assert store.query(f"SELECT count(*) AS n FROM {table}") == [{"n": 0}]
    types = {r["column_name"]: r["column_type"] for r in store.query("DESCRIBE preference_pairs")}
    assert types["principle_ids"] == "VARCHAR[]"
    assert types["p_chosen"] == "DOUBLE"
    assert types["iteration"] == "BIGINT"
    runs = {r["column_name"]: r["column_type"] for r in store.query("DESCRIBE runs")}
    assert runs["started_at"] == "TIMESTAMP WITH TIME ZONE"
    judgments = store.query_arrow("SELECT * FROM judgments")
    assert judgments.num_rows == 0
    assert judgments.schema.field("position_consistent").type == pa.bool_()


def test_views_keep_schema_columns_and_order_once_shards_exist(store: Store) -> None:
    store.write("judgments", [SAMPLES["judgments"]], RUN)
    names = [r["column_name"] for r in store.query("DESCRIBE judgments")]
    assert names == TABLES["judgments"].schema.names


def test_old_shards_missing_a_column_stay_readable(store: Store) -> None:
    store.write("prompts", [prompt(1, category="chat")], RUN)
    # as written before `category` existed
    old = pa.table({"prompt_id": ["p0"], "text": ["old"], "run_id": [RUN]})
    pq.write_table(old, shards(store, "prompts")[0].parent / "part-old.parquet")
    store.write("prompts", [prompt(2)], "run-2")  # a merge of both keeps them apart
    store.compact("prompts")
    rows = store.query("SELECT prompt_id, run_id, category FROM prompts ORDER BY prompt_id")
    assert rows == [
        {"prompt_id": "p0", "run_id": RUN, "category": None},
        {"prompt_id": "p1", "run_id": RUN, "category": "chat"},
        {"prompt_id": "p2", "run_id": "run-2", "category": None},
    ]


def test_runs_view_shows_latest_status(store: Store) -> None:
    base = SAMPLES["runs"]
    store.write("runs", [base], RUN)
    done = {**base, "event_id": "e2", "status": "completed", "finished_at": NOW,
            "updated_at": NOW + timedelta(minutes=5)}  # fmt: skip
    store.write("runs", [done], RUN)
    store.write("runs", [{**base, "event_id": "e3", "run_id": "run-2"}], "run-2")
    latest = store.query("SELECT run_id, status FROM runs ORDER BY run_id")
    assert latest == [
        {"run_id": RUN, "status": "completed"},
        {"run_id": "run-2", "status": "running"},
    ]
    assert store.count("runs") == 2
    assert store.query("SELECT count(*) AS n FROM run_events") == [{"n": 3}]


def test_json_and_list_values(store: Store) -> None:
    row = {**SAMPLES["preference_pairs"], "principle_ids": ("a", "b")}
    store.write("preference_pairs", [row], RUN)
    store.write("models", [{**SAMPLES["models"], "metrics": {"loss": 0.5, "acc": 1}}], RUN)
    assert store.query("SELECT principle_ids FROM preference_pairs") == [
        {"principle_ids": ["a", "b"]}
    ]
    assert store.query("SELECT metrics->>'acc' AS acc FROM models") == [{"acc": "1"}]


@pytest.mark.parametrize(
    ("table", "change", "column", "problem"),
    [
        ("prompts", {"colour": "red"}, "colour", "unknown column"),
        ("prompts", {"prompt_id": None}, "prompt_id", "required"),
        ("responses", {"num_tokens": "2"}, "num_tokens", "expected an integer, got str"),
        ("responses", {"num_tokens": 2.5}, "num_tokens", "expected an integer, got float"),
        ("responses", {"sample_index": True}, "sample_index", "expected an integer, got bool"),
        ("responses", {"text": 3}, "text", "expected a string, got int"),
        ("responses", {"sampling": "{oops"}, "sampling", "not valid JSON"),
        ("judgments", {"p_a": "high"}, "p_a", "expected a number"),
        ("judgments", {"mode": "vibes"}, "mode", "'vibes' is not one of logprob"),
        ("preference_pairs", {"principle_ids": "kind"}, "principle_ids", "a list of strings"),
        ("runs", {"started_at": NOW.replace(tzinfo=None)}, "started_at", "timezone-aware"),
        ("runs", {"run_id": "other"}, "run_id", "differs from the run_id given to write"),
    ],
)
def test_schema_mismatch(
    store: Store, table: str, change: dict[str, Any], column: str, problem: str
) -> None:
    with pytest.raises(SchemaMismatch, match=problem) as info:
        store.write(table, [SAMPLES[table], {**SAMPLES[table], **change}], RUN)
    assert (info.value.table, info.value.column) == (table, column)
    assert str(info.value).startswith(f"{table}.{column}: ")
    if change.get(column) is not None and column != "colour":
        assert ": row 1: " in str(info.value)  # the bad value is named by its row
    assert not store.root.exists()


def test_values_off_the_whole_column_path_are_still_accepted(store: Store) -> None:
    """A column of plain Python values is checked at once; numpy values, str subclasses
    and None in nullable columns take the value-by-value path and are stored the same."""
    import numpy as np

    class Name(str):
        pass

    base = SAMPLES["responses"]
    rows = [
        {**base, "response_id": "r1", "num_tokens": np.int64(3), "text": Name("hi")},
        {**base, "response_id": "r2", "num_tokens": 4, "text": "there"},
    ]
    store.write("responses", rows, RUN)
    assert store.query("SELECT num_tokens, text FROM responses ORDER BY response_id") == [
        {"num_tokens": 3, "text": "hi"},
        {"num_tokens": 4, "text": "there"},
    ]


def test_missing_nullable_columns_become_null(store: Store) -> None:
    store.write("prompts", [{"prompt_id": "p1"}], RUN)
    assert store.query("SELECT run_id, text FROM prompts") == [{"run_id": RUN, "text": None}]


@pytest.mark.parametrize("run_id", ["", "a/b", "run_id=x", "../up"])
def test_bad_run_id(store: Store, run_id: str) -> None:
    with pytest.raises(SchemaMismatch, match="not a valid run id"):
        store.write("prompts", [prompt(1)], run_id)


def test_unknown_table(store: Store) -> None:
    for call in (
        lambda: store.write("nope", [prompt(1)], RUN),
        lambda: store.count("nope"),
        lambda: store.existing_keys("nope", ["x"]),
    ):
        with pytest.raises(UnknownTable, match="Unknown table 'nope'; tables are: runs"):
            call()


@pytest.mark.parametrize(
    "statement",
    ["CREATE TABLE t (a INT)", "INSERT INTO prompts VALUES ('x')", "DROP VIEW prompts"],
)
def test_read_only_sql_refuses_writes(store: Store, statement: str) -> None:
    store.write("prompts", [prompt(1)], RUN)
    with pytest.raises(QueryError, match="read-only|Catalog Error"):
        sql(store.db_path, statement)
    with pytest.raises(QueryError):
        store.query(statement)
    assert store.count("prompts") == 1


def test_sql_returns_names_and_rows(store: Store) -> None:
    store.write("prompts", [prompt(1), prompt(2)], RUN)
    names, rows = sql(store.root, "SELECT prompt_id, text FROM prompts ORDER BY 1")
    assert names == ["prompt_id", "text"]
    assert rows == [("p1", "prompt 1"), ("p2", "prompt 2")]
    with pytest.raises(QueryError, match="Parser Error"):
        sql(store.db_path, "SELEC 1")


def test_query_params(store: Store) -> None:
    store.write("prompts", [prompt(1), prompt(2)], RUN)
    assert store.query("SELECT prompt_id FROM prompts WHERE text = ?", ["prompt 2"]) == [
        {"prompt_id": "p2"}
    ]


def test_second_connection_sees_all_tables(store: Store) -> None:
    store.write("prompts", [prompt(1)], RUN)
    assert not Path(f"{store.db_path}.wal").exists()
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        views = {name for (name,) in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
        assert {*TABLES, "run_events"} <= views
        assert con.execute("SELECT count(*) FROM prompts").fetchone() == (1,)
    finally:
        con.close()


def test_open_reader_blocks_only_writes_that_change_a_view(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write("prompts", [prompt(1)], RUN)
    monkeypatch.setattr(views_module, "OPEN_RETRY_S", 0.1)
    reader = duckdb.connect(str(store.db_path), read_only=True)
    try:
        assert store.write("prompts", [prompt(2)], RUN).written == 1  # views unchanged
        with pytest.raises(StoreLocked, match="retry when it is done"):
            store.write("evals", [SAMPLES["evals"]], RUN)  # first evals shard: view changes
        assert reader.execute("SELECT count(*) FROM prompts").fetchone() == (2,)
    finally:
        reader.close()
    store.ensure()
    assert store.count("evals") == 1


def test_other_process_reads_while_no_writer_holds_the_file(store: Store) -> None:
    store.write("prompts", [prompt(1)], RUN)
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(con.execute('SELECT count(*) FROM prompts').fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.db_path)], capture_output=True, text=True
    )
    assert (out.returncode, out.stdout.strip()) == (0, "1"), out.stderr


def test_a_reading_store_neither_blocks_writers_nor_misses_their_views(store: Store) -> None:
    """query() keeps its sandbox open between calls; it must hold no lock on the db file,
    and must see a view that another process's write changed (a table's first shard)."""
    store.write("prompts", [prompt(1)], RUN)
    assert store.count("prompts") == 1  # the sandbox is open from here on
    assert store.count("responses") == 0
    code = (
        "import sys\n"
        "from storage import Store\n"
        "from tests.unit.test_store import SAMPLES\n"
        "Store(sys.argv[1]).write('responses', [SAMPLES['responses']], 'run-1')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.root)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert store.count("responses") == 1
    assert store.count("prompts") == 1


def test_a_table_whose_shards_are_gone_fails_alone(store: Store) -> None:
    """Views are bound when queried: a table with no files left (deleted by hand, or a
    crash test) breaks the queries that read it, not the others."""
    store.write("prompts", [prompt(1)], RUN)
    store.write("responses", [SAMPLES["responses"]], RUN)
    assert store.count("responses") == 1
    for shard in (store.root / "parquet" / "responses").glob("*.parquet"):
        shard.unlink()
    assert store.count("prompts") == 1
    with pytest.raises(QueryError, match="No files found"):
        store.count("responses")
    assert store.count("prompts") == 1


def test_views_use_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Store("relative").write("prompts", [prompt(1)], RUN)
    monkeypatch.chdir("/")
    assert sql(tmp_path / "relative" / "rlaif.duckdb", "SELECT count(*) FROM prompts")[1] == [(1,)]


def test_concurrent_writers_store_each_key_once(store: Store) -> None:
    rows = [prompt(i) for i in range(20)]
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            Store(store.root).write("prompts", rows[offset:] + rows[:offset], RUN)
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i * 5,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count("prompts") == 20


def test_store_not_found(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound, match="Run `rlaif run` or `rlaif demo` first"):
        Store(tmp_path).query("SELECT 1")
    with pytest.raises(StoreNotFound):
        sql(tmp_path / "missing.duckdb", "SELECT 1")
    with pytest.raises(StoreNotFound):
        Store(tmp_path).count("prompts")


def test_models_view_marks_models_promoted_by_an_iteration(store: Store) -> None:
    store.write("models", [SAMPLES["models"], {**SAMPLES["models"], "model_id": "m2"}], RUN)
    assert store.query("SELECT model_id FROM models WHERE promoted") == []
    store.write("iterations", [SAMPLES["iterations"]], RUN)
    assert store.query("SELECT model_id FROM models WHERE promoted") == [{"model_id": "m1"}]
    assert store.count("models") == 2


def test_a_store_from_an_older_version_gets_its_new_views_on_first_read(store: Store) -> None:
    import duckdb

    store.write("prompts", [prompt(1)], RUN)
    with duckdb.connect(str(store.db_path)) as con:  # as a version without `iterations` left it
        con.execute("DROP VIEW models")
        con.execute("DROP VIEW iterations")
    assert store.query("SELECT count(*) AS n FROM iterations") == [{"n": 0}]
    assert store.count("prompts") == 1


def test_an_unknown_table_is_still_an_error(store: Store) -> None:
    store.write("prompts", [prompt(1)], RUN)
    with pytest.raises(QueryError, match="nope"):
        store.query("SELECT * FROM nope")
