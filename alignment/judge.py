"""The AI judge: soft preference labels from a constitution (CAI §4, RLAIF).

For each comparison of responses A and B to one prompt, one principle is
sampled by weight, and the multiple-choice question is asked in both orders.
Order 1 shows A as (A) and B as (B); order 2 shows B as (A) and A as (B).
From each order only the two labels' log-probs are kept and normalised:

    P1 = P(label A | order 1)      P2 = P(label B | order 2)
    p_a_first = P1, p_a_second = P2, p_a = (P1 + P2) / 2
    position_consistent = (P1 > 0.5) == (P2 > 0.5)

Chain-of-thought mode generates a rationale first and clamps P1 and P2 to
``cot_clamp`` before averaging (CAI §4.3). A principle with ``checks`` is
decided by the checks, without a model call. Refusals, unparseable answers and
missing log-probs are statuses of their own and never become preferences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.backends import Backend, Chat, SamplingConfig, logsumexp
from alignment.constitution import Constitution, Principle
from alignment.ids import content_id
from alignment.templates import (
    LABELS,
    cot_answer_chat,
    pairwise_cot_chat,
    pairwise_judge_chat,
    pointwise_judge_chat,
)

Status = Literal["ok", "refusal", "unparseable", "missing_logprobs"]
Mode = Literal["pairwise", "cot", "checks", "pointwise"]
LabelLogprobs = Mapping[str, float | None]

DROP_REASONS = (
    "tie",
    "low_confidence",
    "position_inconsistent",
    "refusal",
    "unparseable",
    "missing_logprobs",
)
RATIONALE_SEPARATOR = "\n--- order 2 ---\n"

# Anchored at the start: a rationale often quotes a response that itself refuses.
REFUSAL_PATTERN = re.compile(
    r"^\W*(?:sorry\b|i\s+apologi[sz]e|as\s+an\s+ai\b|i\s+am\s+(?:sorry|unable)"
    r"|i['’]m\s+(?:sorry|unable|not\s+able)"
    r"|i\s+(?:can['’]?t|cannot|won['’]?t|will\s+not|am\s+not\s+able)\b)",
    re.IGNORECASE,
)


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["logprob", "cot"] = Field(
        "logprob",
        description="logprob: read the label log-probs right after the question. "
        "cot: generate a rationale first, then read them; probabilities are clamped "
        "to cot_clamp (CAI §4.3).",
    )
    pair_strategy: Literal["all_pairs", "best_vs_worst"] = Field(
        "all_pairs",
        description="all_pairs: compare every pair of a prompt's responses (n(n-1)/2 "
        "comparisons). best_vs_worst: score each response pointwise, then compare "
        "the best with the worst (n + 1). Pointwise scores always read log-probs, "
        "even in cot mode.",
    )
    min_confidence: float = Field(
        0.55,
        ge=0.5,
        le=1.0,
        description="Pairs whose p_chosen is below this are dropped (counted as "
        "low_confidence). In cot mode it must not exceed cot_clamp[1].",
    )
    require_position_consistent: bool = Field(
        False,
        description="Drop pairs whose two orders prefer different responses.",
    )
    min_option_mass: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="If P(A) + P(B) under the full next-token distribution is below "
        "this in either order, the answer is 'unparseable' (the judge wanted to "
        "say something else).",
    )
    cot_max_tokens: int = Field(128, gt=0, description="Token budget of a cot rationale.")
    cot_temperature: float = Field(
        0.0, ge=0.0, description="Sampling temperature of a cot rationale."
    )
    cot_clamp: tuple[float, float] = Field(
        (0.4, 0.6),
        description="Each order's cot probability is clamped to [low, high] before "
        "averaging, because rationales make the label over-confident (CAI §4.3).",
    )
    seed: int = Field(0, description="Seeds principle sampling and cot rationales.")

    @model_validator(mode="after")
    def _check_combinations(self) -> JudgeConfig:
        low, high = self.cot_clamp
        if not 0.0 <= low <= 0.5 <= high <= 1.0:
            raise ValueError(
                f"cot_clamp must satisfy 0 <= low <= 0.5 <= high <= 1, got ({low}, {high})"
            )
        if self.mode == "cot" and self.min_confidence > high:
            raise ValueError(
                f"min_confidence={self.min_confidence} exceeds cot_clamp[1]={high}: in cot "
                "mode every pair would be dropped"
            )
        return self


# --- Data -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    response_id: str
    prompt_id: str
    prompt: str
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

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PreferencePair:
    """Field names are the store's ``preference_pairs`` columns that the judge knows."""

    pair_id: str
    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_response_id: str
    rejected_response_id: str
    p_chosen: float
    principle_ids: tuple[str, ...]
    judgment_ids: tuple[str, ...]
    constitution_id: str
    judge_model: str

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["principle_ids"] = list(self.principle_ids)
        row["judgment_ids"] = list(self.judgment_ids)
        return row


