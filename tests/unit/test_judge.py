"""The judge: soft-label arithmetic, statuses, checks, strategies, batching, pairs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from functools import partial
from itertools import combinations

import pytest

import alignment.asking
import alignment.critique
import alignment.templates
from alignment.asking import Comparison, template_fingerprint
from alignment.backends import SequenceScore
from alignment.constitution import Check, Constitution, from_dict
from alignment.judge import (
    Candidate,
    Judgment,
    Question,
    judge_comparisons,
    judge_questions,
    judgment_id,
    judgments_in_rounds,
    principle_fingerprint,
)
from alignment.judge_config import JudgeConfig
from alignment.labels import (
    SoftLabel,
    decide_by_checks,
    length_scale,
    rationale_status,
    read_contrast,
    read_ensemble,
    read_soft_label,
    sequence_total,
    sigmoid,
)
from alignment.pairs import DROP_REASONS, build_pairs
from alignment.templates import (
    COT_LEAD_IN,
    FEW_SHOT,
    LEAD_IN,
    NEUTRAL_SYSTEM,
    contrast_systems,
    principle_instruction,
)
from tests.scripted_backend import ScriptedBackend, last_user_message, system_prompt

log = math.log


def constitution(*principles: dict):
    return from_dict({"name": "test", "version": "1", "principles": list(principles)})


def principle(pid: str, **extra) -> dict:
    return {
        "id": pid,
        "principle": f"Choose the response that is more {pid}.",
        "critique": f"Is the response {pid}?",
        "revision": f"Rewrite it to be more {pid}.",
        **extra,
    }


PLAIN = constitution(principle("helpful"), principle("honest"))
LOGPROB = JudgeConfig(mode="logprob")  # the A/B question, asked in both orders
SHORT = constitution(principle("brief", checks=[{"max_words": 3}]))


def candidates(prompt_id: str, *texts: str) -> list[Candidate]:
    return [
        Candidate(f"{prompt_id}-r{i}", prompt_id, f"question {prompt_id}?", text)
        for i, text in enumerate(texts)
    ]


def by_prompt(*groups: list[Candidate]) -> dict[str, list[Candidate]]:
    return {group[0].prompt_id: group for group in groups}


def judge_all(
    backend: ScriptedBackend,
    constitution: Constitution,
    groups: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> list[Judgment]:
    """The judge stage's rounds as flows/stages.py asks them, without the store."""
    cid = constitution.constitution_id
    ask = partial(judge_questions, backend, config=config, constitution_id=cid)
    return judgments_in_rounds(constitution, groups, config, ask)


def scripted_orders(first: dict, second: dict) -> ScriptedBackend:
    """A backend answering order-1 chats with ``first`` and order-2 chats with ``second``.

    Candidate texts "first" and "second" tell the orders apart: order 1 shows "first" as (A).
    """

    def score(chat, options):
        return dict(first) if "(A) first" in last_user_message(chat) else dict(second)

    return ScriptedBackend(score_fn=score)


def judge_one(backend: ScriptedBackend, config: JudgeConfig | None = None) -> Judgment:
    group = candidates("p", "first", "second")
    (judgment,) = judge_all(backend, PLAIN, by_prompt(group), config or LOGPROB)
    return judgment


# --- Arithmetic -------------------------------------------------------------------


def test_known_logprobs_give_known_soft_label():
    label = read_soft_label({"A": log(0.8), "B": log(0.2)}, {"A": log(0.3), "B": log(0.7)})
    assert label.status == "ok"
    assert label.p_a_first == pytest.approx(0.8)
    assert label.p_a_second == pytest.approx(0.7)
    assert label.p_a == pytest.approx(0.75)
    assert label.position_consistent is True
    assert label.option_mass == pytest.approx(1.0)


def test_unnormalised_logprobs_are_normalised_over_the_two_labels():
    # Order 1: 0.4 vs 0.1 of the full distribution -> 0.8; order 2: 0.15 vs 0.35 -> 0.7.
    label = read_soft_label({"A": log(0.4), "B": log(0.1)}, {"A": log(0.15), "B": log(0.35)})
    assert (label.p_a_first, label.p_a_second) == (pytest.approx(0.8), pytest.approx(0.7))
    assert label.option_mass == pytest.approx(0.5)  # min over orders


def test_extreme_logprobs_are_numerically_stable():
    label = read_soft_label({"A": -1000.0, "B": -1001.0}, {"A": -1001.0, "B": -1000.0})
    assert label.status == "unparseable"  # exp(-1000) of mass is nothing
    label = read_soft_label({"A": -50.0, "B": -51.0}, {"A": -51.0, "B": -50.0})
    assert label.p_a == pytest.approx(1 / (1 + math.exp(-1)))


def test_swap_averaging_cancels_position_bias():
    # A judge that always says (A) with 0.9 has no opinion once both orders are averaged.
    always_a = {"A": log(0.9), "B": log(0.1)}
    label = read_soft_label(always_a, always_a)
    assert (label.p_a_first, label.p_a_second) == (pytest.approx(0.9), pytest.approx(0.1))
    assert label.p_a == pytest.approx(0.5)
    assert label.position_consistent is False


def test_inconsistent_orders_are_flagged():
    label = read_soft_label({"A": log(0.6), "B": log(0.4)}, {"A": log(0.6), "B": log(0.4)})
    assert label.position_consistent is False
    assert label.p_a == pytest.approx(0.5)
    label = read_soft_label({"A": log(0.3), "B": log(0.7)}, {"A": log(0.9), "B": log(0.1)})
    assert label.position_consistent is True  # both prefer B
    assert label.p_a == pytest.approx(0.2)


def test_cot_clamps_each_order_before_averaging():
    label = read_soft_label(
        {"A": log(0.95), "B": log(0.05)}, {"A": log(0.45), "B": log(0.55)}, clamp=(0.4, 0.6)
    )
    assert (label.p_a_first, label.p_a_second) == (pytest.approx(0.6), pytest.approx(0.55))
    assert label.p_a == pytest.approx(0.575)


@pytest.mark.parametrize(
    "first, second",
    [
        ({"A": None, "B": log(0.5)}, {"A": log(0.5), "B": log(0.5)}),
        ({"A": log(0.5), "B": log(0.5)}, {"A": log(0.5)}),
        ({"A": float("nan"), "B": log(0.5)}, {"A": log(0.5), "B": log(0.5)}),
    ],
)
def test_missing_logprob_is_its_own_status(first, second):
    label = read_soft_label(first, second)
    assert label.status == "missing_logprobs"
    assert (label.p_a_first, label.p_a_second, label.p_a) == (None, None, None)
    assert label.position_consistent is None


