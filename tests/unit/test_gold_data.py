"""Shape of the hand-written gold preference set used to audit AI judges."""

import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from alignment.constitution import load_constitution
from alignment.judge_eval import (
    BUILTIN_AUDIT,
    BUILTIN_TUNING,
    gold_half,
    load_preference_set,
    pair_id,
    preference_set_id,
)

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


# --- the two fixed halves: builtin-tuning (tune the judge on it) and builtin-audit ------------

HALF = 120  # pairs in each half of the 240
AUDIT_DIGEST = "74467bf9c8a0aefe"  # sha256 of the audit half's sorted pair ids: the split


def half_ids(pairs, half):
    return {pair_id(p) for p, h in gold_half(pairs).items() if h == half}


def test_halves_are_fixed_disjoint_and_cover_every_principle():
    tuning = load_preference_set(BUILTIN_TUNING)
    audit = load_preference_set(BUILTIN_AUDIT)
    assert (len(tuning), len(audit)) == (HALF, HALF)
    tuning_ids, audit_ids = {pair_id(p) for p in tuning}, {pair_id(p) for p in audit}
    assert not tuning_ids & audit_ids
    assert tuning_ids | audit_ids == {pair_id(p) for p in load_preference_set("builtin")}
    for half in (tuning, audit):
        assert Counter(p.principle.id for p in half) == {s: HALF // 4 for s in SUBSETS}
        assert Counter(p.subset for p in half) == {s: HALF // 4 for s in SUBSETS}
    digest = hashlib.sha256("".join(sorted(audit_ids)).encode()).hexdigest()
    assert digest[:16] == AUDIT_DIGEST


def test_halves_do_not_depend_on_the_file_order(tmp_path):
    lines = [line for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(7).shuffle(lines)
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pairs = load_preference_set(shuffled)
    assert half_ids(pairs, BUILTIN_AUDIT) == {
        pair_id(p) for p in load_preference_set(BUILTIN_AUDIT)
    }
    assert half_ids(pairs, BUILTIN_TUNING) == {
        pair_id(p) for p in load_preference_set(BUILTIN_TUNING)
    }


def test_a_half_keeps_the_gold_order_and_its_limit():
    whole = load_preference_set("builtin")
    audit = load_preference_set(BUILTIN_AUDIT)
    position = {p: k for k, p in enumerate(whole)}
    assert [position[p] for p in audit] == sorted(position[p] for p in audit)
    assert load_preference_set(BUILTIN_AUDIT, 48) == audit[:48]
    ids = {preference_set_id(s) for s in ("builtin", BUILTIN_TUNING, BUILTIN_AUDIT)}
    assert len(ids) == 3  # three data sets in the store
