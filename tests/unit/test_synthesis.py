"""Self-instruct synthesis: reproducible few-shot chats, cleaning, and the keep/drop filter."""

from __future__ import annotations

import re

import pytest

from alignment.synthesis import INSTRUCTION, clean_request, filter_synthetic, self_instruct_chats

EXAMPLES = [f"Explain topic number {i} in simple words." for i in range(20)]


def shown(chat: list[dict[str, str]]) -> list[str]:
    """The seed requests a chat lists, in order ("1. ...", "2. ...")."""
    (message,) = chat
    assert message["role"] == "user"
    return re.findall(r"^\d+\. (.*)$", message["content"], flags=re.MULTILINE)


# --- chats ----------------------------------------------------------------------------------


def test_chat_count_and_shape() -> None:
    chats = self_instruct_chats(EXAMPLES, count=5, shots=3, seed=0)
    assert len(chats) == 5
    for chat in chats:
        examples = shown(chat)
        assert len(examples) == 3
        assert len(set(examples)) == 3  # sampled without replacement
        assert set(examples) <= set(EXAMPLES)
        listing = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))
        assert chat[0]["content"] == INSTRUCTION.format(examples=listing)


def test_zero_count_is_empty() -> None:
    assert self_instruct_chats(EXAMPLES, count=0, shots=3, seed=0) == []


def test_deterministic_in_seed() -> None:
    first = self_instruct_chats(EXAMPLES, count=6, shots=4, seed=7)
    assert self_instruct_chats(EXAMPLES, count=6, shots=4, seed=7) == first
    assert self_instruct_chats(EXAMPLES, count=6, shots=4, seed=8) != first


def test_each_chat_depends_only_on_its_index() -> None:
    # asking for more chats does not change the earlier ones
    short = self_instruct_chats(EXAMPLES, count=3, shots=4, seed=1)
    long = self_instruct_chats(EXAMPLES, count=10, shots=4, seed=1)
    assert long[:3] == short


def test_different_indexes_get_different_chats() -> None:
    chats = self_instruct_chats(EXAMPLES, count=10, shots=4, seed=0)
    assert len({chat[0]["content"] for chat in chats}) == 10


def test_fewer_examples_than_shots_shows_them_all() -> None:
    few = ["Write a haiku about rain.", "Name three rivers."]
    chats = self_instruct_chats(few, count=4, shots=5, seed=0)
    assert len(chats) == 4
    for chat in chats:
        assert sorted(shown(chat)) == sorted(few)


def test_accepts_any_sequence() -> None:
    as_tuple = self_instruct_chats(tuple(EXAMPLES), count=3, shots=2, seed=3)
    assert as_tuple == self_instruct_chats(EXAMPLES, count=3, shots=2, seed=3)


# --- cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "How do tides work?",
        "  How do tides work?  ",
        "\n\n  How do tides work?\nSecond line.",
        "1. How do tides work?",
        "12. How do tides work?",
        "2) How do tides work?",
        "- How do tides work?",
        "* How do tides work?",
        "• How do tides work?",
        "Request: How do tides work?",
        "request:How do tides work?",
        '"How do tides work?"',
        "'How do tides work?'",
        "“How do tides work?”",
        '3. "How do tides work?"',
    ],
)
def test_clean_request(raw: str) -> None:
    """Only the request stays: surrounding space, list numbers, bullets, a "Request:" label,
    quotes and later lines go."""
    assert clean_request(raw) == "How do tides work?"


@pytest.mark.parametrize("raw", ["", "   \n \n"])
def test_clean_blank_request_is_empty(raw: str) -> None:
    assert clean_request(raw) == ""


def test_clean_keeps_numbers_inside_the_text() -> None:
    assert clean_request("Add 2. and 3.") == "Add 2. and 3."
    assert clean_request("List 3 fruits - quickly") == "List 3 fruits - quickly"


# --- filtering ------------------------------------------------------------------------------


def test_keeps_new_well_sized_requests_cleaned() -> None:
    result = filter_synthetic(
        ["1. Describe how volcanoes erupt.", '"Suggest a name for my cat."'],
        ["Explain photosynthesis to a child."],
    )
    assert result.kept == ["Describe how volcanoes erupt.", "Suggest a name for my cat."]
    assert sum(result.dropped.values()) == 0


def test_drops_too_short_and_too_long() -> None:
    result = filter_synthetic(
        ["Hi there", "One two three", "a b c d e f", "a b c d e f g"],
        [],
        min_words=3,
        max_words=6,
    )
    assert result.kept == ["One two three", "a b c d e f"]
    assert result.dropped == {"too_short": 1, "too_long": 1}


def test_length_is_measured_after_cleaning() -> None:
    # "1." and the quotes are not words of the request
    result = filter_synthetic(['1. "Two words"'], [], min_words=3)
    assert result.kept == []
    assert result.dropped == {"too_short": 1}


def test_empty_output_is_too_short() -> None:
    result = filter_synthetic(["", "\n\n"], [], min_words=1)
    assert result.kept == []
    assert result.dropped == {"too_short": 2}


def test_near_duplicate_of_an_existing_prompt() -> None:
    existing = ["How do I bake a chocolate cake at home?"]
    result = filter_synthetic(
        ["How do I bake a chocolate cake at home", "HOW do i bake a Chocolate cake, at home!"],
        existing,
    )
    assert result.kept == []
    assert result.dropped == {"near_duplicate": 2}


def test_near_duplicate_of_an_earlier_kept_one() -> None:
    result = filter_synthetic(
        [
            "Write a poem about the sea at night.",
            "Write a poem about the sea at night please.",  # 8/9 of the words: duplicate
            "Plan a three day trip to Rome.",
        ],
        [],
    )
    assert result.kept == ["Write a poem about the sea at night.", "Plan a three day trip to Rome."]
    assert result.dropped == {"near_duplicate": 1}


def test_dropped_items_do_not_block_later_ones() -> None:
    # a too-long item is not remembered, so its shorter near-twin is kept
    long = "alpha beta gamma delta epsilon zeta"
    result = filter_synthetic([long, "alpha beta gamma delta epsilon"], [], max_words=5)
    assert result.kept == ["alpha beta gamma delta epsilon"]
    assert result.dropped == {"too_long": 1}


@pytest.mark.parametrize(("threshold", "kept"), [(0.5, False), (0.51, True)])
def test_similarity_threshold_is_inclusive(threshold: float, kept: bool) -> None:
    # {a b d} vs {a b c}: Jaccard 2/4 = 0.5; a duplicate when >= max_similarity
    result = filter_synthetic(["a b d"], ["a b c"], min_words=1, max_similarity=threshold)
    assert (result.kept == ["a b d"]) is kept
    assert result.dropped == ({} if kept else {"near_duplicate": 1})


def test_word_sets_ignore_order_and_repetition() -> None:
    result = filter_synthetic(
        ["cats dogs birds cats"], ["birds, dogs and cats"], min_words=1, max_similarity=0.75
    )
    # {cats dogs birds} vs {birds dogs and cats}: 3/4 = 0.75 >= 0.75
    assert result.kept == []
    assert result.dropped == {"near_duplicate": 1}


def test_counts_every_reason() -> None:
    result = filter_synthetic(
        ["short", "x " * 100, "Tell me a joke about robots.", "Tell me a joke about robots!"],
        ["Summarise this news article."],
    )
    assert result.kept == ["Tell me a joke about robots."]
    assert result.dropped == {"too_short": 1, "too_long": 1, "near_duplicate": 1}
