"""The promotion decision as a paired test with a stated error rate.

Each eval prompt gives one paired comparison of the candidate (side A) with the
incumbent, read as in ``win_rate``: a win when the judge prefers the candidate
(p_a > 1/2, in both orders for a model that is asked both), a loss when it prefers
the incumbent, and no decision when it ties, when its two orders disagree
(position-inconsistent) or when the judgment failed. The sign test asks whether
the decided comparisons lean to the candidate more than chance would:

    H0: P(win | decided) = 1/2      H1: P(win | decided) > 1/2
    p = P(X ≥ wins | X ~ Binomial(n, 1/2)),   n = wins + losses

exactly (integer arithmetic, no normal approximation). At a stated α the
candidate is promoted only when p < α, so an incumbent-equal candidate is
promoted at most α of the time, however small the eval.

How many prompts such an eval needs to see a real improvement: with the
critical value c(n) = min{k : P(X ≥ k | n, 1/2) < α}, the exact power against
a win rate θ among decided comparisons is

    power(n) = P(X ≥ c(n) | X ~ Binomial(n, θ)),

n_decided = the least n with power(n) ≥ 0.8 (the exact power is saw-toothed in
n: a few larger n fall just below 0.8 again), and, since only the share
1 − tie_rate of prompts gives a decision,

    prompts_needed = ⌈n_decided / (1 − tie_rate)⌉,

tie_rate being the share of the eval's comparisons without one (ties,
position-inconsistent and failed judgments). At α = 0.05, θ = 0.6 and 80 % power
n_decided = 158; a tie rate of 0.2 makes that 198 prompts, 0.5 makes it 316. A
win rate θ among decided comparisons is a ``win_rate`` (ties as ½) of
½ + (θ − ½)(1 − tie_rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from alignment.evaluation import Metric, _ok, _win
from alignment.judge import Judgment

ALPHA = 0.05  # the default error rate of a promotion (GateConfig.promotion_alpha)
EFFECT = 0.6  # the win rate among decided comparisons an eval should be able to detect
POWER = 0.8  # ... with this probability
MAX_DECIDED = 20_000  # the needed-n search gives up here (θ very close to 1/2)


@dataclass(frozen=True)
class SignTest:
    """The one-sided sign test of the candidate against the incumbent."""

    wins: int
    n: int  # decided comparisons: wins + losses
    comparisons: int  # every comparison asked, decided or not

    @property
    def p_value(self) -> float:
        return null_tail(self.wins, self.n)

    @property
    def tie_rate(self) -> float:
        """Share of the comparisons without a decision (1.0 when there are none)."""
        return 1.0 - self.n / self.comparisons if self.comparisons else 1.0

    def prompts_needed(self, alpha: float) -> float:
        """Eval prompts that give a 60 % candidate 80 % power at this tie rate (inf at 1.0)."""
        return prompts_needed(alpha, self.tie_rate)


def sign_test(judgments: Sequence[Judgment]) -> SignTest:
    """Wins and decided comparisons of the pairwise judgments (candidate as side A)."""
    pairwise = [j for j in judgments if j.response_b_id is not None]
    outcomes = [_win(j) for j in _ok(pairwise)]
    wins, losses = outcomes.count(1.0), outcomes.count(0.0)
    return SignTest(wins, wins + losses, len(pairwise))


def null_tail(wins: int, n: int) -> float:
    """P(X ≥ wins | X ~ Binomial(n, 1/2)), exactly: Σ_{k ≥ wins} C(n, k) / 2ⁿ."""
    return sum(math.comb(n, k) for k in range(max(wins, 0), n + 1)) / 2**n


def critical_wins(n: int, alpha: float) -> int:
    """The fewest wins of n whose p-value is below α; n + 1 when even n wins are not."""
    bound = Fraction(alpha) * 2**n  # p < α  ⇔  Σ C(n, k) < α·2ⁿ, compared exactly
    tail, k = 0, n + 1
    while k > 0 and tail + math.comb(n, k - 1) < bound:
        k -= 1
        tail += math.comb(n, k)
    return k


def power(n: int, alpha: float, effect: float = EFFECT) -> float:
    """P(the sign test on n decided comparisons rejects at α | P(win) = effect)."""
    c = critical_wins(n, alpha)
    return sum(_binomial_pmf(k, n, effect) for k in range(c, n + 1))


def decided_needed(alpha: float, effect: float = EFFECT, target: float = POWER) -> int:
    """The least number of decided comparisons whose power reaches the target."""
    if not 0.5 < effect <= 1.0:
        raise ValueError(f"effect must be a win rate in (0.5, 1], got {effect}")
    for n in range(1, MAX_DECIDED + 1):
        if power(n, alpha, effect) >= target:
            return n
    raise ValueError(f"more than {MAX_DECIDED} decided comparisons needed for effect {effect}")


def prompts_needed(
    alpha: float, tie_rate: float, effect: float = EFFECT, target: float = POWER
) -> float:
    """⌈decided_needed / (1 − tie_rate)⌉ eval prompts; inf when every comparison ties."""
    if tie_rate >= 1.0:
        return math.inf
    return float(math.ceil(decided_needed(alpha, effect, target) / (1.0 - tie_rate) - 1e-9))


def paired_metrics(judgments: Sequence[Judgment], alpha: float = ALPHA) -> list[Metric]:
    """The sign test as eval metrics: ``paired/wins`` of ``paired/n`` decided comparisons
    (its n: all comparisons), ``paired/tie_rate``, ``paired/p_value``, ``paired/alpha`` and
    ``paired/prompts_needed`` (absent when every comparison tied: no eval size would do)."""
    test = sign_test(judgments)
    needed = test.prompts_needed(alpha)
    return [
        Metric("paired/wins", float(test.wins), test.n),
        Metric("paired/n", float(test.n), test.comparisons),
        Metric("paired/tie_rate", test.tie_rate, test.comparisons),
        Metric("paired/p_value", test.p_value, test.n),
        Metric("paired/alpha", alpha, test.n),
        *([Metric("paired/prompts_needed", needed, test.comparisons)] if needed < math.inf else []),
    ]


def _binomial_pmf(k: int, n: int, p: float) -> float:
    """C(n, k) pᵏ (1 − p)ⁿ⁻ᵏ, in log space so that a large n does not overflow."""
    if p == 1.0:
        return float(k == n)
    log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return math.exp(log + k * math.log(p) + (n - k) * math.log1p(-p))


# --- choosing among the candidate and its merges (loop.merge) -------------------------------

# What ranks models that all passed their gates against the same incumbent on the same eval:
# the length-controlled win rate, then the raw win rate (a metric not measured ranks last).
RANK_METRICS = ("lc_win_rate", "win_rate")


def rank_key(metrics: Mapping[str, Metric]) -> tuple[float, ...]:
    """A model's place among those that passed: higher is better."""
    return tuple(metrics[name].value if name in metrics else -math.inf for name in RANK_METRICS)


def best_passing(passed: Sequence[bool], metrics: Sequence[Mapping[str, Metric]]) -> int | None:
    """The index of the best model that passed every gate (ties: the earlier one, so the
    trained candidate before its merges), or None when none passed."""
    ranked = [i for i, ok in enumerate(passed) if ok]
    if not ranked:
        return None
    return max(ranked, key=lambda i: (rank_key(metrics[i]), -i))
