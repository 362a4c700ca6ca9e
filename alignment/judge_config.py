"""The judge's settings, and the mode each setting answers a question in."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignment.labels import Mode, ModelMode


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: ModelMode = Field(
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


def model_mode(pointwise: bool, config: JudgeConfig) -> ModelMode:
    """How the model answers a question in the config's mode (the store's
    ``judgments.mode``): a pointwise score has no A/B order and no rationale, so logprob
    and cot ask it the yes/no question (logprob) and ensemble scores it by contrast."""
    if pointwise and config.mode == "cot":
        return "logprob"
    if pointwise and config.mode == "ensemble":
        return "contrast"
    return config.mode


# id compatibility: judgment ids and template fingerprints hash the name the store gave a
# mode before it took the config's names, so the ids of stored judgments do not change.
# Only the logprob mode was named otherwise: "pairwise" for the A/B question and
# "pointwise" for the yes/no question of a pointwise score.
def id_mode_name(mode: Mode, pointwise: bool) -> str:
    """The name of ``mode`` that a judgment's id hashes (see id compatibility above)."""
    if mode == "logprob":
        return "pointwise" if pointwise else "pairwise"
    return mode