def test_low_option_mass_is_unparseable():
    first, second = {"A": log(0.05), "B": log(0.05)}, {"A": log(0.5), "B": log(0.5)}
    assert read_soft_label(first, second, min_option_mass=0.2).status == "unparseable"
    assert read_soft_label(first, second, min_option_mass=0.1).status == "ok"


@pytest.mark.parametrize(
    "text, status",
    [
        ("Response (A) answers the question directly.", "ok"),
        ("The response says 'I can't help' which is unhelpful.", "ok"),
        ("I can't help with comparing these.", "refusal"),
        ("I cannot answer that.", "refusal"),
        ("I won't judge this.", "refusal"),
        ("I'm sorry, but I can't.", "refusal"),
        ("  Sorry, no.", "refusal"),
        ("As an AI, I have no opinion.", "refusal"),
        ("", "unparseable"),
        ("  \n ", "unparseable"),
    ],
)
def test_rationale_status(text, status):
    assert rationale_status(text) == status


# --- Checks -------------------------------------------------------------------------


def test_checks_decide_pairwise_and_pointwise():
    brief = SHORT.principles[0]
    assert decide_by_checks(brief, "one two", "one two three four").p_a == 1.0
    assert decide_by_checks(brief, "one two three four", "one two").p_a == 0.0
    assert decide_by_checks(brief, "one", "two").p_a == 0.5
    assert decide_by_checks(brief, "one two three four", "five six seven eight").p_a == 0.5
    assert decide_by_checks(brief, "one", None).p_a == 1.0
    assert decide_by_checks(brief, "one two three four", None).p_a == 0.0


def test_checked_principles_are_decided_without_the_model():
    backend = ScriptedBackend()
    group = candidates("p", "short one", "this one is far too long")
    (judgment,) = judge_all(backend, SHORT, by_prompt(group), LOGPROB)
    assert backend.calls == []
    assert judgment.mode == "checks"
    assert judgment.status == "ok"
    assert (judgment.p_a_first, judgment.p_a_second, judgment.p_a) == (1.0, 1.0, 1.0)
    assert judgment.position_consistent is True
    assert judgment.option_mass is None and judgment.rationale is None


def test_checked_principles_are_decided_without_the_model_in_best_vs_worst():
    backend = ScriptedBackend()
    group = candidates("p", "short one", "this one is far too long", "tiny")
    config = JudgeConfig(mode="logprob", pair_strategy="best_vs_worst")
    judgments = judge_all(backend, SHORT, by_prompt(group), config)
    assert backend.calls == []
    pointwise = [j for j in judgments if j.response_b_id is None]
    assert [j.p_a for j in pointwise] == [1.0, 0.0, 1.0]
    (pairwise,) = [j for j in judgments if j.response_b_id is not None]
    assert (pairwise.response_a_id, pairwise.response_b_id) == ("p-r0", "p-r1")
    assert pairwise.p_a == 1.0


# --- Judging through a backend ----------------------------------------------------


def test_judge_reads_both_orders_from_the_backend():
    backend = scripted_orders({"A": log(0.8), "B": log(0.2)}, {"A": log(0.3), "B": log(0.7)})
    judgment = judge_one(backend)
    assert judgment.mode == "logprob" and judgment.status == "ok"
    assert (judgment.response_a_id, judgment.response_b_id) == ("p-r0", "p-r1")
    assert judgment.p_a_first == pytest.approx(0.8)
    assert judgment.p_a_second == pytest.approx(0.7)
    assert judgment.p_a == pytest.approx(0.75)
    assert judgment.position_consistent is True
    assert judgment.judge_model == "scripted"
    assert judgment.constitution_id == PLAIN.constitution_id


def test_judge_chats_end_with_the_lead_in_and_show_both_orders():
    backend = ScriptedBackend()
    judge_one(backend)
    first, second = (call.chats[0] for call in backend.calls_to("score_options"))
    for chat in (first, second):
        assert chat[-1] == {"role": "assistant", "content": LEAD_IN}
    assert "(A) first\n(B) second" in last_user_message(first)
    assert "(A) second\n(B) first" in last_user_message(second)
    assert {call.options for call in backend.calls} == {("A", "B")}


def test_missing_logprobs_never_become_a_pair():
    backend = scripted_orders({"A": log(0.9), "B": None}, {"A": log(0.1), "B": log(0.9)})
    judgment = judge_one(backend)
    assert judgment.status == "missing_logprobs"
    assert judgment.p_a is None
    outcome = build_pairs([judgment], by_prompt(candidates("p", "first", "second")), LOGPROB)
    assert outcome.pairs == []
    assert outcome.dropped["missing_logprobs"] == 1


def cot_backend(rationale: str) -> ScriptedBackend:
    def score(chat, options):
        if "(A) first" in last_user_message(chat):
            return {"A": log(0.9), "B": log(0.1)}
        return {"A": log(0.2), "B": log(0.8)}

    return ScriptedBackend(generate_fn=lambda chat, k: rationale, score_fn=score)


def test_cot_generates_a_rationale_then_scores_clamped():
    backend = cot_backend("  Response A is more helpful.  ")
    judgment = judge_one(backend, JudgeConfig(mode="cot", min_confidence=0.55))
    assert judgment.mode == "cot" and judgment.status == "ok"
    assert (judgment.p_a_first, judgment.p_a_second) == (pytest.approx(0.6), pytest.approx(0.6))
    assert judgment.p_a == pytest.approx(0.6)
    assert judgment.rationale is not None and judgment.rationale.count("more helpful") == 2
    assert [c.method for c in backend.calls] == [
        "generate",
        "score_options",
        "generate",
        "score_options",
    ]
    generated, scored = backend.calls[0].chats[0], backend.calls[1].chats[0]
    assert generated[-1]["role"] == "user"
    assert "step by step" in generated[-1]["content"]
    assert scored[-1] == {
        "role": "assistant",
        "content": "Response A is more helpful.\n" + COT_LEAD_IN,
    }
    assert backend.calls[0].sampling.max_tokens == 128


@pytest.mark.parametrize(
    "rationale, status", [("I'm sorry, I cannot compare these.", "refusal"), ("", "unparseable")]
)
def test_cot_refusal_and_empty_rationale_never_become_pairs(rationale, status):
    judgment = judge_one(cot_backend(rationale), JudgeConfig(mode="cot"))
    assert judgment.status == status
    assert judgment.p_a is None
    outcome = build_pairs(
        [judgment], by_prompt(candidates("p", "first", "second")), JudgeConfig(mode="cot")
    )
    assert outcome.pairs == []
    assert outcome.dropped[status] == 1


