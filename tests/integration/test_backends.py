"""The real backends on the real tiny model: vLLM offline and a vLLM OpenAI server."""

from __future__ import annotations

import math

import pytest

from alignment.backends import (
    EndpointsDown,
    LabelTokenError,
    OpenAIBackend,
    SamplingConfig,
    label_token_variants,
)
from alignment.templates import (
    LABELS,
    LEAD_IN,
    cot_answer_chat,
    pairwise_cot_chat,
    pairwise_judge_chat,
)

pytestmark = pytest.mark.integration

CHATS = [
    [{"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "user", "content": "Write a short poem about rain."}],
]
JUDGE_CHATS = [
    pairwise_judge_chat(
        "Choose the response that is more helpful.",
        "How do I boil an egg?",
        "Put the egg in boiling water for nine minutes.",
        "Eggs are food.",
    ),
    pairwise_judge_chat(
        "Choose the response that is kinder.",
        "Rate my drawing.",
        "It is a good start; the colours work well.",
        "It is bad.",
    ),
]


def test_vllm_samples_n_completions_per_chat(vllm_backend):
    out = vllm_backend.generate(CHATS, SamplingConfig(n=3, max_tokens=16, temperature=1.0))
    assert [len(samples) for samples in out] == [3, 3]
    for samples in out:
        for completion in samples:
            assert 1 <= completion.num_tokens <= 16
            assert completion.finish_reason in {"stop", "length"}
            assert completion.finish_reason == "stop" or completion.num_tokens == 16


def test_vllm_greedy_is_repeatable(vllm_backend):
    greedy = SamplingConfig(n=1, max_tokens=12, temperature=0.0)
    first = vllm_backend.generate(CHATS, greedy)
    again = vllm_backend.generate(CHATS, greedy)
    assert [s[0].text for s in first] == [s[0].text for s in again]


def test_vllm_judge_logprobs_are_real_next_token_logprobs(vllm_backend):
    scores = vllm_backend.score_options(JUDGE_CHATS, LABELS)
    assert len(scores) == 2
    for score in scores:
        assert set(score) == {"A", "B"}
        assert all(v is not None and v < 0 for v in score.values())
        # the tiny judge was trained to answer with a label after the lead-in
        assert 0.5 < math.exp(score["A"]) + math.exp(score["B"]) <= 1.0 + 1e-6


def test_labels_must_be_single_tokens(vllm_backend):
    tokenizer = vllm_backend.tokenizer
    variants = label_token_variants(tokenizer, LABELS)
    for label, ids in variants.items():
        # First the token the tokenizer writes for the label after the lead-in.
        assert ids[0] == tokenizer.encode(LEAD_IN + label, add_special_tokens=False)[-1]
    too_long = r"splits option label 'zebra-crossing' into \d+ tokens"
    with pytest.raises(LabelTokenError, match=too_long):
        label_token_variants(vllm_backend.tokenizer, ["A", "zebra-crossing"])


def test_vllm_reads_the_labels_after_a_cot_rationale(vllm_backend):
    cot = pairwise_cot_chat("Be kind.", "Rate my drawing.", "Nice colours.", "It is bad.")
    (score,) = vllm_backend.score_options([cot_answer_chat(cot, "(A) is kinder.")], LABELS)
    assert all(v is not None and v < 0 for v in score.values())


def test_openai_backend_samples_from_real_server(openai_server):
    backend = OpenAIBackend(openai_server, "tiny", max_concurrency=2)
    out = backend.generate(CHATS, SamplingConfig(n=2, max_tokens=12, temperature=1.0))
    assert [len(samples) for samples in out] == [2, 2]
    assert all(c.text for samples in out for c in samples)


def test_openai_backend_judge_matches_offline_engine(openai_server, vllm_backend):
    backend = OpenAIBackend(openai_server, "tiny")
    served = backend.score_options(JUDGE_CHATS, LABELS)
    offline = vllm_backend.score_options(JUDGE_CHATS, LABELS)
    for s, o in zip(served, offline, strict=True):
        for label in LABELS:
            assert s[label] is not None
            assert s[label] == pytest.approx(o[label], abs=0.02)


def test_openai_backend_reports_missing_labels_as_none(openai_server):
    backend = OpenAIBackend(openai_server, "tiny", top_logprobs=1)
    scores = backend.score_options(JUDGE_CHATS, LABELS)
    # with one top log-prob only one label can be seen; the other is None, never a guess
    for score in scores:
        assert sum(v is None for v in score.values()) >= 1


def test_openai_backend_retries_then_raises():
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "tiny", down_after_s=1, timeout_s=2)
    with pytest.raises(EndpointsDown, match=r"http://127\.0\.0\.1:9/v1 \(.*ConnectError"):
        backend.generate(CHATS[:1], SamplingConfig(max_tokens=4))