@dataclass
class PairOutcome:
    pairs: list[PreferencePair]
    dropped: dict[str, int]  # reason (DROP_REASONS) -> count


# --- The arithmetic (pure) --------------------------------------------------------


@dataclass(frozen=True)
class SoftLabel:
    """What both orders of one question say; p fields are None unless status is ok."""

    status: Status
    p_a_first: float | None = None
    p_a_second: float | None = None
    p_a: float | None = None
    position_consistent: bool | None = None
    option_mass: float | None = None


def normalised(logp: float, other_logp: float) -> float:
    """P(first label) after a softmax over the two labels only."""
    return math.exp(logp - logsumexp([logp, other_logp]))


def _label_logprobs(logprobs: LabelLogprobs) -> tuple[float, float] | None:
    values = [logprobs.get(label) for label in LABELS]
    if any(v is None or math.isnan(v) for v in values):
        return None
    return values[0], values[1]


def read_soft_label(
    first: LabelLogprobs,
    second: LabelLogprobs,
    *,
    min_option_mass: float = 0.0,
    clamp: tuple[float, float] | None = None,
) -> SoftLabel:
    """Combine order 1 (A shown as (A)) and order 2 (A shown as (B)) into P(A is better)."""
    orders = [_label_logprobs(first), _label_logprobs(second)]
    if orders[0] is None or orders[1] is None:
        return SoftLabel("missing_logprobs")
    (a1, b1), (a2, b2) = orders
    option_mass = min(math.exp(logsumexp([a1, b1])), math.exp(logsumexp([a2, b2])))
    if option_mass == 0.0 or option_mass < min_option_mass:
        return SoftLabel("unparseable", option_mass=option_mass)
    p1, p2 = normalised(a1, b1), normalised(b2, a2)
    if clamp is not None:
        p1, p2 = (min(max(p, clamp[0]), clamp[1]) for p in (p1, p2))
    return SoftLabel(
        status="ok",
        p_a_first=p1,
        p_a_second=p2,
        p_a=(p1 + p2) / 2,
        position_consistent=(p1 > 0.5) == (p2 > 0.5),
        option_mass=option_mass,
    )


def rationale_status(rationale: str) -> Status:
    """A cot rationale that is empty or a refusal is never read as a preference."""
    if not rationale.strip():
        return "unparseable"
    if REFUSAL_PATTERN.search(rationale.strip()):
        return "refusal"
    return "ok"


def decide_by_checks(principle: Principle, a_text: str, b_text: str | None) -> SoftLabel:
    """Pairwise: 1 if only A passes, 0 if only B passes, else 0.5. Pointwise: 1 if A passes."""
    a_passes = not principle.failed_checks(a_text)
    if b_text is None:
        p = 1.0 if a_passes else 0.0
    else:
        b_passes = not principle.failed_checks(b_text)
        p = 0.5 if a_passes == b_passes else (1.0 if a_passes else 0.0)
    return SoftLabel("ok", p, p, p, True, None)


# --- Asking the judge (batched) ---------------------------------------------------


@dataclass(frozen=True)
class _Question:
    """One comparison (b set) or one pointwise score (b None) under one principle."""

    a: Candidate
    b: Candidate | None
    principle: Principle


def _comparison(constitution: Constitution, a: Candidate, b: Candidate, seed: int) -> _Question:
    # Sorted ids: the same comparison gets the same principle whatever the candidates' order.
    key = ":".join(["judge", a.prompt_id, *sorted([a.response_id, b.response_id])])
    return _Question(a, b, constitution.sample_principle(key, seed))


