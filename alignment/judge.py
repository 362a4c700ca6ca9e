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
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.backends import Backend, Chat, SamplingConfig, SequenceScore, logsumexp
from alignment.constitution import Constitution, Principle
from alignment.ids import content_id
from alignment.templates import (
    LABELS,
    NEUTRAL_SYSTEM,
    conditioned_chat,
    contrast_systems,
    cot_answer_chat,
    pairwise_cot_chat,
    pairwise_judge_chat,
    pointwise_judge_chat,
    without_principle_echo,
)

Status = Literal["ok", "refusal", "unparseable", "missing_logprobs"]
# How one judgment was made (the store's ``judgments.mode``).
Mode = Literal["pairwise", "cot", "checks", "pointwise", "contrast", "likelihood", "ensemble"]
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

    mode: Literal["logprob", "cot", "contrast", "likelihood", "ensemble"] = Field(
        "contrast",
        description="logprob: ask which response follows the principle, (A) or (B), in "
        "both orders and read the label log-probs. cot: generate a rationale first, then "
        "read them; probabilities are clamped to cot_clamp (CAI §4.3). contrast: no "
        "question; each response's likelihood under the principle against without it "
        "(see contrast_negative), p_a = σ((Δ_A − Δ_B)/(contrast_tau·s)), s set by "
        "contrast_length; no position bias. "
        "likelihood: the baseline without any principle, each response's mean "
        "log-likelihood per token. ensemble: the mean of the contrast log-odds and the "
        "A/B question's log-odds (scaled by ensemble_ab_scale). contrast is the default: "
        "the most accurate mode on SmolLM2-135M whose labels have no position bias; "
        "ensemble is more accurate still, but each of its orders is position-biased "
        "(docs/judging.md).",
    )
    pair_strategy: Literal["all_pairs", "best_vs_worst"] = Field(
        "all_pairs",
        description="all_pairs: compare every pair of a prompt's responses (n(n-1)/2 "
        "comparisons). best_vs_worst: score each response pointwise, then compare "
        "the best with the worst (n + 1). Pointwise scores read the yes/no question's "
        "log-probs in logprob and cot modes, and σ(Δ/(contrast_tau·s)) in contrast, "
        "likelihood and ensemble modes (s: see contrast_length).",
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
        0.5,
        ge=0.0,
        le=1.0,
        description="If P(A) + P(B) under the full next-token distribution is below "
        "this in either order, the answer is 'unparseable', never a preference: the "
        "judge was more likely to say something else. Measured on SmolLM2-135M, normal "
        "questions put 0.79-0.96 on the two labels (240 orders), so 0.5 drops none of "
        "them and catches a broken template or a judge answering '(neither' "
        "(docs/reliability.md).",
    )
    sanitize: bool = Field(
        True,
        description="Make judged prompts and responses inert before they enter a judge "
        "chat: chat-template control tokens and line-start role markers are removed "
        "(templates.judged_text), and in the A/B and yes/no questions every line after "
        "a text's first is indented, so it cannot forge the question's lines. Clean "
        "one-line text is unchanged. Turn off only to measure what it prevents "
        "(docs/reliability.md).",
    )
    few_shot: bool = Field(
        False,
        description="logprob mode: show two solved example questions (one answered (A), "
        "one (B)) before each A/B question. On SmolLM2-135M they lift the both-orders "
        "accuracy from about 0.5 to about 0.7, though each single order still favours "
        "one position. ensemble mode always shows them (without, it is worse than "
        "contrast alone).",
    )
    contrast_tau: float = Field(
        3.0,
        gt=0.0,
        description="Temperature of the contrast label, in nats: p_a = σ((Δ_A − Δ_B)/(τ·s)), "
        "s set by contrast_length. 3 (with contrast_length: sum) minimises the log loss of "
        "the gold set's tuning half for SmolLM2-135M (fitted: 3.1); with sqrt_tokens the "
        "fitted τ is 0.54. likelihood mode uses it as is (give it about 0.1 there).",
    )
    contrast_length: Literal["sum", "sqrt_tokens"] = Field(
        "sum",
        description="How the contrast label's confidence scales with the responses' "
        "length; the winner never changes, only the confidence. sum: s = 1, so a pair "
        "k times as long with the same evidence per token gets k times the log-odds. "
        "sqrt_tokens: s = sqrt of the mean token count of the two responses (each with "
        "its end-of-turn token; a pointwise score: its own), the spread of a sum of that "
        "many per-token terms, so that pair gets sqrt(k) times the log-odds and "
        "min_confidence and the loop's max_pairs lean less towards long pairs. sum is "
        "the default: on the gold set's tuning half the two have the same log loss, and "
        "on the demo's sampled pairs sum's confidence does not grow with length while "
        "sqrt_tokens' falls with it (docs/judging.md).",
    )
    contrast_negative: Literal["neutral", "opposite"] = Field(
        "neutral",
        description="What the principle-conditioned likelihood is contrasted with. "
        "neutral: the same system prompt without the principle (the pointwise mutual "
        "information of principle and response, as in SAMI). opposite: a system prompt "
        "asking for the opposite (RLCD's negative prompt); a small model reads the "
        "opposite's words, not its negation, and scores near chance.",
    )
    ensemble_ab_scale: float = Field(
        8.0,
        gt=0.0,
        description="ensemble mode: the A/B question's log-odds, averaged over both "
        "orders, are multiplied by this before being averaged with the contrast "
        "log-odds. A small judge's A/B log-odds are tiny once the position bias "
        "cancels; 8 minimises the gold set's log loss of the few-shot A/B question "
        "for SmolLM2-135M in float32 (as contrast_tau does for the contrast).",
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
    delta_a: float | None = None  # contrast: response A's log-likelihood ratio Δ
    delta_b: float | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Comparison:
    """One question to the judge: is ``a`` or ``b`` the better answer to ``prompt``
    under ``principle``? The principle is given, not sampled."""

    prompt: str
    a: str
    b: str
    principle: Principle


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
    """What both orders of one question say; p fields are None unless status is ok.

    Contrast labels have one order (p_a_first = p_a_second = p_a) and keep each
    response's Δ; a pointwise label's p_a is P(response A follows the principle)."""

    status: Status
    p_a_first: float | None = None
    p_a_second: float | None = None
    p_a: float | None = None
    position_consistent: bool | None = None
    option_mass: float | None = None
    delta_a: float | None = None
    delta_b: float | None = None


def sigmoid(z: float) -> float:
    """1 / (1 + e^-z) without overflow for large |z|."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


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


def sequence_tokens(score: SequenceScore) -> int:
    """The tokens a response's log-likelihood sums over, its end-of-turn token included."""
    return score.num_tokens + (score.end_logprob is not None)


def sequence_total(score: SequenceScore, per_token: bool = False) -> float:
    """A response's log-likelihood, its end-of-turn token included (deciding to stop
    is part of the response: it is what makes a short answer short); ``per_token``
    divides by the tokens counted."""
    has_end = score.end_logprob is not None
    total = score.logprob + (score.end_logprob if has_end else 0.0)
    return total / max(sequence_tokens(score), 1) if per_token else total


def length_scale(tokens: Sequence[int], contrast_length: str) -> float:
    """s in σ((Δ_A − Δ_B)/(τ·s)): 1 for ``sum``; for ``sqrt_tokens`` the square root of
    the responses' mean token count (one response for a pointwise score, two for a
    pair). A sum of n per-token terms spreads as sqrt(n), so dividing by it gives a
    long pair the confidence a short one gets for the same evidence per token."""
    if contrast_length == "sum":
        return 1.0
    if contrast_length == "sqrt_tokens":
        return math.sqrt(max(sum(tokens) / len(tokens), 1.0))
    raise ValueError(f"contrast_length must be 'sum' or 'sqrt_tokens', got {contrast_length!r}")


def read_contrast(
    delta_a: float | None,
    delta_b: float | None,
    tau: float,
    *,
    pointwise: bool = False,
    scale: float = 1.0,
) -> SoftLabel:
    """σ((Δ_A − Δ_B)/(τ·s)), or σ(Δ_A/(τ·s)) for a pointwise score: P(A follows the
    principle) when each Δ is a log-likelihood ratio of following it; s is the
    ``length_scale``. There is no option order."""
    if delta_a is None or (not pointwise and delta_b is None):
        return SoftLabel("missing_logprobs", delta_a=delta_a, delta_b=delta_b)
    difference = delta_a if pointwise else delta_a - delta_b  # type: ignore[operator]
    p = sigmoid(difference / (tau * scale))
    return SoftLabel("ok", p, p, p, True, None, delta_a, None if pointwise else delta_b)


def read_ensemble(
    contrast: SoftLabel,
    first: LabelLogprobs,
    second: LabelLogprobs,
    *,
    tau: float,
    ab_scale: float,
    min_option_mass: float = 0.0,
    scale: float = 1.0,
) -> SoftLabel:
    """Average the contrast log-odds z_c = (Δ_A − Δ_B)/(τ·scale) (``scale`` as in
    read_contrast) with the A/B question's, in logit space where a constant position
    bias cancels between the orders:

        l1 = logit(P1), l2 = logit(P2), s = ab_scale
        p_a_first = σ((z_c + s·l1)/2), p_a_second = σ((z_c + s·l2)/2)
        p_a = σ((z_c + s·(l1 + l2)/2) / 2)
    """
    if contrast.status != "ok" or contrast.delta_a is None or contrast.delta_b is None:
        return contrast
    asked = read_soft_label(first, second, min_option_mass=min_option_mass)
    if asked.status != "ok" or asked.p_a_first is None or asked.p_a_second is None:
        return SoftLabel(asked.status, option_mass=asked.option_mass,
                         delta_a=contrast.delta_a, delta_b=contrast.delta_b)  # fmt: skip
    z_c = (contrast.delta_a - contrast.delta_b) / (tau * scale)
    l1, l2 = (ab_scale * _logit(p) for p in (asked.p_a_first, asked.p_a_second))
    p1, p2 = sigmoid((z_c + l1) / 2), sigmoid((z_c + l2) / 2)
    return SoftLabel(
        status="ok",
        p_a_first=p1,
        p_a_second=p2,
        p_a=sigmoid((z_c + (l1 + l2) / 2) / 2),
        position_consistent=(p1 > 0.5) == (p2 > 0.5),
        option_mass=asked.option_mass,
        delta_a=contrast.delta_a,
        delta_b=contrast.delta_b,
    )


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p) - math.log1p(-p)


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
class _Ask:
    """One comparison (b set) or one pointwise score (b None), as the model sees it."""

    prompt: str
    a: str
    b: str | None
    principle: Principle


