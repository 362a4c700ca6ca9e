"""The labels' arithmetic per mode, pure: log-probs and log-likelihoods in, P(A is better) out.

The A/B question is asked in two orders; order 1 shows A as (A) and B as (B), order 2
shows B as (A) and A as (B). Only the two labels' log-probs are kept and normalised:

    P1 = P(label A | order 1)      P2 = P(label B | order 2)
    p_a_first = P1, p_a_second = P2, p_a = (P1 + P2) / 2
    position_consistent = (P1 > 0.5) == (P2 > 0.5)

Contrast mode reads σ((Δ_A − Δ_B) / (contrast_tau · s)) from each response's Δ,
and ensemble mode averages that with the question's log-odds. What each mode
asks, and how, is in alignment/asking.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from alignment.backends import SequenceScore, logsumexp
from alignment.constitution import Principle
from alignment.conversation import Prompt, assistant_turns
from alignment.templates import LABELS

Status = Literal["ok", "refusal", "unparseable", "missing_logprobs"]
# How the model answers (``judge.mode``); one name per mode, in config and store alike.
ModelMode = Literal["logprob", "cot", "contrast", "likelihood", "ensemble"]
# How one judgment was made (the store's ``judgments.mode``): the model's mode that
# answered it, or its principle's checks.
Mode = ModelMode | Literal["checks"]
LabelLogprobs = Mapping[str, float | None]

# Anchored at the start: a rationale often quotes a response that itself refuses.
REFUSAL_PATTERN = re.compile(
    r"^\W*(?:sorry\b|i\s+apologi[sz]e|as\s+an\s+ai\b|i\s+am\s+(?:sorry|unable)"
    r"|i['’]m\s+(?:sorry|unable|not\s+able)"
    r"|i\s+(?:can['’]?t|cannot|won['’]?t|will\s+not|am\s+not\s+able)\b)",
    re.IGNORECASE,
)


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


def decide_by_checks(
    principle: Principle, a_text: str, b_text: str | None, prompt: Prompt = ""
) -> SoftLabel:
    """Pairwise: 1 if only A passes, 0 if only B passes, else 0.5. Pointwise: 1 if A passes.
    A conversation-scope check also reads the assistant's earlier turns of ``prompt``."""
    earlier = assistant_turns(prompt)
    a_passes = not principle.failed_checks(a_text, earlier)
    if b_text is None:
        p = 1.0 if a_passes else 0.0
    else:
        b_passes = not principle.failed_checks(b_text, earlier)
        p = 0.5 if a_passes == b_passes else (1.0 if a_passes else 0.0)
    return SoftLabel("ok", p, p, p, True, None)