def _pointwise(constitution: Constitution, a: Candidate, seed: int) -> _Question:
    key = f"pointwise:{a.prompt_id}:{a.response_id}"
    return _Question(a, None, constitution.sample_principle(key, seed))


def _chats(question: _Question, cot: bool) -> tuple[Chat, Chat]:
    """The question in order 1 and order 2."""
    text, prompt, a = question.principle.text, question.a.prompt, question.a.text
    if question.b is None:
        return (
            pointwise_judge_chat(text, prompt, a, yes_label="A"),
            pointwise_judge_chat(text, prompt, a, yes_label="B"),
        )
    b = question.b.text
    template = pairwise_cot_chat if cot else pairwise_judge_chat
    return template(text, prompt, a, b), template(text, prompt, b, a)


def _score_one_order(
    backend: Backend, chats: list[Chat], cot: bool, config: JudgeConfig
) -> tuple[list[LabelLogprobs], list[str] | None]:
    """One score_options call for the whole batch (cot: one generate call first)."""
    if not cot:
        return backend.score_options(chats, LABELS), None
    sampling = SamplingConfig(
        n=1, temperature=config.cot_temperature, max_tokens=config.cot_max_tokens, seed=config.seed
    )
    rationales = [completions[0].text for completions in backend.generate(chats, sampling)]
    answer_chats = [cot_answer_chat(c, r) for c, r in zip(chats, rationales, strict=True)]
    return backend.score_options(answer_chats, LABELS), rationales


def _ask_model(
    backend: Backend, questions: list[_Question], cot: bool, config: JudgeConfig
) -> list[tuple[SoftLabel, str | None]]:
    """Soft labels (and cot rationales): one batch for all order-1 chats, one for order 2."""
    if not questions:
        return []
    both_orders = [_chats(q, cot) for q in questions]
    chats_1, chats_2 = [c[0] for c in both_orders], [c[1] for c in both_orders]
    scores_1, rationales_1 = _score_one_order(backend, chats_1, cot, config)
    scores_2, rationales_2 = _score_one_order(backend, chats_2, cot, config)
    clamp = config.cot_clamp if cot else None
    labels = [
        read_soft_label(s1, s2, min_option_mass=config.min_option_mass, clamp=clamp)
        for s1, s2 in zip(scores_1, scores_2, strict=True)
    ]
    if rationales_1 is None or rationales_2 is None:
        return [(label, None) for label in labels]
    return [
        _with_rationales(label, r1, r2)
        for label, r1, r2 in zip(labels, rationales_1, rationales_2, strict=True)
    ]


def _with_rationales(label: SoftLabel, first: str, second: str) -> tuple[SoftLabel, str]:
    """A refused or empty rationale in either order overrides what the labels say."""
    statuses = [rationale_status(first), rationale_status(second)]
    status = next((s for s in statuses if s != "ok"), "ok")
    if status != "ok":
        label = SoftLabel(status, option_mass=label.option_mass)
    return label, first.strip() + RATIONALE_SEPARATOR + second.strip()


def _judgment(
    question: _Question,
    mode: Mode,
    label: SoftLabel,
    rationale: str | None,
    constitution: Constitution,
    judge_model: str,
    config: JudgeConfig,
) -> Judgment:
    a_id = question.a.response_id
    b_id = question.b.response_id if question.b is not None else None
    prompt_id, principle_id = question.a.prompt_id, question.principle.id
    constitution_id = constitution.constitution_id
    return Judgment(
        judgment_id=content_id(
            "judgment",
            prompt_id,
            a_id,
            b_id,
            principle_id,
            constitution_id,
            judge_model,
            mode,
            config.mode,
        ),
        prompt_id=prompt_id,
        response_a_id=a_id,
        response_b_id=b_id,
        principle_id=principle_id,
        constitution_id=constitution_id,
        judge_model=judge_model,
        mode=mode,
        p_a_first=label.p_a_first,
        p_a_second=label.p_a_second,
        p_a=label.p_a,
        position_consistent=label.position_consistent,
        option_mass=label.option_mass,
        status=label.status,
        rationale=rationale,
    )


