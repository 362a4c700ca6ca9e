"""The AI judge: soft preference labels from a constitution (CAI §4, RLAIF).

For each comparison of responses A and B to one prompt, one principle is
sampled by weight, and the multiple-choice question is asked in both orders.
Order 1 shows A as (A) and B as (B); order 2 shows B as (A) and A as (B).
From each order only the two labels' log-probs are kept and normalised:

    P1 = P(label A | order 1)      P2 = P(label B | order 2)
    p_a_first = P1, p_a_second = P2, p_a = (P1 + P2) / 2
    position_consistent = (P1 > 0.5) == (P2 > 0.5)

Chain-of-thought mode generates a rationale first and clamps P1 and P2 to
``cot_clamp`` before averaging (CAI §4.3).

Contrast mode asks no question (SAMI, RLCD): each response's Δ is its
log-likelihood under a system prompt that states the principle minus its
log-likelihood under a neutral one (or one asking for the opposite), and

    p_a_first = p_a_second = p_a = σ((Δ_A − Δ_B) / (contrast_tau · s))

with no option order, so no position bias; s is 1 (``contrast_length: sum``) or the
square root of the pair's mean token count (``sqrt_tokens``). Likelihood mode is its baseline
without the principle (each response's mean log-likelihood per token), and
ensemble mode averages the contrast log-odds with the A/B question's log-odds.

A principle with ``checks`` is decided by the checks, without a model call.
Refusals, unparseable answers and missing log-probs are statuses of their own and
never become preferences. Which mode is worth what on a 135M judge is measured in
docs/judging.md.

This module is the entry point (the questions of a run, their judgments and ids). The
settings are in alignment/judge_config.py, the labels' arithmetic per mode in
alignment/labels.py, the batched model calls and their chats in alignment/asking.py,
and pairs in alignment/pairs.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any

from alignment.asking import (
    Answer,
    Comparison,
    Likelihoods,
    answer_comparisons,
    template_fingerprint,
)
from alignment.backends import Backend
from alignment.constitution import Constitution, Principle
from alignment.conversation import Prompt, is_conversation
from alignment.ids import content_id
from alignment.judge_config import JudgeConfig, id_mode_name, model_mode
from alignment.labels import Mode, SoftLabel, Status


@dataclass(frozen=True)
class Candidate:
    response_id: str
    prompt_id: str
    prompt: Prompt  # a text, or a conversation the response continues
    text: str


@dataclass(frozen=True)
class Judgment:
    """One judged question; field names are the store's ``judgments`` columns."""

    judgment_id: str
    prompt_id: str
    response_a_id: str
    response_b_id: str | None  # None for pointwise
    principle_id: str
    constitution_id: str
    judge_model: str
    mode: Mode
    p_a_first: float | None
    p_a_second: float | None
    p_a: float | None  # pointwise: P(response A follows the principle)
    position_consistent: bool | None
    option_mass: float | None  # min over both orders; None when unknown
    status: Status
    rationale: str | None  # cot only: both orders' rationales
    delta_a: float | None = None  # contrast: response A's log-likelihood ratio Δ
    delta_b: float | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def judge_comparisons(
    backend: Backend, comparisons: Sequence[Comparison], config: JudgeConfig
) -> list[SoftLabel]:
    """P(a is better) for each comparison under its given principle, in the config's mode.

    A principle with checks is decided by them. Everything else is batched: one
    backend call per order of the A/B question, one call for all sequence scores.
    """
    return [
        answer.label
        for answer in answer_comparisons(backend, comparisons, config, Likelihoods(backend))
    ]


# --- Judging a run's candidates ---------------------------------------------------


@dataclass(frozen=True)
class Question:
    """One comparison (b set) or one pointwise score (b None) under one principle."""

    a: Candidate
    b: Candidate | None
    principle: Principle


def _comparison(constitution: Constitution, a: Candidate, b: Candidate, seed: int) -> Question:
    # Sorted ids: the same comparison gets the same principle whatever the candidates' order.
    key = ":".join(["judge", a.prompt_id, *sorted([a.response_id, b.response_id])])
    return Question(a, b, constitution.sample_principle(key, seed))


def _pointwise(constitution: Constitution, a: Candidate, seed: int) -> Question:
    key = f"pointwise:{a.prompt_id}:{a.response_id}"
    return Question(a, None, constitution.sample_principle(key, seed))


def question_mode(question: Question, config: JudgeConfig) -> Mode:
    """How the question is answered, known before asking: by its checks, or the model."""
    if question.principle.checks:
        return "checks"
    return model_mode(question.b is None, config)


def principle_fingerprint(principle: Principle) -> str:
    """What of a principle a judgment depends on: its id, its text and its checks (not
    its weight, which only decides which questions it gets, nor its critique requests)."""
    checks = [c.as_dict() for c in principle.checks]
    return content_id("judged-principle", principle.id, principle.text, checks)