def test_unparseable_low_mass_never_becomes_a_pair():
    backend = scripted_orders({"A": log(0.01), "B": log(0.01)}, {"A": log(0.5), "B": log(0.4)})
    config = JudgeConfig(mode="logprob", min_option_mass=0.1)
    judgment = judge_one(backend, config)
    assert judgment.status == "unparseable"
    assert judgment.option_mass == pytest.approx(0.02)
    group = candidates("p", "first", "second")
    assert build_pairs([judgment], by_prompt(group), config).dropped["unparseable"] == 1


# --- Principles, strategies and batching ------------------------------------------


def many_principles():
    return constitution(*(principle(f"p{i}") for i in range(8)))


def test_one_principle_per_comparison_stable_across_runs_and_orders():
    five = many_principles()
    group = candidates("p", "a", "bb", "ccc", "dddd", "eeeee")
    first = judge_all(ScriptedBackend(), five, by_prompt(group), LOGPROB)
    again = judge_all(ScriptedBackend(), five, by_prompt(group), LOGPROB)
    reversed_ = judge_all(ScriptedBackend(), five, by_prompt(group[::-1]), LOGPROB)

    def principles(judgments):
        return {frozenset([j.response_a_id, j.response_b_id]): j.principle_id for j in judgments}

    assert principles(first) == principles(again) == principles(reversed_)
    assert len(set(principles(first).values())) > 1  # sampled per comparison, not per batch


def test_principle_text_is_in_the_question():
    backend = ScriptedBackend()
    judgment = judge_one(backend)
    text = PLAIN.principle(judgment.principle_id).text
    for call in backend.calls:
        assert text in last_user_message(call.chats[0])


def test_all_pairs_batches_one_score_call_per_order():
    backend = ScriptedBackend()
    groups = [candidates(f"p{k}", "a", "bb", "ccc", "dddd") for k in range(3)]
    judgments = judge_all(backend, PLAIN, by_prompt(*groups), LOGPROB)
    assert len(judgments) == 3 * 6
    calls = backend.calls_to("score_options")
    assert len(backend.calls) == len(calls) == 2
    assert [len(c.chats) for c in calls] == [18, 18]
    expected = {(a.response_id, b.response_id) for g in groups for a, b in combinations(g, 2)}
    assert {(j.response_a_id, j.response_b_id) for j in judgments} == expected


def test_best_vs_worst_uses_n_pointwise_plus_one_comparison_per_prompt():
    backend = ScriptedBackend()
    groups = [candidates(f"p{k}", "bb", "a", "dddddddd", "ccc") for k in range(3)]
    config = JudgeConfig(mode="logprob", pair_strategy="best_vs_worst")
    judgments = judge_all(backend, PLAIN, by_prompt(*groups), config)

    calls = backend.calls_to("score_options")
    assert len(backend.calls) == len(calls) == 4  # pointwise in 2 orders, then pairwise in 2
    assert [len(c.chats) for c in calls] == [12, 12, 3, 3]
    pointwise = [j for j in judgments if j.response_b_id is None]
    pairwise = [j for j in judgments if j.response_b_id is not None]
    assert len(pointwise) == 12 and len(pairwise) == 3
    assert {j.mode for j in judgments} == {"logprob"}  # the yes/no, then the A/B question
    # The scripted judge likes longer responses: best "dddddddd" (r2), worst "a" (r1),
    # compared in their given order.
    assert {(j.response_a_id, j.response_b_id) for j in pairwise} == {
        (f"p{k}-r1", f"p{k}-r2") for k in range(3)
    }
    by_id = {j.response_a_id: j.p_a for j in pointwise}
    assert by_id["p0-r2"] > by_id["p0-r3"] > by_id["p0-r0"] > by_id["p0-r1"]


def test_best_vs_worst_asks_pointwise_in_both_label_orders():
    backend = ScriptedBackend()
    config = JudgeConfig(mode="logprob", pair_strategy="best_vs_worst")
    judge_all(backend, PLAIN, by_prompt(candidates("p", "a", "bbbb")), config)
    first, second = (c.chats[0] for c in backend.calls_to("score_options")[:2])
    assert "(A) yes\n(B) no" in last_user_message(first)
    assert "(A) no\n(B) yes" in last_user_message(second)


def test_best_vs_worst_skips_single_candidates_and_equal_scores():
    backend = ScriptedBackend()
    groups = [candidates("one", "only"), candidates("same", "abc", "xyz")]
    config = JudgeConfig(mode="logprob", pair_strategy="best_vs_worst")
    judgments = judge_all(backend, PLAIN, by_prompt(*groups), config)
    assert [(j.mode, j.response_b_id) for j in judgments] == [("logprob", None)] * 3
    assert len(backend.calls) == 2


def test_empty_batch_calls_nothing():
    backend = ScriptedBackend()
    assert judge_all(backend, PLAIN, {}, LOGPROB) == []
    assert judge_all(backend, PLAIN, by_prompt(candidates("p", "a")), LOGPROB) == []
    assert backend.calls == []


def test_judgment_ids_are_stable_and_distinguish_what_matters():
    group = by_prompt(candidates("p", "first", "second"))
    ids = {judge_all(ScriptedBackend(), PLAIN, group, LOGPROB)[0].judgment_id for _ in range(2)}
    assert len(ids) == 1
    other_model = judge_all(ScriptedBackend("other"), PLAIN, group, LOGPROB)[0]
    assert other_model.judgment_id not in ids
    cot = judge_all(cot_backend("fine"), PLAIN, group, JudgeConfig(mode="cot"))[0]
    assert cot.judgment_id not in ids


def test_judgment_row_has_the_store_columns():
    row = judge_one(ScriptedBackend()).to_row()
    assert list(row) == [
        "judgment_id",
        "prompt_id",
        "response_a_id",
        "response_b_id",
        "principle_id",
        "constitution_id",
        "judge_model",
        "mode",
        "p_a_first",
        "p_a_second",
        "p_a",
        "position_consistent",
        "option_mass",
        "status",
        "rationale",
        "delta_a",
        "delta_b",
    ]


# --- Pairs --------------------------------------------------------------------------