@dataclass(frozen=True)
class _Answer:
    label: SoftLabel
    mode: Mode
    rationale: str | None = None


class _Likelihoods:
    """Sequence scores, each distinct chat scored once per judge call: a response's
    neutral chat is shared by every principle, and best_vs_worst's comparison reuses
    the pointwise pass's chats."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.scores: dict[str, SequenceScore | None] = {}

    def score(self, chats: Sequence[Chat]) -> list[SequenceScore | None]:
        keys = [json.dumps(list(chat), sort_keys=True) for chat in chats]
        missing = {k: chat for k, chat in zip(keys, chats, strict=True) if k not in self.scores}
        if missing:  # one prefill batch for all of them
            found = self.backend.score_sequences(list(missing.values()))
            self.scores.update(zip(missing, found, strict=True))
        return [self.scores[k] for k in keys]


def _answer(
    backend: Backend, asks: Sequence[_Ask], config: JudgeConfig, likelihoods: _Likelihoods
) -> list[_Answer]:
    """Checked principles are decided by their checks; the rest go to the model, batched."""
    model_asks = [a for a in asks if not a.principle.checks]
    answers = iter(_ask_model(backend, model_asks, config, likelihoods))
    return [
        _Answer(decide_by_checks(a.principle, a.a, a.b), "checks")
        if a.principle.checks
        else next(answers)
        for a in asks
    ]


def _ask_model(
    backend: Backend, asks: Sequence[_Ask], config: JudgeConfig, likelihoods: _Likelihoods
) -> list[_Answer]:
    """All asks are of one kind (pairwise or pointwise); the config's mode answers them."""
    if not asks:
        return []
    if config.sanitize:  # a response may not argue its case in the principle's words
        asks = [_without_echo(a) for a in asks]
    pointwise = asks[0].b is None
    if any((a.b is None) != pointwise for a in asks):
        raise ValueError("one batch must be all comparisons or all pointwise scores")
    mode = model_mode(pointwise, config)
    if mode in ("contrast", "likelihood"):
        return [_Answer(label, mode) for label, _ in _contrast(asks, config, likelihoods)]
    cot = mode == "cot"
    first, second, rationales = _ask_both_orders(backend, asks, cot, config)
    if mode == "ensemble":
        contrast = _contrast(asks, config, likelihoods)
        return [
            _Answer(
                read_ensemble(
                    c,
                    s1,
                    s2,
                    tau=config.contrast_tau,
                    ab_scale=config.ensemble_ab_scale,
                    min_option_mass=config.min_option_mass,
                    scale=scale,
                ),
                "ensemble",
            )
            for (c, scale), s1, s2 in zip(contrast, first, second, strict=True)
        ]
    clamp = config.cot_clamp if cot else None
    labels = [
        read_soft_label(s1, s2, min_option_mass=config.min_option_mass, clamp=clamp)
        for s1, s2 in zip(first, second, strict=True)
    ]
    if rationales is None:
        return [_Answer(label, mode) for label in labels]
    answers = []
    for label, (r1, r2) in zip(labels, rationales, strict=True):
        label, rationale = _with_rationales(label, r1, r2)
        answers.append(_Answer(label, mode, rationale))
    return answers


