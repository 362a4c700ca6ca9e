"""SPIN's pure parts (alignment/spin.py): the shipped references, the file format, the
pairs and the stop rule."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from alignment.evaluation import Metric
from alignment.spin import (
    Answer,
    SpinConfig,
    load_references,
    spin_pairs,
    split_references,
    stop_reason,
)
from alignment.yaml_spec import SpecError


def test_the_shipped_references_have_both_splits_and_some_refusals() -> None:
    refs = load_references("builtin-spin")
    assert 40 <= len(refs) <= 60
    assert len({r.prompt for r in refs}) == len(refs)
    splits = Counter(r.split for r in refs)
    assert splits["eval"] >= 10 and splits["train"] >= 30
    refusals = [r for r in refs if r.completion.startswith(("I can't", "I'm really sorry"))]
    assert 5 <= len(refusals) <= 10  # mostly everyday answers, a few safe refusals
    assert all(len(r.completion.split()) <= 80 for r in refs)


def test_a_trl_prompt_completion_file_standard_or_conversational(tmp_path: Path) -> None:
    path = tmp_path / "refs.jsonl"
    rows = [
        {"prompt": "Hi?", "completion": "Hello.", "split": "test"},
        {
            "prompt": [{"role": "user", "content": "Why?"}],
            "completion": [{"role": "assistant", "content": "Because."}],
            "split": "train",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refs = load_references(str(path))
    assert [(r.prompt, r.completion, r.split) for r in refs] == [
        ("Hi?", "Hello.", "eval"),
        ("Why?", "Because.", "train"),
    ]


def test_bad_reference_rows_are_refused_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "refs.jsonl"
    path.write_text(
        '{"prompt": "ok", "completion": "fine"}\n{"prompt": "no answer"}\n'
        '{"prompt": "a", "completion": "  "}\n[1]\n{"prompt": "b", "completion": "c", '
        '"split": "dev"}\n'
    )
    with pytest.raises(SpecError) as err:
        load_references(str(path))
    assert str(err.value).splitlines() == [
        f"{path}:2: missing column 'completion'",
        f"{path}:3: 'completion' must be a non-empty text",
        f"{path}:4: expected a JSON object, got list",
        f"{path}:5: split must be train or eval, got 'dev'",
    ]


def test_a_missing_reference_file_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="reference set 'nope.jsonl' does not exist"):
        SpinConfig(references="nope.jsonl")
    assert SpinConfig(references="critiques").references == "critiques"


def test_critique_revisions_give_one_reference_per_prompt() -> None:
    refs = split_references([("p", "first"), ("p", "second"), ("q", ""), ("r", "x")], 0.5)
    assert [(r.prompt, r.completion) for r in refs] == [("p", "first"), ("r", "x")]
    assert {r.split for r in refs} <= {"train", "eval"}


def test_pairs_put_the_reference_over_the_own_sample_and_skip_identical_ones() -> None:
    prompts = {"p1": "Q1", "p2": "Q2"}
    refs = {"p1": Answer("ref1", "Good answer."), "p2": Answer("ref2", "Same.")}
    own = {"p1": Answer("own1", "meh"), "p2": Answer("own2", " Same. ")}
    pairs = spin_pairs(prompts, refs, own)
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair["chosen"], pair["rejected"]) == ("Good answer.", "meh")
    assert (pair["chosen_response_id"], pair["rejected_response_id"]) == ("ref1", "own1")
    assert pair["p_chosen"] == 1.0 and pair["split"] == "train"
    assert spin_pairs(prompts, refs, own)[0]["pair_id"] == pair["pair_id"]  # content id


@pytest.mark.parametrize(
    ("low", "high", "stops"),
    [(0.41, 0.63, True), (0.5, 0.9, True), (0.55, 0.9, False), (0.1, 0.45, False)],
)
def test_the_loop_stops_when_the_interval_includes_one_half(
    low: float, high: float, stops: bool
) -> None:
    reason = stop_reason(Metric("spin/reference_win_rate", (low + high) / 2, 40, low, high))
    assert (reason is not None) == stops
    if stops:
        assert reason.startswith("judge can no longer tell references from samples: win rate")
        assert f"[{low:.2f}, {high:.2f}] includes 0.5 (n=40)" in reason
