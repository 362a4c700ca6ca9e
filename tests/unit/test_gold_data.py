"""Shape of the hand-written gold preference set used to audit AI judges."""

import json
from collections import Counter
from pathlib import Path

import pytest

from alignment.constitution import load_constitution

REPO = Path(__file__).resolve().parents[2]
GOLD = REPO / "alignment" / "data" / "judge_gold.jsonl"
KEYS = ("prompt", "chosen", "rejected", "principle_id", "principle", "subset")
SUBSETS = ("helpful", "honest", "harmless", "concise")
PREFIX = 48


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = GOLD.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def words(text: str) -> int:
    return len(text.split())


def test_enough_rows(rows):
    assert len(rows) >= 200


def test_keys_are_non_empty_strings(rows):
    for i, row in enumerate(rows):
        assert set(row) == set(KEYS), f"row {i}: keys {sorted(row)}"
        for key in KEYS:
            assert isinstance(row[key], str) and row[key].strip(), f"row {i}: empty {key}"


def test_subset_and_principle_match_demo_constitution(rows):
    constitution = load_constitution(REPO / "constitutions" / "demo.yaml")
    for i, row in enumerate(rows):
        assert row["subset"] in SUBSETS, f"row {i}: subset {row['subset']!r}"
        assert row["principle_id"] == row["subset"], f"row {i}"
        assert row["principle"] == constitution.principle(row["principle_id"]).text, f"row {i}"


def test_no_duplicates_and_chosen_differs(rows):
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert len(set(triples)) == len(triples)
    for i, row in enumerate(rows):
        assert row["chosen"] != row["rejected"], f"row {i}"


def test_length_does_not_give_the_answer_away(rows):
    longer = sum(words(r["chosen"]) > words(r["rejected"]) for r in rows)
    assert 0.4 <= longer / len(rows) <= 0.6


def test_each_subset_is_large_enough(rows):
    counts = Counter(r["subset"] for r in rows)
    for subset in SUBSETS:
        assert counts[subset] >= 40, f"{subset}: {counts[subset]}"


def test_prefix_is_balanced(rows):
    counts = Counter(r["subset"] for r in rows[:PREFIX])
    for subset in SUBSETS:
        assert counts[subset] >= 8, f"{subset}: {counts[subset]} in the first {PREFIX}"
