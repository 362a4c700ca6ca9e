"""The judge: soft-label arithmetic, statuses, checks, strategies, batching, pairs."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
from pydantic import ValidationError

from alignment.constitution import from_dict
from alignment.judge import (
    DROP_REASONS,
    Candidate,
    JudgeConfig,
    Judgment,
    build_pairs,
    decide_by_checks,
    judge_prompts,
    rationale_status,
    read_soft_label,
)
from alignment.templates import COT_LEAD_IN, LEAD_IN
from tests.scripted_backend import ScriptedBackend, last_user_message

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
SHORT = constitution(principle("brief", checks=[{"max_words": 3}]))


def candidates(prompt_id: str, *texts: str) -> list[Candidate]:
    return [
        Candidate(f"{prompt_id}-r{i}", prompt_id, f"question {prompt_id}?", text)
        for i, text in enumerate(texts)
    ]


def by_prompt(*groups: list[Candidate]) -> dict[str, list[Candidate]]:
    return {group[0].prompt_id: group for group in groups}


def scripted_orders(first: dict, second: dict) -> ScriptedBackend:
    """A backend answering order-1 chats with ``first`` and order-2 chats with ``second``.

    Candidate texts "first" and "second" tell the orders apart: order 1 shows "first" as (A).
    """

    def score(chat, options):
        return dict(first) if "(A) first" in last_user_message(chat) else dict(second)

    return ScriptedBackend(score_fn=score)


def judge_one(backend: ScriptedBackend, config: JudgeConfig | None = None) -> Judgment:
    group = candidates("p", "first", "second")
    (judgment,) = judge_prompts(backend, PLAIN, by_prompt(group), config or JudgeConfig())
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
    (judgment,) = judge_prompts(backend, SHORT, by_prompt(group), JudgeConfig())
    assert backend.calls == []
    assert judgment.mode == "checks"
    assert judgment.status == "ok"
    assert (judgment.p_a_first, judgment.p_a_second, judgment.p_a) == (1.0, 1.0, 1.0)
    assert judgment.position_consistent is True
    assert judgment.option_mass is None and judgment.rationale is None


def test_checked_principles_are_decided_without_the_model_in_best_vs_worst():
    backend = ScriptedBackend()
    group = candidates("p", "short one", "this one is far too long", "tiny")
    config = JudgeConfig(pair_strategy="best_vs_worst")
    judgments = judge_prompts(backend, SHORT, by_prompt(group), config)
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
    assert judgment.mode == "pairwise" and judgment.status == "ok"
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
    outcome = build_pairs([judgment], by_prompt(candidates("p", "first", "second")), JudgeConfig())
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
    config = JudgeConfig(min_option_mass=0.1)
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
    first = judge_prompts(ScriptedBackend(), five, by_prompt(group), JudgeConfig())
    again = judge_prompts(ScriptedBackend(), five, by_prompt(group), JudgeConfig())
    reversed_ = judge_prompts(ScriptedBackend(), five, by_prompt(group[::-1]), JudgeConfig())

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
    judgments = judge_prompts(backend, PLAIN, by_prompt(*groups), JudgeConfig())
    assert len(judgments) == 3 * 6
    calls = backend.calls_to("score_options")
    assert len(backend.calls) == len(calls) == 2
    assert [len(c.chats) for c in calls] == [18, 18]
    expected = {(a.response_id, b.response_id) for g in groups for a, b in combinations(g, 2)}
    assert {(j.response_a_id, j.response_b_id) for j in judgments} == expected


def test_best_vs_worst_uses_n_pointwise_plus_one_comparison_per_prompt():
    backend = ScriptedBackend()
    groups = [candidates(f"p{k}", "bb", "a", "dddddddd", "ccc") for k in range(3)]
    config = JudgeConfig(pair_strategy="best_vs_worst")
    judgments = judge_prompts(backend, PLAIN, by_prompt(*groups), config)

    calls = backend.calls_to("score_options")
    assert len(backend.calls) == len(calls) == 4  # pointwise in 2 orders, then pairwise in 2
    assert [len(c.chats) for c in calls] == [12, 12, 3, 3]
    pointwise = [j for j in judgments if j.mode == "pointwise"]
    pairwise = [j for j in judgments if j.mode == "pairwise"]
    assert len(pointwise) == 12 and len(pairwise) == 3
    assert all(j.response_b_id is None for j in pointwise)
    # The scripted judge likes longer responses: best "dddddddd" (r2), worst "a" (r1),
    # compared in their given order.
    assert {(j.response_a_id, j.response_b_id) for j in pairwise} == {
        (f"p{k}-r1", f"p{k}-r2") for k in range(3)
    }
    by_id = {j.response_a_id: j.p_a for j in pointwise}
    assert by_id["p0-r2"] > by_id["p0-r3"] > by_id["p0-r0"] > by_id["p0-r1"]


def test_best_vs_worst_asks_pointwise_in_both_label_orders():
    backend = ScriptedBackend()
    config = JudgeConfig(pair_strategy="best_vs_worst")
    judge_prompts(backend, PLAIN, by_prompt(candidates("p", "a", "bbbb")), config)
    first, second = (c.chats[0] for c in backend.calls_to("score_options")[:2])
    assert "(A) yes\n(B) no" in last_user_message(first)
    assert "(A) no\n(B) yes" in last_user_message(second)


def test_best_vs_worst_skips_single_candidates_and_equal_scores():
    backend = ScriptedBackend()
    groups = [candidates("one", "only"), candidates("same", "abc", "xyz")]
    config = JudgeConfig(pair_strategy="best_vs_worst")
    judgments = judge_prompts(backend, PLAIN, by_prompt(*groups), config)
    assert [j.mode for j in judgments] == ["pointwise"] * 3
    assert len(backend.calls) == 2


def test_empty_batch_calls_nothing():
    backend = ScriptedBackend()
    assert judge_prompts(backend, PLAIN, {}, JudgeConfig()) == []
    assert judge_prompts(backend, PLAIN, by_prompt(candidates("p", "a")), JudgeConfig()) == []
    assert backend.calls == []


def test_judgment_ids_are_stable_and_distinguish_what_matters():
    group = by_prompt(candidates("p", "first", "second"))
    ids = {
        judge_prompts(ScriptedBackend(), PLAIN, group, JudgeConfig())[0].judgment_id
        for _ in range(2)
    }
    assert len(ids) == 1
    other_model = judge_prompts(ScriptedBackend("other"), PLAIN, group, JudgeConfig())[0]
    assert other_model.judgment_id not in ids
    cot = judge_prompts(cot_backend("fine"), PLAIN, group, JudgeConfig(mode="cot"))[0]
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
    ]


# --- Pairs --------------------------------------------------------------------------


def judgment(p_a: float | None, consistent: bool = True, status: str = "ok", **extra):
    fields = dict(
        judgment_id=f"j-{p_a}-{consistent}-{status}",
        prompt_id="p",
        response_a_id="p-r0",
        response_b_id="p-r1",
        principle_id="helpful",
        constitution_id="c",
        judge_model="judge",
        mode="pairwise",
        p_a_first=p_a,
        p_a_second=p_a,
        p_a=p_a,
        position_consistent=consistent,
        option_mass=1.0,
        status=status,
        rationale=None,
    )
    return Judgment(**{**fields, **extra})


PAIR_GROUP = by_prompt(candidates("p", "alpha", "beta"))


def test_build_pairs_picks_the_winner_with_its_confidence():
    outcome = build_pairs([judgment(0.8), judgment(0.25)], PAIR_GROUP, JudgeConfig())
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
        judgment(0.9, response_b_id=None, mode="pointwise"),
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
    outcome = build_pairs(judgments, PAIR_GROUP, JudgeConfig())
    assert outcome.dropped["tie"] == 1
    assert [(p.chosen, p.p_chosen) for p in outcome.pairs] == [("beta", 1.0)]


def test_pair_ids_are_stable_and_rows_use_lists():
    first = build_pairs([judgment(0.8)], PAIR_GROUP, JudgeConfig()).pairs[0]
    again = build_pairs([judgment(0.9)], PAIR_GROUP, JudgeConfig()).pairs[0]
    flipped = build_pairs([judgment(0.1)], PAIR_GROUP, JudgeConfig()).pairs[0]
    assert first.pair_id == again.pair_id != flipped.pair_id
    row = first.to_row()
    assert row["principle_ids"] == ["helpful"] and row["judgment_ids"] == ["j-0.8-True-ok"]


def test_end_to_end_scripted_judge_prefers_longer_responses():
    group = candidates("p", "short", "a much longer and more detailed answer")
    judgments = judge_prompts(ScriptedBackend(), PLAIN, by_prompt(group), JudgeConfig())
    (pair,) = build_pairs(judgments, by_prompt(group), JudgeConfig()).pairs
    assert pair.chosen_response_id == "p-r1"
    assert pair.p_chosen > 0.55


# --- Config -------------------------------------------------------------------------


def test_config_rejects_bad_values_with_the_values():
    with pytest.raises(ValidationError, match="min_confidence=0.7.*cot_clamp\\[1\\]=0.6"):
        JudgeConfig(mode="cot", min_confidence=0.7)
    with pytest.raises(ValidationError, match=r"\(0.6, 0.4\)"):
        JudgeConfig(cot_clamp=(0.6, 0.4))
    with pytest.raises(ValidationError):
        JudgeConfig(min_confidence=0.4)
    with pytest.raises(ValidationError):
        JudgeConfig(mode="vibes")
    with pytest.raises(ValidationError):
        JudgeConfig(temperature=0.3)  # unknown keys are errors
    JudgeConfig(mode="logprob", min_confidence=0.7)  # fine outside cot