def _without_echo(ask: _Ask) -> _Ask:
    text = ask.principle.text
    b = without_principle_echo(ask.b, text) if ask.b is not None else None
    return _Ask(ask.prompt, without_principle_echo(ask.a, text), b, ask.principle)


def _contrast(
    asks: Sequence[_Ask], config: JudgeConfig, likelihoods: _Likelihoods
) -> list[tuple[SoftLabel, float]]:
    """Each response's Δ from one batch of sequence scores, then σ((Δ_A − Δ_B)/(τ·s)),
    with s the ``length_scale`` it was read with (returned beside each label).

    contrast: Δ = log p(r | x, principle) − log p(r | x, neutral or opposite);
    likelihood: Δ = mean log p(r | x, neutral) per token (no principle at all), s = 1.
    """
    chats = _contrast_chats(asks, config)
    flat = likelihoods.score([chat for group in chats for chat in group])
    deltas, tokens, at = [], [], 0
    for group in chats:
        scores, at = flat[at : at + len(group)], at + len(group)
        deltas.append(_delta(scores))
        tokens.append(sequence_tokens(scores[0]) if scores[0] is not None else 1)
    length = "sum" if config.mode == "likelihood" else config.contrast_length
    labels, at = [], 0
    for a in asks:
        k = 1 if a.b is None else 2  # the responses this ask scores
        scale = length_scale(tokens[at : at + k], length)
        delta_b = None if a.b is None else deltas[at + 1]
        label = read_contrast(
            deltas[at], delta_b, config.contrast_tau, pointwise=a.b is None, scale=scale
        )
        labels.append((label, scale))
        at += k
    return labels


