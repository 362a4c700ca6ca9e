"""Candidate-versus-baseline evaluation on held-out prompts.

Each eval prompt gets one response from the candidate and one from the
baseline; the judge compares them in both orders under one sampled principle
(the same protocol as the preference data). The metrics are built so that a
collapsed candidate cannot pass as a good one:

- ``win_rate`` (hard: win 1, tie ½, loss 0; Wilson interval) and ``mean_p_win``
  (soft: the judge's p_a) count a model-judged comparison whose two orders disagree
  as a tie: the judge then preferred a position, not a response.
- ``lc_win_rate`` and ``lc_mean_p_win`` are the same two rates at equal length
  (AlpacaEval-LC's GLM, fitted on the same outcome as the raw rate): a judge that
  rewards length alone gives 0.5, however long the candidate became.
- ``kl`` is the exact KL(candidate ‖ baseline) between both models' full
  next-token distributions at the sampling temperature, summed over the
  candidate's own eval responses: ≥ 0 by construction.
- ``degenerate/*`` counts empty, very short, repetitive and unfinished answers,
  which a judge or a check may not notice.
- Checked principles give violation rates without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from alignment.constitution import Constitution
from alignment.conversation import Prompt, as_chat, assistant_turns
from alignment.ids import content_id
from alignment.judge import Judgment

if TYPE_CHECKING:
    import torch


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prompts: int = Field(64, gt=0, description="Eval-split prompts used (first N).")
    temperature: float = Field(
        0.7,
        ge=0.0,
        description="Sampling temperature of both models; the KL is measured at it too.",
    )
    max_tokens: int = Field(64, gt=0, description="Token budget of each eval response.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the intervals.")
    min_words: int = Field(
        3, ge=1, description="A response with fewer words counts as degenerate/short."
    )


def eval_run_id(
    candidate: str, baseline: str, settings: dict[str, Any], constitution_id: str
) -> str:
    """An evaluation's run id: both models' names, the settings that decide its data and
    its metrics (the eval section included), and the constitution."""
    return content_id("eval", candidate, baseline, settings, constitution_id)


def eval_metric_id(run_id: str, metric: str) -> str:
    """The id of one metric of an evaluation run."""
    return content_id("eval-metric", run_id, metric)


@dataclass(frozen=True)
class Metric:
    metric: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None


def mean_metric(name: str, values: Sequence[float]) -> list[Metric]:
    return [Metric(name, sum(values) / len(values), len(values))] if values else []


# --- Win rates -----------------------------------------------------------------------------


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


def _position_biased(j: Judgment) -> bool:
    """A model-judged comparison whose two orders picked different responses."""
    return j.mode != "checks" and j.position_consistent is False


def _win(j: Judgment) -> float:
    """1 win, 1/2 tie, 0 loss for side A; a position-biased answer is a tie, not a win."""
    if _position_biased(j):
        return 0.5
    assert j.p_a is not None
    return 1.0 if j.p_a > 0.5 else 0.5 if j.p_a == 0.5 else 0.0


def _ok(judgments: Sequence[Judgment]) -> list[Judgment]:
    return [j for j in judgments if j.status == "ok" and j.p_a is not None]


def _outcomes(ok: Sequence[Judgment]) -> tuple[np.ndarray, np.ndarray]:
    """Side A's hard outcome (win 1, tie ½, loss 0) and soft outcome (p_a) per comparison.

    A position-biased comparison is ½ on both scales: the judge preferred a position, not
    a response, so an always-"A" judge scores exactly 0.5 on either scale.
    """
    hard = np.array([_win(j) for j in ok], dtype=float)
    soft = np.array([0.5 if _position_biased(j) else j.p_a for j in ok], dtype=float)
    return hard, soft


def _bootstrap_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement by a seeded generator: intervals
    computed from them repeat exactly."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def win_rate(
    judgments: Sequence[Judgment], confidence: float = 0.95, resamples: int = 500, seed: int = 0
) -> list[Metric]:
    """Raw rates of the candidate (side A of every comparison) over ok judgments.

    ``win_rate``: hard outcome, win 1, tie ½, loss 0, with its Wilson interval.
    ``mean_p_win``: soft outcome, the mean p_a, with the percentile interval of a seeded
    bootstrap over comparisons. A judge that always names the first option answers "A" in
    one order and "B" in the other; at face value its p_a would still lean to one side, so
    every position-inconsistent comparison is ½ on both (an always-"A" judge gives 0.5).
    """
    ok = _ok(judgments)
    hard, soft = _outcomes(ok)
    wins = float(hard.sum())
    low, high = wilson_interval(wins, len(ok), confidence)
    soft_low, soft_high = (
        _percentiles(soft[_bootstrap_rows(len(ok), resamples, seed)].mean(axis=1), confidence)
        if ok
        else (0.0, 1.0)
    )
    model_judged = [j for j in ok if j.mode != "checks"]
    consistent = sum(bool(j.position_consistent) for j in model_judged)
    return [
        Metric("win_rate", wins / len(ok) if ok else 0.5, len(ok), low, high),
        Metric("mean_p_win", float(soft.mean()) if ok else 0.5, len(ok), soft_low, soft_high),
        Metric(
            "judge_position_consistency",
            consistent / len(model_judged) if model_judged else 1.0,
            len(model_judged),
        ),
        Metric("judge_not_ok", float(len(judgments) - len(ok)), len(judgments)),
    ]


# Ridge on the length (and difficulty) coefficients, none on the intercept: it keeps the
# fit finite when the judge separates the comparisons by length exactly (the slope would
# run off to infinity), and a free intercept leaves the LC rate equal to the raw rate when
# every length difference is 0. Small enough that a pure length preference fits to ~0.5.
LC_SLOPE_L2 = 1e-3


def lc_win_rate(
    judgments: Sequence[Judgment],
    lengths: Mapping[str, int],
    confidence: float = 0.95,
    resamples: int = 500,
    seed: int = 0,
    difficulty: Mapping[str, float] | None = None,
) -> list[Metric]:
    """Length-controlled rates (AlpacaEval-LC, Dubois et al. 2024): the rates at equal length.

    Per ok comparison (the candidate is side A): the outcome y, the length feature
    tanh(z) with z = (len_A − len_B) / sd, sd the sample standard deviation of those
    differences over the eval (not centred, so z = 0 is equal length; sd 0 → z = 0), and,
    if given, the prompt's ``difficulty`` d. The GLM y ~ σ(θ0 + θ_len·tanh z [+ θ_d·d]) is
    fitted by cross-entropy with fractional targets (a tie is half a win), and the rate is
    its prediction with the length term set to 0, averaged over the comparisons:
    mean σ(θ0 [+ θ_d·d_i]). ``lc_win_rate`` fits the hard outcome of ``win_rate``,
    ``lc_mean_p_win`` the soft outcome of ``mean_p_win`` (position-biased comparisons ½ on
    both), so each sits on its raw rate's scale. Interval: percentile of a seeded
    bootstrap over comparisons, each resample refitted (z standardised again), so it repeats.

    Lengths are in the unit ``lengths`` (response id → length) holds; the eval passes
    tokens (length_unit: tokens, docs/loop.md). AlpacaEval counts characters; once
    standardised the two barely differ. ``difficulty`` (prompt id → AlpacaEval's
    instruction_difficulty, measured elsewhere) is optional: with one comparison per prompt
    a per-prompt term cannot be fitted from the eval itself, and without it the model is
    AlpacaEval's ``length_controlled_minimal``.
    """
    ok = [j for j in _ok(judgments) if j.response_b_id is not None]
    if not ok:
        return []
    hard, soft = _outcomes(ok)
    diff = np.array([lengths[j.response_a_id] - lengths[str(j.response_b_id)] for j in ok], float)
    extra = None if difficulty is None else np.array([difficulty[j.prompt_id] for j in ok], float)
    full = np.arange(len(ok))[None]
    draws = _bootstrap_rows(len(ok), resamples, seed)
    metrics = []
    for name, y in (("lc_win_rate", hard), ("lc_mean_p_win", soft)):
        value = float(_lc_rates(y, diff, extra, full)[0])
        low, high = _percentiles(_lc_rates(y, diff, extra, draws), confidence)
        metrics.append(Metric(name, value, len(ok), low, high))
    return metrics


def _lc_rates(
    y: np.ndarray, diff: np.ndarray, extra: np.ndarray | None, rows: np.ndarray
) -> np.ndarray:
    """The LC rate of the GLM fitted on each row set of ``rows`` ((R, n) indices): (R,)."""
    y, diff = y[rows], diff[rows]
    sd = diff.std(axis=1, ddof=1, keepdims=True) if diff.shape[1] > 1 else np.zeros((len(y), 1))
    z = np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)
    columns = [np.ones_like(z), np.tanh(z)] + ([extra[rows]] if extra is not None else [])
    x = np.stack(columns, axis=-1)  # (R, n, k): intercept, tanh z [, difficulty]
    theta = _fit_logistic(x, y)
    x[..., 1] = 0.0  # equal length
    return _sigmoid((x @ theta[..., None])[..., 0]).mean(axis=1)


def _sigmoid(eta: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -eta))


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """θ of R logistic regressions y ~ σ(x·θ) with fractional y at once, by damped Newton.

    x is (R, n, k) with the intercept first (unpenalised), y is (R, n); each fit minimises
    Σ softplus(x·θ) − y·x·θ + ½ LC_SLOPE_L2 |θ[1:]|² and stops once its step is under 1e-10.
    """
    penalty = np.full(x.shape[-1], LC_SLOPE_L2)
    penalty[0] = 0.0

    def loss(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> np.ndarray:
        eta = (x @ theta[..., None])[..., 0]
        return np.sum(np.logaddexp(0.0, eta) - y * eta, axis=1) + 0.5 * (penalty * theta**2).sum(1)

    theta = np.zeros(x.shape[::2])
    current = loss(x, y, theta)
    active = np.arange(len(theta))  # the fits still moving
    for _ in range(100):
        xa, ya, ta = x[active], y[active], theta[active]
        p = _sigmoid((xa @ ta[..., None])[..., 0])
        grad = ((p - ya)[:, None, :] @ xa)[:, 0] + penalty * ta
        # The 1e-9 keeps the Hessian invertible when every prediction saturates (all y = 1).
        hessian = (xa * (p * (1 - p))[..., None]).transpose(0, 2, 1) @ xa
        step = np.linalg.solve(hessian + np.diag(penalty + 1e-9), grad[..., None])[..., 0]
        scale, new = np.ones(len(active)), loss(xa, ya, ta - step)
        for _ in range(30):  # halve the step of each fit whose loss rose, until none does
            worse = np.flatnonzero(new > current[active])
            if not worse.size:
                break
            scale[worse] /= 2
            new[worse] = loss(xa[worse], ya[worse], ta[worse] - scale[worse, None] * step[worse])
        scale[new > current[active]] = 0.0
        theta[active] = ta - scale[:, None] * step
        current[active] = np.minimum(new, current[active])
        active = active[np.abs(scale[:, None] * step).max(axis=1) >= 1e-10]
        if not active.size:
            break
    return theta


# --- Checks and degenerate output -----------------------------------------------------------


def violation_rates(
    constitution: Constitution,
    responses: Sequence[str],
    prefix: str = "",
    prompts: Sequence[Prompt] | None = None,
) -> list[Metric]:
    """Share of responses failing each checked principle, and failing any of them.
    ``prompts`` (one per response): what conversation-scope checks read besides it."""
    checked = [p for p in constitution.principles if p.checks]
    if not checked or not responses:
        return []
    earlier = [assistant_turns(p) for p in prompts] if prompts else [[] for _ in responses]
    metrics = []
    failing_any = [False] * len(responses)
    for principle in checked:
        fails = [
            bool(principle.failed_checks(r, e)) for r, e in zip(responses, earlier, strict=True)
        ]
        failing_any = [a or f for a, f in zip(failing_any, fails, strict=True)]
        metrics.append(
            Metric(f"{prefix}violation_rate/{principle.id}", sum(fails) / len(fails), len(fails))
        )
    metrics.append(
        Metric(f"{prefix}violation_rate", sum(failing_any) / len(responses), len(responses))
    )
    return metrics


def is_repetitive(text: str) -> bool:
    """Looping output: ≥ 8 words whose distinct word 3-grams are under half of all 3-grams,
    or ≥ 3 words that are all the same word. Words are whitespace-split, lower-cased."""
    words = text.lower().split()
    if len(words) >= 3 and len(set(words)) == 1:
        return True
    if len(words) < 8:
        return False
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(grams)) / len(grams) < 0.5


def degenerate_rates(
    texts: Sequence[str], finish_reasons: Sequence[str], min_words: int = 3, prefix: str = ""
) -> list[Metric]:
    """Shares of collapsed answers, which neither a judge nor a check is sure to notice.

    ``degenerate/empty``: nothing but whitespace; ``degenerate/short``: fewer than
    ``min_words`` words (empty included); ``degenerate/repetitive``: see is_repetitive;
    ``degenerate/no_stop``: cut off by the token budget (finish_reason "length");
    ``degenerate_rate``: empty, short or repetitive (an unfinished answer may be fine).
    """
    if not texts:
        return []
    n = len(texts)
    empty = [not t.strip() for t in texts]
    short = [len(t.split()) < min_words for t in texts]
    repetitive = [is_repetitive(t) for t in texts]
    no_stop = [reason == "length" for reason in finish_reasons]
    if len(no_stop) != n:
        raise ValueError(f"{n} responses but {len(no_stop)} finish reasons")
    any_bad = [e or s or r for e, s, r in zip(empty, short, repetitive, strict=True)]
    return [
        Metric(f"{prefix}degenerate/empty", sum(empty) / n, n),
        Metric(f"{prefix}degenerate/short", sum(short) / n, n),
        Metric(f"{prefix}degenerate/repetitive", sum(repetitive) / n, n),
        Metric(f"{prefix}degenerate/no_stop", sum(no_stop) / n, n),
        Metric(f"{prefix}degenerate_rate", sum(any_bad) / n, n),
    ]


# --- KL to the baseline ---------------------------------------------------------------------


def token_kl(
    candidate_logits: torch.Tensor, baseline_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Exact KL(p_c ‖ p_b) per position, p = softmax(logits / T) over the whole vocabulary.

    Both sides use the sampling temperature: the samples came from the candidate at T,
    and scoring them at another T measures another pair of distributions (on main that
    gave a KL of −53). T = 0 (greedy) has no sampling distribution; the KL is then taken
    at T = 1 along the greedy responses. The sum runs in float64: float32 log-probs near
    −10 carry rounding of ~1e-6, as large as the KLs this must tell from zero.
    """
    import torch

    if candidate_logits.shape != baseline_logits.shape:
        raise ValueError(
            f"candidate and baseline logits differ in shape ({tuple(candidate_logits.shape)} "
            f"vs {tuple(baseline_logits.shape)}): the models must share one tokenizer"
        )
    t = temperature or 1.0
    log_p = torch.log_softmax(candidate_logits.double() / t, dim=-1)
    log_q = torch.log_softmax(baseline_logits.double() / t, dim=-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if (kl < -1e-6).any():
        raise RuntimeError(f"negative KL {kl.min().item():.3g} per token: a bug, not noise")
    return kl.clamp(min=0.0)


def sequence_kls(
    candidate: Any,
    baseline: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    stopped: Sequence[bool],
    temperature: float,
    batch_size: int = 4,
    device: str = "cpu",
) -> list[tuple[float, int]]:
    """(KL summed over the response's positions, number of positions) per response.

    The positions are those at which the candidate sampled: each response token, and the
    stop token after them when the response stopped (a collapsed model's early stop is
    where it differs most). The prompt is rendered with the chat template and tokenised
    without special tokens, as vLLM saw it; the response is its stored text tokenised
    again, which may split a word differently from the sample, but every position's KL
    is still exact for the context it is given.
    """
    import torch

    rows = [_chat_ids(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    results = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(head) + len(body) for head, body in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (head, body) in enumerate(batch):  # right padding: positions keep their ids
            ids[i, : len(head) + len(body)] = torch.tensor(head + body)
            mask[i, : len(head) + len(body)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            cand = candidate(input_ids=ids, attention_mask=mask).logits
            base = baseline(input_ids=ids, attention_mask=mask).logits
        for i, (head, body) in enumerate(batch):
            # logits[k] predict token k + 1: the first response token is predicted at head - 1
            end = len(head) + len(body) - 1 + int(stopped[start + i])
            kl = token_kl(cand[i, len(head) - 1 : end], base[i, len(head) - 1 : end], temperature)
            results.append((kl.sum().item(), kl.numel()))
    return results


def _chat_ids(tokenizer: Any, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
    head = tokenizer.apply_chat_template(
        as_chat(prompt), tokenize=False, add_generation_prompt=True
    )
    # The template writes its own BOS; tokenizing again must not add a second one.
    return (
        tokenizer.encode(head, add_special_tokens=False),
        tokenizer.encode(response, add_special_tokens=False),
    )


def kl_to_baseline(
    candidate_path: str,
    baseline_path: str,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    stopped: Sequence[bool],
    temperature: float,
) -> list[tuple[float, int]]:
    """sequence_kls with both checkpoints loaded by transformers (on the GPU if there is one).

    Raises ValueError when the two checkpoints' tokenizers differ: a KL over token
    distributions only means something over one shared vocabulary.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(candidate_path)
    if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(baseline_path).get_vocab():
        raise ValueError(
            f"{candidate_path} and {baseline_path} have different tokenizers: the KL between "
            "them is undefined; evaluate against a baseline of the same tokenizer"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 whatever the checkpoints' dtype: two close policies differ by less than bf16's
    # rounding of their logits, and the KL between them would be that rounding.
    candidate, baseline = (
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        for path in (candidate_path, baseline_path)
    )
    return sequence_kls(
        candidate, baseline, tokenizer, prompts, responses, stopped, temperature, device=device
    )


def kl_metrics(per_sequence: Sequence[tuple[float, int]]) -> list[Metric]:
    """``kl``: mean KL per response (nats); ``kl_per_token``: total KL / total positions."""
    if not per_sequence:
        return []
    total = sum(kl for kl, _ in per_sequence)
    positions = sum(n for _, n in per_sequence)
    return [
        Metric("kl", total / len(per_sequence), len(per_sequence)),
        Metric("kl_per_token", total / positions if positions else 0.0, positions),
    ]