def judgment(p_a: float | None, consistent: bool = True, status: str = "ok", **extra):
    """A stored judgment of p-r0 against p-r1 whose both orders say ``p_a``."""
    label = SoftLabel(status, p_a, p_a, p_a, consistent, option_mass=1.0)
    fields = dict(
        judgment_id=f"j-{p_a}-{consistent}-{status}",
        prompt_id="p",
        response_a_id="p-r0",
        response_b_id="p-r1",
        principle_id="helpful",
        constitution_id="c",
        judge_model="judge",
        mode="logprob",
        rationale=None,
    )
    return Judgment(**{**fields, **asdict(label), **extra})


PAIR_GROUP = by_prompt(candidates("p", "alpha", "beta"))


def test_build_pairs_picks_the_winner_with_its_confidence():
    outcome = build_pairs([judgment(0.8), judgment(0.25)], PAIR_GROUP, LOGPROB)
    a_wins, b_wins = outcome.pairs
    assert (a_wins.chosen, a_wins.rejected, a_wins.p_chosen) == ("alpha", "beta", 0.8)
    assert (a_wins.chosen_response_id, a_wins.rejected_response_id) == ("p-r0", "p-r1")
    assert (b_wins.chosen, b_wins.rejected, b_wins.p_chosen) == ("beta", "alpha", 0.75)
    assert a_wins.prompt == "question p?"
    assert a_wins.principle_ids == ("helpful",)
    assert a_wins.judgment_ids == ("j-0.8-True-ok",)
    assert outcome.dropped == dict.fromkeys(DROP_REASONS, 0)


def test_build_pairs_drops_ties_low_confidence_and_inconsistent_with_counts():
    judgments = [
        judgment(0.5),
        judgment(0.54),
        judgment(0.46),
        judgment(0.7, consistent=False),
        judgment(0.9),
        judgment(None, consistent=None, status="refusal"),
        judgment(None, consistent=None, status="unparseable"),
        judgment(None, consistent=None, status="missing_logprobs"),
        judgment(0.9, response_b_id=None, mode="logprob"),
    ]
    strict = build_pairs(judgments, PAIR_GROUP, JudgeConfig(require_position_consistent=True))
    assert [p.p_chosen for p in strict.pairs] == [0.9]
    assert strict.dropped == {
        "tie": 1,
        "low_confidence": 2,
        "position_inconsistent": 1,
        "refusal": 1,
        "unparseable": 1,
        "missing_logprobs": 1,
    }
    lenient = build_pairs(judgments, PAIR_GROUP, JudgeConfig(min_confidence=0.5))
    assert [p.p_chosen for p in lenient.pairs] == [0.54, 0.54, 0.7, 0.9]
    assert lenient.dropped["tie"] == 1 and lenient.dropped["position_inconsistent"] == 0


def test_checks_ties_are_dropped_and_checks_wins_are_pairs():
    judgments = [judgment(0.5, mode="checks"), judgment(0.0, mode="checks")]
    outcome = build_pairs(judgments, PAIR_GROUP, LOGPROB)
    assert outcome.dropped["tie"] == 1
    assert [(p.chosen, p.p_chosen) for p in outcome.pairs] == [("beta", 1.0)]


def test_pair_ids_are_stable_and_rows_use_lists():
    first = build_pairs([judgment(0.8, judgment_id="j")], PAIR_GROUP, LOGPROB).pairs[0]
    again = build_pairs([judgment(0.9, judgment_id="j")], PAIR_GROUP, LOGPROB).pairs[0]
    flipped = build_pairs([judgment(0.1, judgment_id="j")], PAIR_GROUP, LOGPROB).pairs[0]
    other = build_pairs([judgment(0.8, judgment_id="k")], PAIR_GROUP, LOGPROB).pairs[0]
    stricter = JudgeConfig(mode="logprob", min_confidence=0.7)
    strict = build_pairs([judgment(0.8, judgment_id="j")], PAIR_GROUP, stricter).pairs[0]
    assert first.pair_id == again.pair_id != flipped.pair_id
    # Another judgment, or other thresholds, make another pair: a raised bound selects anew.
    assert len({first.pair_id, other.pair_id, strict.pair_id}) == 3
    row = first.to_row()
    assert row["principle_ids"] == ["helpful"] and row["judgment_ids"] == ["j"]


def test_end_to_end_scripted_judge_prefers_longer_responses():
    group = candidates("p", "short", "a much longer and more detailed answer")
    judgments = judge_all(ScriptedBackend(), PLAIN, by_prompt(group), LOGPROB)
    (pair,) = build_pairs(judgments, by_prompt(group), LOGPROB).pairs
    assert pair.chosen_response_id == "p-r1"
    assert pair.p_chosen > 0.55


# --- Contrast: arithmetic -----------------------------------------------------------


def test_contrast_label_is_sigmoid_of_the_delta_difference_over_tau():
    label = read_contrast(-2.0, -5.0, tau=3.0)
    assert label.status == "ok"
    assert label.p_a == pytest.approx(1 / (1 + math.exp(-1.0)))
    # No option order: both "orders" are the one answer, consistent by construction.
    assert label.p_a_first == label.p_a_second == label.p_a
    assert label.position_consistent is True
    assert (label.delta_a, label.delta_b, label.option_mass) == (-2.0, -5.0, None)
    assert read_contrast(1.0, 1.0, tau=3.0).p_a == 0.5
    assert read_contrast(-5.0, -2.0, tau=0.5).p_a == pytest.approx(sigmoid(-6.0))


def test_contrast_pointwise_is_sigmoid_of_delta():
    label = read_contrast(1.5, None, tau=3.0, pointwise=True)
    assert label.p_a == pytest.approx(sigmoid(0.5))
    assert (label.delta_a, label.delta_b) == (1.5, None)


@pytest.mark.parametrize("delta_a, delta_b", [(None, 1.0), (1.0, None), (None, None)])
def test_contrast_without_a_score_is_missing_logprobs(delta_a, delta_b):
    label = read_contrast(delta_a, delta_b, tau=1.0)
    assert label.status == "missing_logprobs"
    assert (label.p_a, label.p_a_first, label.p_a_second, label.position_consistent) == (
        None, None, None, None,
    )  # fmt: skip


def test_length_scale_is_one_for_sum_and_the_root_of_the_mean_tokens():
    assert length_scale([4, 60], "sum") == 1.0
    assert length_scale([4, 60], "sqrt_tokens") == pytest.approx(math.sqrt(32))
    assert length_scale([9], "sqrt_tokens") == 3.0  # a pointwise score: its own tokens
    assert length_scale([0, 0], "sqrt_tokens") == 1.0  # never below one token
    with pytest.raises(ValueError, match="contrast_length"):
        length_scale([4], "tokens")
    label = read_contrast(-2.0, -5.0, tau=3.0, scale=2.0)
    assert label.p_a == pytest.approx(sigmoid(0.5))
    assert (label.delta_a, label.delta_b) == (-2.0, -5.0)  # the Δ are kept as read
    assert read_contrast(4.0, None, tau=1.0, pointwise=True, scale=2.0).p_a == sigmoid(2.0)