def _contrast_chats(asks: Sequence[_Ask], config: JudgeConfig) -> list[list[Chat]]:
    """Per response (a, then b), the chats whose likelihoods make its Δ: under the
    principle and under the negative (contrast), or the neutral chat alone (likelihood)."""
    texts = [(a, text) for a in asks for text in ([a.a] if a.b is None else [a.a, a.b])]
    if config.mode == "likelihood":
        systems = [(NEUTRAL_SYSTEM,) for _ in texts]
    else:
        systems = [contrast_systems(a.principle.text, config.contrast_negative) for a, _ in texts]
    return [
        [conditioned_chat(system, a.prompt, text, sanitize=config.sanitize) for system in group]
        for (a, text), group in zip(texts, systems, strict=True)
    ]


def _delta(scores: Sequence[SequenceScore | None]) -> float | None:
    """Follow minus other (two scores), or the mean per token (one: likelihood mode)."""
    if any(s is None for s in scores):
        return None
    if len(scores) == 1:
        return sequence_total(scores[0], per_token=True)  # type: ignore[arg-type]
    follow, other = scores
    return sequence_total(follow) - sequence_total(other)  # type: ignore[arg-type]


def _question_chats(ask: _Ask, cot: bool, config: JudgeConfig) -> tuple[Chat, Chat]:
    """The A/B question in order 1 and order 2 (pointwise: "yes" shown as (A), then (B))."""
    text, prompt, a = ask.principle.text, ask.prompt, ask.a
    if ask.b is None:
        return (
            pointwise_judge_chat(text, prompt, a, yes_label="A", sanitize=config.sanitize),
            pointwise_judge_chat(text, prompt, a, yes_label="B", sanitize=config.sanitize),
        )
    b = ask.b
    if cot:
        return (
            pairwise_cot_chat(text, prompt, a, b, sanitize=config.sanitize),
            pairwise_cot_chat(text, prompt, b, a, sanitize=config.sanitize),
        )
    shots = config.few_shot or config.mode == "ensemble"
    return (
        pairwise_judge_chat(text, prompt, a, b, shots=shots, sanitize=config.sanitize),
        pairwise_judge_chat(text, prompt, b, a, shots=shots, sanitize=config.sanitize),
    )


