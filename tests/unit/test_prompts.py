"""Seed prompts: the shipped set, file sources, split assignment, errors and limit."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignment.prompts import (
    BUILTIN_PATH,
    MAX_PROMPT_CHARS,
    PromptSourceError,
    SeedPrompt,
    hash_split,
    load_prompts,
    prompt_stats,
    read_prompts,
)


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def texts(prompts: list[SeedPrompt]) -> list[str]:
    return [p.text for p in prompts]


# --- the shipped set ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin() -> list[SeedPrompt]:
    return load_prompts()


def test_builtin_size_and_no_duplicates(builtin: list[SeedPrompt]) -> None:
    raw = [json.loads(line) for line in BUILTIN_PATH.read_text(encoding="utf-8").splitlines()]
    assert len(builtin) >= 220
    assert len(builtin) == len(raw)  # nothing dropped as empty or duplicate
    assert len({row["text"].strip().lower() for row in raw}) == len(raw)


def test_builtin_rows_are_well_formed(builtin: list[SeedPrompt]) -> None:
    for p in builtin:
        assert p.source == "seed"
        assert p.group in {"everyday", "redteam"}, p.category
        assert 5 <= len(p.text.split()) <= 40, p.text


def test_builtin_split_mix(builtin: list[SeedPrompt]) -> None:
    by_group_split = Counter((p.group, p.split) for p in builtin)
    for key in [(g, s) for g in ("everyday", "redteam") for s in ("train", "eval")]:
        assert by_group_split[key] > 0, key
    eval_share = sum(p.split == "eval" for p in builtin) / len(builtin)
    assert 0.15 <= eval_share <= 0.25
    redteam_share = sum(p.group == "redteam" for p in builtin) / len(builtin)
    assert 0.3 <= redteam_share <= 0.5


def test_builtin_every_category_has_eval(builtin: list[SeedPrompt]) -> None:
    categories = {p.category for p in builtin}
    eval_categories = {p.category for p in builtin if p.split == "eval"}
    assert eval_categories == categories


def test_prompt_stats(builtin: list[SeedPrompt]) -> None:
    stats = prompt_stats(builtin)
    assert stats["total"] == len(builtin)
    assert stats["by_split"]["train"] + stats["by_split"]["eval"] == len(builtin)
    assert set(stats["by_group"]) == {"everyday", "redteam"}
    assert sum(stats["by_group_split"].values()) == len(builtin)


# --- file sources ------------------------------------------------------------------------


def test_jsonl_fields_blank_lines_strip_and_dedupe(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"text": "  first  ", "split": "train", "category": "a/b"},
            "",
            {"prompt": "second", "split": "eval"},
            {"text": "first", "split": "eval"},
            {"text": "third", "split": "test"},
            {"prompt": "second "},
        ],
    )
    prompts = load_prompts(path)
    assert prompts == [
        SeedPrompt("first", "train", "file", "a/b"),
        SeedPrompt("second", "eval", "file"),
        SeedPrompt("third", "eval", "file"),
    ]
    read = read_prompts(path)
    assert (read.prompts, read.duplicates, read.first_duplicate) == (prompts, 2, f"{path}:4")
    assert read.duplicates_warning() == f"{path}: 2 duplicate prompts dropped (first at line 4)"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": "fine"}, {"text": "   "}], ":2: field 'text' is empty; a prompt needs text"),
        ([{"text": "fine"}, {"text": None}], ":2: field 'text' is empty; a prompt needs text"),
        ([{"text": 42}], ":1: field 'text' must be a string or a list of messages, got int"),
        ([], ": no prompts (it is empty, or has only blank lines)"),
        (["", "  "], ": no prompts (it is empty, or has only blank lines)"),
    ],
)
def test_empty_and_blank_prompts_are_refused(tmp_path: Path, rows: list, message: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PromptSourceError) as err:
        load_prompts(path)
    assert str(err.value) == f"{path}{message}"


def test_a_prompt_over_the_length_limit_is_refused_at_its_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"text": "x" * 1_000_000}])
    with pytest.raises(PromptSourceError) as err:
        load_prompts(path)
    assert str(err.value) == (
        f"{path}:2: field 'text' is 1,000,000 characters; a prompt must be at most "
        f"{MAX_PROMPT_CHARS:,}"
    )


def test_duplicates_in_a_table_are_counted_by_row(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "a"]}), path)
    assert read_prompts(path).duplicates_warning() == (
        f"{path}: 1 duplicate prompt dropped (first at row 3)"
    )


def test_jsonl_custom_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "hello there", "part": "eval"}])
    prompts = load_prompts(str(path), text_field="q", split_field="part")
    assert prompts == [SeedPrompt("hello there", "eval", "file")]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = pa.table({"text": ["a", "b", "a"], "split": ["train", None, "eval"]})
    pq.write_table(table, path)
    prompts = load_prompts(path)
    assert texts(prompts) == ["a", "b"]
    assert prompts[0].split == "train"
    assert prompts[1].split == hash_split("b", 0.2)


def test_dataset_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"prompt": ["x", "y"], "split": ["eval", "train"]}).save_to_disk(
        str(folder)
    )
    prompts = load_prompts(folder)
    assert [(p.text, p.split) for p in prompts] == [("x", "eval"), ("y", "train")]


def test_dataset_dict_folder_maps_split_names(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    dd = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"text": ["t1"]}),
            "train": datasets.Dataset.from_dict({"text": ["r1", "r2"], "split": ["eval", None]}),
            "validation": datasets.Dataset.from_dict({"text": ["v1"]}),
        }
    )
    dd.save_to_disk(str(folder))
    prompts = load_prompts(folder)
    assert [(p.text, p.split) for p in prompts] == [
        ("r1", "train"),  # the DatasetDict split decides over a split column
        ("r2", "train"),
        ("t1", "eval"),
        ("v1", "eval"),
    ]


def test_dataset_dict_unknown_split_is_an_error(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict({"extra": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(
        str(folder)
    )
    with pytest.raises(PromptSourceError, match=r"split\(s\) \['extra'\]"):
        load_prompts(folder)


# --- split assignment --------------------------------------------------------------------


def test_hash_split_is_fixed_and_follows_fraction() -> None:
    # sha256("hello") starts 2cf24dba: 0x2cf24dba / 2**32 = 0.176
    assert hash_split("hello", 0.2) == "eval"
    assert hash_split("hello", 0.17) == "train"
    assert hash_split("anything", 0.0) == "train"
    assert hash_split("anything", 1.0) == "eval"


def test_unsplit_rows_are_deterministic_and_near_fraction(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": f"prompt number {i}"} for i in range(2000)])
    first, second = load_prompts(path), load_prompts(path)
    assert first == second
    share = sum(p.split == "eval" for p in first) / len(first)
    assert 0.17 <= share <= 0.23
    assert all(p.split == hash_split(p.text, 0.2) for p in first)


# --- errors ------------------------------------------------------------------------------


def test_bad_json_names_path_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, "", "{not json"])
    with pytest.raises(PromptSourceError) as err:
        load_prompts(path)
    assert str(err.value).startswith(f"{path}:3: invalid JSON")


def test_missing_field_names_path_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "ok"}, {"question": "where?"}])
    with pytest.raises(PromptSourceError) as err:
        load_prompts(path)
    assert (
        str(err.value)
        == f"{path}:2: no 'text' field (nor 'prompt' or 'messages'); fields: question"
    )


def test_non_object_and_bad_types(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ["[1, 2]"])
    with pytest.raises(
        PromptSourceError, match=rf"^{re.escape(str(path))}:1: expected a JSON object, got list"
    ):
        load_prompts(path)
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": 3}])
    with pytest.raises(
        PromptSourceError, match=rf"^{re.escape(str(path))}:1: field 'text' must be a string"
    ):
        load_prompts(path)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "split": "holdout"}])
    with pytest.raises(
        PromptSourceError, match=rf"^{re.escape(str(path))}:1: field 'split' is 'holdout'"
    ):
        load_prompts(path)


def test_parquet_error_names_row(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(
        PromptSourceError, match=rf"^{re.escape(str(path))}: row 1: no 'text' field"
    ):
        load_prompts(path)


def test_unknown_sources_name_accepted_forms(tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    csv.write_text("text\nhi\n")
    for source, what in [
        (csv, "unsupported file type '.csv'"),
        (tmp_path / "missing.jsonl", "no such file or folder"),
        (tmp_path, "folder is not a saved datasets Dataset"),
    ]:
        with pytest.raises(PromptSourceError) as err:
            load_prompts(source)
        message = str(err.value)
        assert message.startswith(f"{source}: {what}")
        assert ".jsonl" in message and ".parquet" in message and "save_to_disk" in message


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        load_prompts(eval_fraction=1.5)
    with pytest.raises(ValueError, match="limit"):
        load_prompts(limit=-1)


# --- limit -------------------------------------------------------------------------------


def mixed_file(tmp_path: Path, n_train: int, n_eval: int) -> Path:
    rows = [{"text": f"t{i}", "split": "train"} for i in range(n_train)]
    rows += [{"text": f"e{i}", "split": "eval"} for i in range(n_eval)]
    rows.sort(key=lambda r: int(r["text"][1:]))  # interleave: t0 e0 t1 e1 ...
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_limit_splits_by_fraction_in_file_order(tmp_path: Path) -> None:
    prompts = load_prompts(mixed_file(tmp_path, 20, 20), limit=10)
    assert texts(prompts) == ["t0", "e0", "t1", "e1", "t2", "t3", "t4", "t5", "t6", "t7"]


def test_limit_keeps_both_splits_when_small(tmp_path: Path) -> None:
    prompts = load_prompts(mixed_file(tmp_path, 5, 5), limit=2)
    assert texts(prompts) == ["t0", "e0"]
    assert texts(load_prompts(mixed_file(tmp_path, 5, 5), limit=1)) == ["t0"]


def test_limit_fills_from_the_other_split(tmp_path: Path) -> None:
    few_eval = load_prompts(mixed_file(tmp_path, 20, 1), limit=10)
    assert Counter(p.split for p in few_eval) == {"train": 9, "eval": 1}
    few_train = load_prompts(mixed_file(tmp_path, 1, 20), limit=10)
    assert Counter(p.split for p in few_train) == {"train": 1, "eval": 9}


def test_limit_larger_than_source_and_zero(tmp_path: Path) -> None:
    path = mixed_file(tmp_path, 3, 2)
    assert len(load_prompts(path, limit=100)) == 5
    assert load_prompts(path, limit=0) == []


def test_builtin_limit_keeps_both_splits() -> None:
    prompts = load_prompts(limit=20)
    assert Counter(p.split for p in prompts) == {"train": 16, "eval": 4}


def test_a_file_that_is_not_utf8_is_refused_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PromptSourceError) as caught:
        load_prompts(str(path))
    assert str(caught.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at column 14)"