def good_words(chat):
    """Every token costs 1 nat, the end token included; under the principle the word
    "good" costs 0.8, so a response's Δ is 0.2 nats per "good" it has."""
    words = chat[-1]["content"].split()
    principled = system_prompt(chat) != NEUTRAL_SYSTEM
    cost = sum(0.8 if principled and word == "good" else 1.0 for word in words)
    return SequenceScore(-cost, len(words), end_logprob=-1.0)


def text(good: int, other: int) -> str:
    return " ".join(["good"] * good + ["a"] * other)


def test_sqrt_tokens_makes_a_long_pair_less_confident_than_the_sum_does():
    """The same evidence per token (0.15 nats) in a pair of 4 tokens and one of 64 (16
    times as long, the end token counted): the sum's log-odds grow 16-fold,
    sqrt_tokens' 4-fold; the winner is the same."""
    short, long = (text(3, 0), text(0, 3)), (text(48, 15), text(0, 63))
    backend = ScriptedBackend(sequence_fn=good_words)

    def logits(config, *pairs):
        labels = judge_comparisons(backend, comparisons(*pairs), config)
        return [math.log(x.p_a / (1 - x.p_a)) for x in labels]

    by_sum = JudgeConfig(contrast_length="sum", contrast_tau=8.0)
    by_root = JudgeConfig(contrast_length="sqrt_tokens", contrast_tau=4.0)  # s = 2 for 4 tokens
    sum_short, sum_long = logits(by_sum, short, long)
    assert sum_short > 0 and sum_long / sum_short == pytest.approx(16.0)
    root_short, root_long = logits(by_root, short, long)
    assert root_short > 0 and root_long / root_short == pytest.approx(4.0)
    # Tuned to give the short pair the same confidence, sqrt_tokens gives the long pair
    # less, so min_confidence and max_pairs lean less towards long pairs; and a long pair
    # with no more evidence in all than the short one gets less confidence than it.
    assert root_short == pytest.approx(sum_short) and root_long < sum_long
    diluted = (text(3, 60), text(0, 63))
    (root_diluted,) = logits(by_root, diluted)
    (sum_diluted,) = logits(by_sum, diluted)
    assert 0 < root_diluted < root_short and sum_diluted == pytest.approx(sum_short)


def test_sqrt_tokens_scales_pointwise_scores_by_their_own_length():
    backend = ScriptedBackend(sequence_fn=good_words)
    group = candidates("p", text(3, 0), text(12, 3), "bad")
    one_principle = constitution(principle("helpful"))
    config = JudgeConfig(pair_strategy="best_vs_worst", contrast_length="sqrt_tokens")
    judgments = judge_all(backend, one_principle, by_prompt(group), config)
    pointwise = [j for j in judgments if j.response_b_id is None]
    assert [j.delta_a for j in pointwise] == pytest.approx([0.6, 2.4, 0.0])
    tau = config.contrast_tau
    assert pointwise[0].p_a == pytest.approx(sigmoid(0.6 / (tau * 2)))  # 4 tokens
    assert pointwise[1].p_a == pytest.approx(sigmoid(2.4 / (tau * 4)))  # 16 tokens


def test_ensemble_reads_its_contrast_half_with_the_same_length_scale():
    backend = ScriptedBackend(sequence_fn=good_words)
    pair = comparisons((text(3, 0), text(0, 3)))
    labels = [
        judge_comparisons(backend, pair, JudgeConfig(mode="ensemble", contrast_length=length))[0]
        for length in ("sum", "sqrt_tokens")
    ]
    # The scripted A/B answers are the same for both; the contrast log-odds halve (s = 2).
    assert labels[0].p_a > labels[1].p_a
    assert labels[0].delta_a == labels[1].delta_a == pytest.approx(0.6)


def test_sigmoid_is_stable_far_out():
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0
    assert sigmoid(0.0) == 0.5


def test_sequence_total_counts_the_end_of_turn_token():
    score = SequenceScore(logprob=-6.0, num_tokens=3, end_logprob=-2.0)
    assert sequence_total(score) == -8.0
    assert sequence_total(score, per_token=True) == -2.0  # 4 tokens, end included
    no_end = SequenceScore(logprob=-6.0, num_tokens=3)
    assert (sequence_total(no_end), sequence_total(no_end, per_token=True)) == (-6.0, -2.0)
    empty = SequenceScore(logprob=0.0, num_tokens=0)
    assert sequence_total(empty, per_token=True) == 0.0


def test_ensemble_averages_log_odds_so_a_constant_position_bias_cancels():
    always_a = {"A": log(0.9), "B": log(0.1)}  # order 1 says A, order 2 says A: no opinion
    contrast = read_contrast(3.0, 0.0, tau=3.0)  # z_c = 1
    label = read_ensemble(contrast, always_a, always_a, tau=3.0, ab_scale=4.0)
    assert label.p_a == pytest.approx(sigmoid(0.5))  # (z_c + 0) / 2
    l1 = 4.0 * math.log(9)  # scaled logit(0.9)
    assert label.p_a_first == pytest.approx(sigmoid((1 + l1) / 2))
    assert label.p_a_second == pytest.approx(sigmoid((1 - l1) / 2))
    assert label.position_consistent is False
    assert (label.delta_a, label.delta_b, label.option_mass) == (3.0, 0.0, pytest.approx(1.0))

    agree = read_ensemble(
        contrast, {"A": log(0.6), "B": log(0.4)}, {"A": log(0.4), "B": log(0.6)},
        tau=3.0, ab_scale=2.0,
    )  # fmt: skip
    z_ab = 2.0 * math.log(1.5)
    assert agree.p_a == pytest.approx(sigmoid((1 + z_ab) / 2))
    assert agree.position_consistent is True


def test_ensemble_keeps_the_statuses_of_its_parts():
    fine = {"A": log(0.5), "B": log(0.5)}
    missing = read_contrast(None, 1.0, tau=1.0)
    assert read_ensemble(missing, fine, fine, tau=1.0, ab_scale=1.0) is missing
    contrast = read_contrast(1.0, 0.0, tau=1.0)
    label = read_ensemble(contrast, {"A": None, "B": 0.0}, fine, tau=1.0, ab_scale=1.0)
    assert label.status == "missing_logprobs" and label.p_a is None
    assert (label.delta_a, label.delta_b) == (1.0, 0.0)