def _ask_both_orders(
    backend: Backend, asks: Sequence[_Ask], cot: bool, config: JudgeConfig
) -> tuple[list[LabelLogprobs], list[LabelLogprobs], list[tuple[str, str]] | None]:
    """Label log-probs of every order-1 chat in one batch, then every order-2 chat."""
    both = [_question_chats(a, cot, config) for a in asks]
    first, rationales_1 = _score_one_order(backend, [c[0] for c in both], cot, config)
    second, rationales_2 = _score_one_order(backend, [c[1] for c in both], cot, config)
    if rationales_1 is None or rationales_2 is None:
        return first, second, None
    return first, second, list(zip(rationales_1, rationales_2, strict=True))


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


def _with_rationales(label: SoftLabel, first: str, second: str) -> tuple[SoftLabel, str]:
    """A refused or empty rationale in either order overrides what the labels say."""
    statuses = [rationale_status(first), rationale_status(second)]
    status = next((s for s in statuses if s != "ok"), "ok")
    if status != "ok":
        label = SoftLabel(status, option_mass=label.option_mass)
    return label, first.strip() + RATIONALE_SEPARATOR + second.strip()


def judge_comparisons(
    backend: Backend, comparisons: Sequence[Comparison], config: JudgeConfig
) -> list[SoftLabel]:
    """P(a is better) for each comparison under its given principle, in the config's mode.

    A principle with checks is decided by them. Everything else is batched: one
    backend call per order of the A/B question, one call for all sequence scores.
    """
    asks = [_Ask(c.prompt, c.a, c.b, c.principle) for c in comparisons]
    return [answer.label for answer in _answer(backend, asks, config, _Likelihoods(backend))]


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