def label_settings(
    mode: Mode, pointwise: bool, config: JudgeConfig, conversation: bool = False
) -> dict[str, Any]:
    """The judge settings that decide the numbers of a judgment made in ``mode`` (of a
    pointwise score, or of a comparison), and the fingerprint of the templates it is
    asked in (a multi-turn prompt's wording when ``conversation``)."""
    settings: dict[str, Any] = {"mode": id_mode_name(mode, pointwise)}
    if mode != "checks":
        settings["sanitize"] = config.sanitize
        settings["templates"] = template_fingerprint(mode, pointwise, config, conversation)
    if mode in ("logprob", "cot", "ensemble"):
        settings["min_option_mass"] = config.min_option_mass
    if mode == "logprob" and not pointwise:
        settings["few_shot"] = config.few_shot
    if mode == "cot":
        settings |= {
            "cot_clamp": list(config.cot_clamp),
            "cot_max_tokens": config.cot_max_tokens,
            "cot_temperature": config.cot_temperature,
            "seed": config.seed,
        }
    if mode in ("contrast", "likelihood", "ensemble"):
        settings["contrast_tau"] = config.contrast_tau
    if mode in ("contrast", "ensemble"):
        settings["contrast_negative"] = config.contrast_negative
        if config.contrast_length != "sum":  # sum keeps the ids of judgments made before
            settings["contrast_length"] = config.contrast_length
    if mode == "ensemble":
        settings["ensemble_ab_scale"] = config.ensemble_ab_scale
    return settings


def judgment_id(question: Question, judge_model: str, config: JudgeConfig) -> str:
    """Hashes every input that determines the judgment: the prompt and responses, the
    principle's own fingerprint (not the whole constitution's), and the judge model and
    settings of its mode. A check-decided judgment needs no model, so it names none."""
    mode = question_mode(question, config)
    b_id = question.b.response_id if question.b is not None else None
    return content_id(
        "judgment",
        question.a.prompt_id,
        question.a.response_id,
        b_id,
        principle_fingerprint(question.principle),
        None if mode == "checks" else judge_model,
        label_settings(mode, question.b is None, config, is_conversation(question.a.prompt)),
    )


def _judgment(
    question: Question,
    answer: Answer,
    constitution_id: str,
    judge_model: str,
    config: JudgeConfig,
) -> Judgment:
    return Judgment(
        judgment_id=judgment_id(question, judge_model, config),
        prompt_id=question.a.prompt_id,
        response_a_id=question.a.response_id,
        response_b_id=question.b.response_id if question.b is not None else None,
        principle_id=question.principle.id,
        constitution_id=constitution_id,
        judge_model=judge_model,
        mode=answer.mode,
        rationale=answer.rationale,
        **asdict(answer.label),  # the status, probabilities and deltas, named as in SoftLabel
    )


def judge_questions(
    backend: Backend,
    questions: Sequence[Question],
    config: JudgeConfig,
    constitution_id: str,
) -> list[Judgment]:
    """Answer questions (comparisons first, then pointwise scores), in the given order.

    ``constitution_id`` is lineage only: it is not part of a judgment's id.
    """
    likelihoods = Likelihoods(backend)
    answers: dict[int, Answer] = {}
    for pointwise in (False, True):  # one kind per batch
        idx = [i for i, q in enumerate(questions) if (q.b is None) == pointwise]
        asks = [
            Comparison(q.a.prompt, q.a.text, q.b.text if q.b is not None else None, q.principle)
            for q in (questions[i] for i in idx)
        ]
        answers |= dict(
            zip(idx, answer_comparisons(backend, asks, config, likelihoods), strict=True)
        )
    return [
        _judgment(q, answers[i], constitution_id, backend.model_name, config)
        for i, q in enumerate(questions)
    ]


def first_questions(
    constitution: Constitution,
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> list[Question]:
    """What is asked first: every pair (all_pairs), or each candidate pointwise
    (best_vs_worst). One principle is sampled per question by weight."""
    seed = config.seed
    if config.pair_strategy == "all_pairs":
        return [
            _comparison(constitution, a, b, seed)
            for candidates in candidates_by_prompt.values()
            for a, b in combinations(candidates, 2)
        ]
    return [
        _pointwise(constitution, c, seed)
        for candidates in candidates_by_prompt.values()
        for c in candidates
    ]


def second_questions(
    constitution: Constitution,
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    first: Sequence[Judgment],
    config: JudgeConfig,
) -> list[Question]:
    """best_vs_worst: each prompt's best- against worst-scored candidate, from the
    pointwise judgments ``first``; all_pairs asks nothing more."""
    if config.pair_strategy == "all_pairs":
        return []
    scores = {j.response_a_id: j.p_a for j in first if j.status == "ok" and j.p_a is not None}
    return [
        q
        for candidates in candidates_by_prompt.values()
        if (q := _best_vs_worst(constitution, scores, candidates, config.seed)) is not None
    ]


def _best_vs_worst(
    constitution: Constitution,
    scores: Mapping[str, float],
    candidates: Sequence[Candidate],
    seed: int,
) -> Question | None:
    """The comparison of the best- and worst-scored candidates, in their given order."""
    scored = [c for c in candidates if c.response_id in scores]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda c: scores[c.response_id])
    worst = min(scored, key=lambda c: scores[c.response_id])
    if scores[best.response_id] == scores[worst.response_id]:
        return None
    a, b = sorted([best, worst], key=scored.index)
    return _comparison(constitution, a, b, seed)


def judgments_in_rounds(
    constitution: Constitution,
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
    judgments_for: Callable[[list[Question]], list[Judgment]],
) -> list[Judgment]:
    """The judgments of each prompt's candidates, in the rounds the questions depend on:
    ``judgments_for`` the first questions, then for the second ones, which best_vs_worst
    asks from the first round's judgments. ``judgments_for`` answers one round (the
    pipeline: reads the stored judgments and asks the judge only for the missing ones)."""
    first = judgments_for(first_questions(constitution, candidates_by_prompt, config))
    second = second_questions(constitution, candidates_by_prompt, first, config)
    return first + judgments_for(second)
