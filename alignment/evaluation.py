"""Candidate-versus-baseline evaluation on held-out prompts.

Each eval prompt gets one response from the candidate and one from the
baseline; the judge compares them in both orders under one sampled principle
(the same protocol as the preference data), and the win rate carries a Wilson
score interval so a promotion gate can use its lower bound. Checked principles
give violation rates without a model; the KL to the baseline is estimated from
the candidate's own samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from alignment.constitution import Constitution
from alignment.judge import Judgment


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prompts: int = Field(64, gt=0, description="Eval-split prompts used (first N).")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature of both models.")
    max_tokens: int = Field(64, gt=0, description="Token budget of each eval response.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the Wilson interval.")


@dataclass(frozen=True)
class Metric:
    metric: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (ties count as half a success)."""
    if n == 0:
        return 0.0, 1.0
    z = _normal_quantile(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on erf (no scipy needed)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def win_rate(judgments: Sequence[Judgment], confidence: float = 0.95) -> list[Metric]:
    """Candidate is side A of every comparison: win 1, tie 1/2, loss 0, over ok judgments."""
    ok = [j for j in judgments if j.status == "ok" and j.p_a is not None]
    wins = sum(1.0 if j.p_a > 0.5 else 0.5 if j.p_a == 0.5 else 0.0 for j in ok)
    low, high = wilson_interval(wins, len(ok), confidence)
    model_judged = [j for j in ok if j.mode != "checks"]
    consistent = sum(bool(j.position_consistent) for j in model_judged)
    return [
        Metric("win_rate", wins / len(ok) if ok else 0.5, len(ok), low, high),
        Metric("mean_p_win", sum(j.p_a for j in ok) / len(ok) if ok else 0.5, len(ok)),
        Metric(
            "judge_position_consistency",
            consistent / len(model_judged) if model_judged else 1.0,
            len(model_judged),
        ),
        Metric("judge_not_ok", float(len(judgments) - len(ok)), len(judgments)),
    ]


def violation_rates(
    constitution: Constitution, responses: Sequence[str], prefix: str = ""
) -> list[Metric]:
    """Share of responses failing each checked principle, and failing any of them."""
    checked = [p for p in constitution.principles if p.checks]
    if not checked or not responses:
        return []
    metrics = []
    failing_any = [False] * len(responses)
    for principle in checked:
        fails = [bool(principle.failed_checks(r)) for r in responses]
        failing_any = [a or f for a, f in zip(failing_any, fails, strict=True)]
        metrics.append(
            Metric(f"{prefix}violation_rate/{principle.id}", sum(fails) / len(fails), len(fails))
        )
    metrics.append(
        Metric(f"{prefix}violation_rate", sum(failing_any) / len(responses), len(responses))
    )
    return metrics


def mean_metric(name: str, values: Sequence[float]) -> list[Metric]:
    return [Metric(name, sum(values) / len(values), len(values))] if values else []


def sequence_logprobs(
    model_path: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer_path: str | None = None,
) -> list[float]:
    """Sum of the response tokens' log-probs under a causal LM, one chat turn per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.eval()
    totals = []
    for prompt, response in zip(prompts, responses, strict=True):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        head_ids = tokenizer.encode(head, add_special_tokens=False)
        body_ids = tokenizer.encode(response, add_special_tokens=False)
        if not body_ids:
            totals.append(0.0)
            continue
        ids = torch.tensor([head_ids + body_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(head_ids) - 1 : -1]
        logps = torch.log_softmax(logits.float(), dim=-1)
        totals.append(logps.gather(1, torch.tensor(body_ids)[:, None]).sum().item())
    return totals


def kl_estimate(candidate_logps: Sequence[float], baseline_logps: Sequence[float]) -> list[Metric]:
    """KL(candidate || baseline) per sequence, from the candidate's own samples (k1)."""
    diffs = [c - b for c, b in zip(candidate_logps, baseline_logps, strict=True)]
    return mean_metric("kl", diffs)