# --- Contrast: the chats and the batching -------------------------------------------


def test_principle_becomes_an_instruction_to_the_writer():
    assert principle_instruction("Choose the response that is kind.") == (
        "Write a response that is kind."
    )
    assert principle_instruction("Please choose the assistant response which is brief.") == (
        "Write a response that is brief."
    )
    assert principle_instruction("Never lie.") == "Follow this principle: Never lie."
    follow, neutral = contrast_systems("Choose the response that is kind.", "neutral")
    assert (follow, neutral) == (f"{NEUTRAL_SYSTEM} Write a response that is kind.", NEUTRAL_SYSTEM)
    _, opposite = contrast_systems("Choose the response that is kind.", "opposite")
    assert opposite == f"{NEUTRAL_SYSTEM} Do the opposite of this: write a response that is kind."


CONTRAST = JudgeConfig(mode="contrast", contrast_tau=2.0)
HELPFUL = PLAIN.principle("helpful")


def comparisons(*pairs: tuple[str, str]) -> list[Comparison]:
    return [Comparison("question?", a, b, HELPFUL) for a, b in pairs]


def test_contrast_scores_each_response_with_and_without_the_principle():
    backend = ScriptedBackend()
    (label,) = judge_comparisons(backend, comparisons(("one two three four", "one")), CONTRAST)
    # Scripted: a word costs 1 nat, 0.5 under the principle, so Δ = 0.5 per word.
    assert (label.delta_a, label.delta_b) == (2.0, 0.5)
    assert label.p_a == pytest.approx(sigmoid((2.0 - 0.5) / 2.0))
    (call,) = backend.calls
    assert call.method == "score_sequences" and len(call.chats) == 4
    follow = f"{NEUTRAL_SYSTEM} {principle_instruction(HELPFUL.text)}"
    for chat in call.chats:
        assert [m["role"] for m in chat] == ["system", "user", "assistant"]
        assert chat[1]["content"] == "question?"
    assert {system_prompt(c) for c in call.chats} == {follow, NEUTRAL_SYSTEM}
    assert {c[-1]["content"] for c in call.chats} == {"one two three four", "one"}


def test_contrast_opposite_contrasts_with_the_opposite_instruction():
    backend = ScriptedBackend()
    config = JudgeConfig(mode="contrast", contrast_negative="opposite", contrast_tau=1.0)
    (label,) = judge_comparisons(backend, comparisons(("a b", "c")), config)
    assert (label.delta_a, label.delta_b) == (2.0, 1.0)  # 1.5 - 0.5 nats per word
    assert any("opposite" in system_prompt(c) for c in backend.calls[0].chats)


def test_contrast_scores_each_response_once_per_batch():
    backend = ScriptedBackend()
    texts = ["a", "b b", "c c c", "d d d d"]
    groups = [candidates(f"p{k}", *texts) for k in range(2)]
    one_principle = constitution(principle("helpful"))
    judgments = judge_all(backend, one_principle, by_prompt(*groups), CONTRAST)
    assert len(judgments) == 2 * 6
    (call,) = backend.calls
    assert len(call.chats) == 2 * 4 * 2  # per prompt and response: follow and neutral
    for j in judgments:
        assert j.mode == "contrast" and j.status == "ok"
        assert j.p_a_first == j.p_a_second == j.p_a and j.position_consistent is True
        assert j.delta_a is not None and j.delta_b is not None
        assert j.p_a == pytest.approx(sigmoid((j.delta_a - j.delta_b) / 2.0))
    row = judgments[0].to_row()
    assert (row["delta_a"], row["delta_b"]) == (judgments[0].delta_a, judgments[0].delta_b)


def test_contrast_neutral_chats_are_shared_between_principles():
    backend = ScriptedBackend()
    two = [Comparison("q?", "a b", "c", p) for p in PLAIN.principles]
    judge_comparisons(backend, two, CONTRAST)
    (call,) = backend.calls
    assert len(call.chats) == 2 * 2 + 2  # follow per principle and response, neutral per response


def test_contrast_best_vs_worst_ranks_by_delta_one_batch_per_round():
    backend = ScriptedBackend()
    one_principle = constitution(principle("helpful"))
    group = candidates("p", "bb bb", "a", "dd dd dd dd", "cc cc cc")
    config = JudgeConfig(mode="contrast", pair_strategy="best_vs_worst")
    judgments = judge_all(backend, one_principle, by_prompt(group), config)
    pointwise = [j for j in judgments if j.response_b_id is None]
    (pairwise,) = [j for j in judgments if j.response_b_id is not None]
    assert [j.delta_a for j in pointwise] == [1.0, 0.5, 2.0, 1.5]
    assert all(j.delta_b is None and j.mode == "contrast" for j in pointwise)
    assert pointwise[0].p_a == pytest.approx(sigmoid(1.0 / 3.0))
    assert (pairwise.response_a_id, pairwise.response_b_id) == ("p-r1", "p-r2")
    assert (pairwise.delta_a, pairwise.delta_b) == (0.5, 2.0) and pairwise.p_a < 0.5
    # Each round is one prefill batch, as in the pipeline: the pointwise pass scores
    # every response's follow and neutral chats, the comparison its two responses' again.
    assert [len(call.chats) for call in backend.calls] == [4 * 2, 2 * 2]


def test_contrast_checked_principles_are_still_decided_by_checks():
    backend = ScriptedBackend()
    group = candidates("p", "short one", "this one is far too long")
    (judgment,) = judge_all(backend, SHORT, by_prompt(group), CONTRAST)
    assert backend.calls == []
    assert judgment.mode == "checks" and judgment.p_a == 1.0
    assert (judgment.delta_a, judgment.delta_b) == (None, None)


def test_contrast_missing_scores_are_missing_logprobs_and_never_pairs():
    def sequence(chat):
        return None if chat[-1]["content"] == "second" else SequenceScore(-1.0, 1)

    backend = ScriptedBackend(sequence_fn=sequence)
    judgment = judge_one(backend, CONTRAST)
    assert judgment.status == "missing_logprobs"
    assert judgment.p_a is None and judgment.position_consistent is None
    outcome = build_pairs([judgment], by_prompt(candidates("p", "first", "second")), CONTRAST)
    assert outcome.pairs == [] and outcome.dropped["missing_logprobs"] == 1