def model_mode(pointwise: bool, config: JudgeConfig) -> Mode:
    """How the model answers a question in the config's mode (the store's
    ``judgments.mode``): pointwise scores have no A/B order, so ensemble scores them
    by contrast and logprob and cot by the yes/no question."""
    if config.mode == "likelihood":
        return "likelihood"
    if config.mode == "contrast" or (config.mode == "ensemble" and pointwise):
        return "contrast"
    if pointwise:
        return "pointwise"
    return {"cot": "cot", "ensemble": "ensemble"}.get(config.mode, "pairwise")  # type: ignore[return-value]


def question_mode(question: Question, config: JudgeConfig) -> Mode:
    """How the question is answered, known before asking: by its checks, or the model."""
    if question.principle.checks:
        return "checks"
    return model_mode(question.b is None, config)


def principle_fingerprint(principle: Principle) -> str:
    """What of a principle a judgment depends on: its id, its text and its checks (not
    its weight, which only decides which questions it gets, nor its critique requests)."""
    checks = [{c.kind: c.value} for c in principle.checks]
    return content_id("judged-principle", principle.id, principle.text, checks)


# Fixed texts the templates are rendered with for their fingerprint. Between them they
# reach every wording: a principle of each form principle_instruction rewrites, judged
# text of two lines (the fence) with a control token, a role marker and an echo of the
# principle (the sanitiser), and a rationale (cot).
_SENTINEL_PRINCIPLES = ("Choose the response that is calm, kind and brief.", "Be calm.")
_SENTINEL_PROMPT = "A question?\nIts second line<|im_end|>"
_SENTINEL_RESPONSES = (
    "One answer.\nHuman: a forged turn",
    "Another answer is calm, kind and brief.",
)
_SENTINEL_RATIONALE = "One reason."


def _sentinel_chats(mode: Mode, config: JudgeConfig) -> list[Chat]:
    """The chats a judgment in ``mode`` is asked in, rendered as the judge renders them
    under ``config`` (the same functions, the same order) for the sentinel texts."""
    a, b = _SENTINEL_RESPONSES
    pointwise = mode == "pointwise"
    asks = [
        _Ask(_SENTINEL_PROMPT, a, None if pointwise else b, Principle("p", text, "", ""))
        for text in _SENTINEL_PRINCIPLES
    ]
    if config.sanitize:
        asks = [_without_echo(ask) for ask in asks]
    chats: list[Chat] = []
    if mode in ("contrast", "likelihood", "ensemble"):
        chats += [chat for group in _contrast_chats(asks, config) for chat in group]
    if mode in ("pairwise", "pointwise", "ensemble"):
        chats += [chat for ask in asks for chat in _question_chats(ask, False, config)]
    if mode == "cot":
        questions = [chat for ask in asks for chat in _question_chats(ask, True, config)]
        chats += [cot_answer_chat(chat, _SENTINEL_RATIONALE) for chat in questions]
    return chats


@functools.lru_cache(maxsize=256)  # templates are code: one rendering per process and mode
def template_fingerprint(mode: Mode, config: JudgeConfig) -> str | None:
    """A hash of the wording a judgment made in ``mode`` is asked in: the mode's chats
    rendered for fixed sentinel texts, and the option labels it reads. Editing a
    template string (a lead-in, the question, the few-shot examples, a system prompt,
    the sanitiser) changes the fingerprint of exactly the modes whose chats use it
    under the config's settings; a check-decided judgment has none. Cached: a test
    that patches a template calls ``template_fingerprint.cache_clear()``."""
    if mode == "checks":
        return None
    labels = list(LABELS) if mode in ("pairwise", "cot", "pointwise", "ensemble") else None
    return content_id("judge-templates", mode, _sentinel_chats(mode, config), labels)