def _judge(
    backend: Backend,
    constitution: Constitution,
    questions: list[_Question],
    config: JudgeConfig,
    pairwise: bool,
) -> list[Judgment]:
    """Judge questions of one kind, in order: checked principles decide without the model,
    the rest go to the model in one batch per order."""
    cot = pairwise and config.mode == "cot"
    model_mode: Mode = ("cot" if cot else "pairwise") if pairwise else "pointwise"
    answers = iter(
        _ask_model(backend, [q for q in questions if not q.principle.checks], cot, config)
    )
    judgments = []
    for q in questions:
        if q.principle.checks:
            mode, label, rationale = "checks", _decide(q), None
        else:
            mode, (label, rationale) = model_mode, next(answers)
        judgments.append(
            _judgment(q, mode, label, rationale, constitution, backend.model_name, config)
        )
    return judgments


def _decide(question: _Question) -> SoftLabel:
    b_text = question.b.text if question.b is not None else None
    return decide_by_checks(question.principle, question.a.text, b_text)


def _best_vs_worst(
    constitution: Constitution,
    scores: Mapping[str, float],
    candidates: Sequence[Candidate],
    seed: int,
) -> _Question | None:
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


def judge_prompts(
    backend: Backend,
    constitution: Constitution,
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> list[Judgment]:
    """Judge each prompt's candidates; pointwise judgments (best_vs_worst) come first."""
    seed = config.seed
    if config.pair_strategy == "all_pairs":
        comparisons = [
            _comparison(constitution, a, b, seed)
            for candidates in candidates_by_prompt.values()
            for a, b in combinations(candidates, 2)
        ]
        return _judge(backend, constitution, comparisons, config, pairwise=True)

    singles = [
        _pointwise(constitution, c, seed)
        for candidates in candidates_by_prompt.values()
        for c in candidates
    ]
    pointwise = _judge(backend, constitution, singles, config, pairwise=False)
    scores = {j.response_a_id: j.p_a for j in pointwise if j.status == "ok" and j.p_a is not None}
    comparisons = [
        q
        for candidates in candidates_by_prompt.values()
        if (q := _best_vs_worst(constitution, scores, candidates, seed)) is not None
    ]
    return pointwise + _judge(backend, constitution, comparisons, config, pairwise=True)


# --- Pairs ------------------------------------------------------------------------


def drop_reason(judgment: Judgment, config: JudgeConfig) -> str | None:
    """Why a pairwise judgment does not become a pair, or None if it does."""
    if judgment.status != "ok" or judgment.p_a is None:
        return judgment.status
    if judgment.p_a == 0.5:
        return "tie"
    if max(judgment.p_a, 1 - judgment.p_a) < config.min_confidence:
        return "low_confidence"
    if config.require_position_consistent and not judgment.position_consistent:
        return "position_inconsistent"
    return None


def _pair(judgment: Judgment, chosen: Candidate, rejected: Candidate) -> PreferencePair:
    p_a = judgment.p_a
    assert p_a is not None
    return PreferencePair(
        pair_id=content_id(
            "pair",
            judgment.prompt_id,
            chosen.response_id,
            rejected.response_id,
            judgment.constitution_id,
            judgment.judge_model,
        ),
        prompt_id=judgment.prompt_id,
        prompt=chosen.prompt,
        chosen=chosen.text,
        rejected=rejected.text,
        chosen_response_id=chosen.response_id,
        rejected_response_id=rejected.response_id,
        p_chosen=max(p_a, 1 - p_a),
        principle_ids=(judgment.principle_id,),
        judgment_ids=(judgment.judgment_id,),
        constitution_id=judgment.constitution_id,
        judge_model=judgment.judge_model,
    )


def build_pairs(
    judgments: Sequence[Judgment],
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> PairOutcome:
    """Confident pairwise judgments become preference pairs; the rest are counted by reason.

    Pointwise judgments (``response_b_id`` None) are neither pairs nor dropped.
    """
    by_id = {c.response_id: c for cs in candidates_by_prompt.values() for c in cs}
    outcome = PairOutcome(pairs=[], dropped=dict.fromkeys(DROP_REASONS, 0))
    for j in judgments:
        if j.response_b_id is None:
            continue
        reason = drop_reason(j, config)
        if reason is not None:
            outcome.dropped[reason] += 1
            continue
        a, b = by_id[j.response_a_id], by_id[j.response_b_id]
        chosen, rejected = (a, b) if j.p_a is not None and j.p_a > 0.5 else (b, a)
        outcome.pairs.append(_pair(j, chosen, rejected))
    return outcome