def test_likelihood_baseline_reads_mean_loglik_without_the_principle():
    backend = ScriptedBackend(
        sequence_fn=lambda chat: SequenceScore(-len(chat[-1]["content"]), 2, end_logprob=-1.0)
    )
    config = JudgeConfig(mode="likelihood", contrast_tau=1.0)
    (label,) = judge_comparisons(backend, comparisons(("abcde", "abc")), config)
    assert (label.delta_a, label.delta_b) == (-2.0, pytest.approx(-4 / 3))
    assert label.p_a == pytest.approx(sigmoid(-2.0 + 4 / 3))
    (call,) = backend.calls
    assert {system_prompt(c) for c in call.chats} == {NEUTRAL_SYSTEM}
    assert all(HELPFUL.text not in str(c) for c in call.chats)
    assert judge_one(ScriptedBackend(), config).mode == "likelihood"


def test_ensemble_asks_both_orders_with_examples_and_scores_sequences():
    backend = ScriptedBackend()
    judgment = judge_one(backend, JudgeConfig(mode="ensemble"))
    assert [c.method for c in backend.calls] == [
        "score_options",
        "score_options",
        "score_sequences",
    ]
    assert len(backend.calls[0].chats[0]) == 2 * len(FEW_SHOT) + 2  # always few-shot
    assert judgment.mode == "ensemble" and judgment.status == "ok"
    assert judgment.delta_a is not None and judgment.option_mass == pytest.approx(0.9)


def test_the_default_mode_is_contrast():
    judgment = judge_one(ScriptedBackend(), JudgeConfig())
    assert judgment.mode == "contrast" and judgment.position_consistent is True
    assert judgment.delta_a is not None


# --- judge_comparisons ---------------------------------------------------------------


def test_judge_comparisons_uses_the_given_principle_and_batches_per_order():
    backend = ScriptedBackend()
    pairs = [Comparison("q?", "long answer", "short", p) for p in (*PLAIN.principles, HELPFUL)]
    labels = judge_comparisons(backend, pairs, LOGPROB)
    assert [c.method for c in backend.calls] == ["score_options", "score_options"]
    assert [len(c.chats) for c in backend.calls] == [3, 3]
    for chat, p in zip(backend.calls[0].chats, pairs, strict=True):
        assert p.principle.text in last_user_message(chat)
    assert all(label.status == "ok" and label.p_a > 0.5 for label in labels)
    assert judge_comparisons(backend, [], LOGPROB) == []


def test_judge_comparisons_decides_checked_principles_by_checks():
    backend = ScriptedBackend()
    brief = SHORT.principles[0]
    pairs = [Comparison("q?", "ok", "this one is too long", brief), *comparisons(("a b", "c"))]
    checked, asked = judge_comparisons(backend, pairs, CONTRAST)
    assert checked.p_a == 1.0 and checked.delta_a is None
    assert asked.delta_a == 1.0
    assert len(backend.calls[0].chats) == 4  # only the unchecked comparison is scored


def test_few_shot_puts_solved_examples_before_the_question():
    backend = ScriptedBackend()
    judge_comparisons(
        backend, comparisons(("first", "second")), JudgeConfig(mode="logprob", few_shot=True)
    )
    first, second = (call.chats[0] for call in backend.calls_to("score_options"))
    for chat in (first, second):
        assert len(chat) == 2 * len(FEW_SHOT) + 2
        assert [chat[1]["content"], chat[3]["content"]] == [f"{LEAD_IN}A)", f"{LEAD_IN}B)"]
        assert chat[-1] == {"role": "assistant", "content": LEAD_IN}
    assert "(A) first\n(B) second" in last_user_message(first)
    assert "(A) second\n(B) first" in last_user_message(second)


def test_judgment_ids_distinguish_the_label_settings():
    group = by_prompt(candidates("p", "first", "second"))

    def judgment_id(config):
        return judge_all(ScriptedBackend(), PLAIN, group, config)[0].judgment_id

    ids = [
        judgment_id(LOGPROB),
        judgment_id(JudgeConfig(mode="logprob", few_shot=True)),
        judgment_id(CONTRAST),
        judgment_id(JudgeConfig(mode="contrast", contrast_tau=1.0)),
        judgment_id(JudgeConfig(mode="contrast", contrast_negative="opposite")),
        judgment_id(JudgeConfig(mode="contrast", contrast_tau=2.0, contrast_length="sqrt_tokens")),
        judgment_id(JudgeConfig(mode="ensemble", contrast_length="sqrt_tokens")),
        judgment_id(JudgeConfig(mode="likelihood")),
        judgment_id(JudgeConfig(mode="ensemble")),
    ]
    ids += [
        judgment_id(JudgeConfig(mode="logprob", min_option_mass=0.2)),
        judgment_id(JudgeConfig(mode="cot", cot_clamp=(0.3, 0.7))),
        judgment_id(JudgeConfig(mode="cot")),
        judgment_id(JudgeConfig(mode="logprob", sanitize=False)),
    ]
    assert len(set(ids)) == len(ids)
    # Settings of other modes, and the pair thresholds, leave a judgment's id alone.
    assert judgment_id(LOGPROB) == judgment_id(JudgeConfig(mode="logprob", contrast_tau=9.0))
    assert judgment_id(CONTRAST) == judgment_id(
        JudgeConfig(mode="contrast", contrast_tau=2.0, min_confidence=0.9, min_option_mass=0.5)
    )
    # The question modes and the likelihood baseline do not read contrast_length.
    for mode in ("logprob", "likelihood"):
        assert judgment_id(JudgeConfig(mode=mode)) == judgment_id(
            JudgeConfig(mode=mode, contrast_length="sqrt_tokens")
        )


def test_judgment_ids_hash_the_principle_not_the_constitution():
    group = by_prompt(candidates("p", *(f"answer {i}" for i in range(6))))
    helpful, honest = PLAIN.principles
    edited = replace(PLAIN, principles=(replace(helpful, text="Be kind."), honest))

    def ids(constitution, backend_name="judge"):
        backend = ScriptedBackend(model_name=backend_name)
        judged = judge_all(backend, constitution, group, CONTRAST)
        return {(j.principle_id, j.judgment_id) for j in judged}

    renamed = replace(PLAIN, name="another name", version="9")
    assert renamed.constitution_id != PLAIN.constitution_id
    assert ids(renamed) == ids(PLAIN)  # only the principle's own text counts
    before, after = ids(PLAIN), ids(edited)
    assert {p for p, _ in before} == {"helpful", "honest"}
    assert {x for x in before if x[0] == "honest"} == {x for x in after if x[0] == "honest"}
    assert {x for x in before if x[0] == "helpful"}.isdisjoint(after)
    assert {j for _, j in ids(PLAIN, "another-judge")}.isdisjoint(j for _, j in before)