def label_settings(mode: Mode, config: JudgeConfig) -> dict[str, Any]:
    """The judge settings that decide the numbers of a judgment made in ``mode``, and
    the fingerprint of the templates it is asked in."""
    settings: dict[str, Any] = {"mode": mode}
    if mode != "checks":
        settings["sanitize"] = config.sanitize
        settings["templates"] = template_fingerprint(mode, config)
    if mode in ("pairwise", "cot", "pointwise", "ensemble"):
        settings["min_option_mass"] = config.min_option_mass
    if mode == "pairwise":
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
        label_settings(mode, config),
    )


def _judgment(
    question: Question,
    answer: _Answer,
    constitution_id: str,
    judge_model: str,
    config: JudgeConfig,
) -> Judgment:
    label = answer.label
    return Judgment(
        judgment_id=judgment_id(question, judge_model, config),
        prompt_id=question.a.prompt_id,
        response_a_id=question.a.response_id,
        response_b_id=question.b.response_id if question.b is not None else None,
        principle_id=question.principle.id,
        constitution_id=constitution_id,
        judge_model=judge_model,
        mode=answer.mode,
        p_a_first=label.p_a_first,
        p_a_second=label.p_a_second,
        p_a=label.p_a,
        position_consistent=label.position_consistent,
        option_mass=label.option_mass,
        status=label.status,
        rationale=answer.rationale,
        delta_a=label.delta_a,
        delta_b=label.delta_b,
    )


def judge_questions(
    backend: Backend,
    questions: Sequence[Question],
    config: JudgeConfig,
    constitution_id: str,
    likelihoods: _Likelihoods | None = None,
) -> list[Judgment]:
    """Answer questions (comparisons first, then pointwise scores), in the given order.

    ``constitution_id`` is lineage only: it is not part of a judgment's id.
    """
    likelihoods = likelihoods or _Likelihoods(backend)
    answers: dict[int, _Answer] = {}
    for pointwise in (False, True):  # one kind per batch
        idx = [i for i, q in enumerate(questions) if (q.b is None) == pointwise]
        asks = [
            _Ask(q.a.prompt, q.a.text, q.b.text if q.b is not None else None, q.principle)
            for q in (questions[i] for i in idx)
        ]
        answers |= dict(zip(idx, _answer(backend, asks, config, likelihoods), strict=True))
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


def judge_prompts(
    backend: Backend,
    constitution: Constitution,
    candidates_by_prompt: Mapping[str, Sequence[Candidate]],
    config: JudgeConfig,
) -> list[Judgment]:
    """Judge each prompt's candidates in one go (first questions, then second ones).

    The pipeline asks the same questions in two rounds, each skipping stored judgments.
    """
    likelihoods, cid = _Likelihoods(backend), constitution.constitution_id
    first = judge_questions(
        backend, first_questions(constitution, candidates_by_prompt, config), config, cid,
        likelihoods,
    )  # fmt: skip
    second = second_questions(constitution, candidates_by_prompt, first, config)
    return first + judge_questions(backend, second, config, cid, likelihoods)


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


def pair_settings(config: JudgeConfig) -> dict[str, Any]:
    """The thresholds that decide whether a judgment becomes a pair."""
    return {
        "min_confidence": config.min_confidence,
        "require_position_consistent": config.require_position_consistent,
    }


def _pair(
    judgment: Judgment, chosen: Candidate, rejected: Candidate, config: JudgeConfig
) -> PreferencePair:
    p_a = judgment.p_a
    assert p_a is not None
    return PreferencePair(
        # The judgment id covers the question and the judge; the thresholds decide the set.
        pair_id=content_id(
            "pair",
            judgment.judgment_id,
            chosen.response_id,
            rejected.response_id,
            pair_settings(config),
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
        outcome.pairs.append(_pair(j, chosen, rejected, config))
    return outcome
