"""The judge's modes on the real tiny model (the arithmetic itself is unit-tested)."""

from __future__ import annotations

import pytest

from alignment.constitution import from_dict
from alignment.judge import Candidate, JudgeConfig, build_pairs, judge_prompts

pytestmark = pytest.mark.integration

CONSTITUTION = from_dict(
    {
        "name": "t",
        "version": 1,
        "principles": [
            {
                "id": "helpful",
                "principle": "Choose the response that answers the question.",
                "critique": "Say how the response fails to answer.",
                "revision": "Rewrite the response to answer.",
            }
        ],
    }
)
TEXTS = ["Boil it for nine minutes.", "Eggs.", "Use a pan of water and a timer.", "No."]


def candidates(n_prompts: int = 2) -> dict[str, list[Candidate]]:
    return {
        f"p{i}": [
            Candidate(f"p{i}r{k}", f"p{i}", "How do I boil an egg?", text)
            for k, text in enumerate(TEXTS)
        ]
        for i in range(n_prompts)
    }


def test_cot_mode_generates_rationales_and_clamps(vllm_backend):
    config = JudgeConfig(mode="cot", cot_max_tokens=16, min_confidence=0.5)
    judgments = judge_prompts(vllm_backend, CONSTITUTION, candidates(1), config)
    assert len(judgments) == 6
    for j in judgments:
        assert j.mode == "cot"
        assert j.rationale
        if j.status == "ok":
            assert 0.4 <= j.p_a_first <= 0.6 and 0.4 <= j.p_a_second <= 0.6
        else:
            assert j.p_a is None  # a refusal or unparseable rationale is never a preference
    pairs = build_pairs(judgments, candidates(1), config).pairs
    assert all(p.p_chosen <= 0.6 for p in pairs)


def test_best_vs_worst_scores_pointwise_then_compares_once(vllm_backend):
    config = JudgeConfig(pair_strategy="best_vs_worst", min_confidence=0.5)
    judgments = judge_prompts(vllm_backend, CONSTITUTION, candidates(2), config)
    pointwise = [j for j in judgments if j.response_b_id is None]
    pairwise = [j for j in judgments if j.response_b_id is not None]
    assert len(pointwise) == 2 * len(TEXTS)
    assert len(pairwise) <= 2  # at most one comparison per prompt
    for j in pointwise:
        assert j.mode == "pointwise" and 0 <= j.p_a <= 1