def test_a_principle_fingerprint_changes_with_its_text_and_checks_only():
    (brief,) = SHORT.principles
    base = principle_fingerprint(brief)
    assert principle_fingerprint(replace(brief, weight=5.0, critique="Other?")) == base
    assert principle_fingerprint(replace(brief, text="Be short.")) != base
    assert principle_fingerprint(replace(brief, checks=(Check("max_words", 4),))) != base


def test_principles_are_sampled_by_weight_and_a_weight_edit_moves_only_its_draws():
    weighted = constitution(principle("a"), principle("b", weight=2), principle("c"))
    keys = [f"judge:p:{i}" for i in range(4000)]
    drawn = [weighted.sample_principle(k, 0).id for k in keys]
    shares = {pid: drawn.count(pid) / len(keys) for pid in "abc"}
    assert shares == pytest.approx({"a": 0.25, "b": 0.5, "c": 0.25}, abs=0.03)
    heavier = constitution(principle("a"), principle("b", weight=2), principle("c", weight=3))
    moved = [
        (old, new)
        for k, old in zip(keys, drawn, strict=True)
        if (new := heavier.sample_principle(k, 0).id) != old
    ]
    assert moved and all(new == "c" for _, new in moved)  # only c gains, nobody else moves


# --- Template wording in the ids --------------------------------------------------

# One judgment per way of asking; "checks" needs no template.
WAYS = {  # name: (config, pointwise)
    "logprob": (LOGPROB, False),
    "few_shot": (JudgeConfig(mode="logprob", few_shot=True), False),
    "cot": (JudgeConfig(mode="cot"), False),
    "yes_no": (LOGPROB, True),
    "contrast": (CONTRAST, False),
    "opposite": (JudgeConfig(mode="contrast", contrast_negative="opposite"), False),
    "likelihood": (JudgeConfig(mode="likelihood"), False),
    "ensemble": (JudgeConfig(mode="ensemble"), False),
}
QUESTION_MODES = {"logprob", "few_shot", "cot", "yes_no", "ensemble"}  # fenced text


def ids_by_way() -> dict[str, str]:
    """Each way's judgment id of one question, the templates rendered afresh."""
    template_fingerprint.cache_clear()
    a, b = candidates("p", "first", "second")
    helpful, (brief,) = PLAIN.principles[0], SHORT.principles
    ids = {
        name: judgment_id(Question(a, None if pointwise else b, helpful), "judge", config)
        for name, (config, pointwise) in WAYS.items()
    }
    return ids | {"checks": judgment_id(Question(a, b, brief), "judge", LOGPROB)}


def reworded(function: Callable, old: str, new: str) -> Callable:
    """``function`` with ``old`` replaced by ``new`` in what it returns (a text, texts or
    a chat): an edit of the wording inside a template function."""

    def edited(*args, **kwargs):
        out = function(*args, **kwargs)
        if isinstance(out, str):
            return out.replace(old, new)
        if isinstance(out, tuple):
            return tuple(text.replace(old, new) for text in out)
        return [{**m, "content": m["content"].replace(old, new)} for m in out]

    return edited


T, A, C = alignment.templates, alignment.asking, alignment.critique
EDITS = {  # edit: (patches (module, name, new value), the ways whose ids change)
    "LEAD_IN": ([(T, "LEAD_IN", "The better one is (")], {"logprob", "few_shot", "yes_no",
                                                          "ensemble"}),
    "COT_LEAD_IN": ([(T, "COT_LEAD_IN", "So the answer is (")], {"cot"}),
    "FEW_SHOT": ([(T, "FEW_SHOT", (FEW_SHOT[1], FEW_SHOT[0]))], {"few_shot", "ensemble"}),
    "NEUTRAL_SYSTEM": ([(T, "NEUTRAL_SYSTEM", "You help."), (A, "NEUTRAL_SYSTEM", "You help.")],
                       {"contrast", "opposite", "likelihood", "ensemble"}),
    "INDENT": ([(T, "INDENT", "  ")], QUESTION_MODES),
    "question": ([(T, "_pairwise_question", reworded(T._pairwise_question, "follows the",
                                                     "keeps to the"))],
                 {"logprob", "few_shot", "cot", "ensemble"}),
    "yes/no question": ([(A, "pointwise_judge_chat", reworded(A.pointwise_judge_chat,
                                                             "Does the", "Did the"))],
                        {"yes_no"}),
    "instruction": ([(T, "principle_instruction", reworded(T.principle_instruction,
                                                           "Write a", "Give a"))],
                    {"contrast", "opposite", "ensemble"}),
    "opposite": ([(A, "contrast_systems", reworded(A.contrast_systems, "opposite of this",
                                                   "reverse of this"))], {"opposite"}),
    "control tokens": ([(T, "_SPECIAL_TOKEN", re.compile(r"<\|im_start\|>"))],
                       {*QUESTION_MODES, "contrast", "opposite", "likelihood"}),
    "critique": ([(T, "critique_chat", reworded(T.critique_chat, "?", "!")),
                  (C, "critique_chat", reworded(C.critique_chat, "?", "!"))], set()),
}  # fmt: skip


@pytest.fixture
def fresh_fingerprints():
    template_fingerprint.cache_clear()
    yield
    template_fingerprint.cache_clear()


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_a_template_edit_relabels_exactly_the_judgments_that_use_it(
    edit, monkeypatch, fresh_fingerprints
):
    before = ids_by_way()
    assert len(set(before.values())) == len(before)
    patches, changed = EDITS[edit]
    for module, name, value in patches:
        monkeypatch.setattr(module, name, value)
    after = ids_by_way()
    assert {way for way in before if before[way] != after[way]} == changed
    assert "checks" not in changed  # a check-decided judgment asks nothing


def test_the_fingerprint_renders_the_chats_the_judge_asks(fresh_fingerprints, monkeypatch):
    """The sentinel rendering goes through the judge's own chat builders: a template the
    judge stops asking in (few_shot off) no longer counts, and one it asks in does."""
    few_shot = JudgeConfig(mode="logprob", few_shot=True)
    plain = template_fingerprint("logprob", False, LOGPROB)
    shots = template_fingerprint("logprob", False, few_shot)
    assert plain != shots
    monkeypatch.setattr(alignment.templates, "FEW_SHOT", FEW_SHOT[:1])
    template_fingerprint.cache_clear()
    assert template_fingerprint("logprob", False, LOGPROB) == plain
    assert template_fingerprint("logprob", False, few_shot) != shots
    assert template_fingerprint("checks", False, LOGPROB) is None
