"""The paired sign test of alignment/promotion.py against brute force: its p-value, its
critical value, its exact power and the eval size it asks for; and how it reads judgments."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from alignment.promotion import (
    SignTest,
    critical_wins,
    decided_needed,
    null_tail,
    paired_metrics,
    power,
    prompts_needed,
    sign_test,
)
from tests.unit.judgments import judgment

# --- brute force ----------------------------------------------------------------------------


def brute_p_value(wins: int, n: int) -> Fraction:
    """Share of all 2ⁿ equally likely win/loss sequences with at least `wins` wins."""
    at_least = sum(1 for seq in itertools.product((0, 1), repeat=n) if sum(seq) >= wins)
    return Fraction(at_least, 2**n)


def brute_power(n: int, alpha: float, effect: Fraction) -> Fraction:
    """P(p < α) when each decided comparison is a win with probability `effect`, exactly."""
    rejects = [k for k in range(n + 1) if Fraction(sum(math.comb(n, i) for i in range(k, n + 1)),
                                                   2**n) < Fraction(alpha)]  # fmt: skip
    return sum(
        (math.comb(n, k) * effect**k * (1 - effect) ** (n - k) for k in rejects), Fraction(0)
    )


def brute_needed(alpha: float, effect: Fraction, target: float = 0.8) -> int:
    return next(n for n in itertools.count(1) if brute_power(n, alpha, effect) >= target)


# --- the p-value ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 13))
def test_p_value_is_the_binomial_tail_by_brute_force(n: int) -> None:
    for wins in range(n + 1):
        assert null_tail(wins, n) == float(brute_p_value(wins, n))


def test_p_value_known_cases() -> None:
    assert null_tail(10, 10) == 1 / 1024  # 10 wins of 10
    assert null_tail(0, 10) == 1.0
    assert null_tail(0, 0) == 1.0  # nothing decided: no evidence at all
    assert null_tail(5, 10) == pytest.approx(638 / 1024)
    assert null_tail(20, 32) == pytest.approx(0.1077, abs=1e-4)


def test_all_ties_are_not_significant() -> None:
    test = sign_test([judgment(0.5) for _ in range(20)])
    assert (test.wins, test.n, test.comparisons) == (0, 0, 20)
    assert test.p_value == 1.0 and test.tie_rate == 1.0
    assert test.prompts_needed(0.05) == math.inf


# --- critical value, power, eval size -------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_critical_wins_and_size_by_brute_force(alpha: float) -> None:
    for n in range(1, 40):
        c = critical_wins(n, alpha)
        passing = [k for k in range(n + 1) if null_tail(k, n) < alpha]
        assert c == (passing[0] if passing else n + 1)
        assert null_tail(c, n) < alpha or c == n + 1  # the test's size is below α


def test_critical_wins_at_exactly_alpha_is_not_significant() -> None:
    assert critical_wins(10, 1 / 1024) == 11  # p = 1/1024 is not < 1/1024
    assert critical_wins(10, 1 / 1024 + 1e-12) == 10
    assert critical_wins(4, 0.05) == 5  # 4 of 4 gives p = 1/16: never significant


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("n", [1, 5, 10, 17, 40, 80])
def test_power_by_brute_force(alpha: float, n: int) -> None:
    assert power(n, alpha) == pytest.approx(float(brute_power(n, alpha, Fraction(3, 5))), abs=1e-9)
    assert power(n, alpha, 0.75) == pytest.approx(
        float(brute_power(n, alpha, Fraction(3, 4))), abs=1e-9
    )


@pytest.mark.parametrize(
    ("alpha", "effect"),
    [
        (0.05, Fraction(3, 5)),
        (0.1, Fraction(3, 5)),
        (0.05, Fraction(7, 10)),
        (0.01, Fraction(3, 4)),
    ],
)
def test_decided_needed_by_brute_force_search(alpha: float, effect: Fraction) -> None:
    assert decided_needed(alpha, float(effect)) == brute_needed(alpha, effect)


def test_decided_needed_default_is_158_at_five_percent() -> None:
    assert decided_needed(0.05) == 158
    assert power(158, 0.05) >= 0.8 > power(157, 0.05)


@pytest.mark.parametrize(
    ("tie_rate", "prompts"), [(0.0, 158), (0.2, 198), (0.375, 253), (0.5, 316), (0.9, 1580)]
)
def test_prompts_needed_divides_by_the_decided_share(tie_rate: float, prompts: int) -> None:
    assert prompts_needed(0.05, tie_rate) == prompts  # ⌈158 / (1 − tie_rate)⌉
    assert prompts_needed(0.05, tie_rate) == math.ceil(158 / (1 - tie_rate) - 1e-9)


def test_prompts_needed_grows_with_a_stricter_alpha() -> None:
    assert prompts_needed(0.01, 0.2) > prompts_needed(0.05, 0.2) > prompts_needed(0.1, 0.2)
    assert prompts_needed(0.05, 1.0) == math.inf


@pytest.mark.parametrize("effect", [0.5, 0.4, 1.5])
def test_effect_must_be_a_win_rate_above_one_half(effect: float) -> None:
    with pytest.raises(ValueError, match="effect"):
        decided_needed(0.05, effect)


# --- reading the judgments ------------------------------------------------------------------


def test_sign_test_counts_wins_and_losses_and_drops_the_undecided() -> None:
    js = [
        judgment(0.8),  # win
        judgment(0.9),  # win
        judgment(0.3),  # loss
        judgment(0.5),  # tie: dropped
        judgment(0.9, consistent=False),  # the orders disagreed: dropped, not a win
        judgment(0.1, consistent=False),  # ... nor a loss
        judgment(None, status="refusal", consistent=None),  # failed: dropped
        judgment(1.0, mode="checks", consistent=None),  # decided by checks: a win
        judgment(0.5, mode="checks", consistent=None),  # both pass the checks: a tie
        judgment(0.9, b=None),  # pointwise: no comparison at all
    ]
    test = sign_test(js)
    assert (test.wins, test.n, test.comparisons) == (3, 4, 9)
    assert test.tie_rate == pytest.approx(5 / 9)
    assert test.p_value == null_tail(3, 4) == 5 / 16


def test_paired_metrics_names_and_values() -> None:
    js = [judgment(0.9)] * 10 + [judgment(0.5)] * 6
    found = {m.metric: m for m in paired_metrics(js, 0.05)}
    assert list(found) == [
        "paired/wins", "paired/n", "paired/tie_rate", "paired/p_value", "paired/alpha",
        "paired/prompts_needed",
    ]  # fmt: skip
    assert (found["paired/wins"].value, found["paired/wins"].n) == (10.0, 10)
    assert (found["paired/n"].value, found["paired/n"].n) == (10.0, 16)
    assert found["paired/tie_rate"].value == pytest.approx(6 / 16)
    assert found["paired/p_value"].value == 1 / 1024
    assert found["paired/alpha"].value == 0.05
    assert found["paired/prompts_needed"].value == 253.0  # ⌈158 / (10/16)⌉


def test_sign_test_dataclass_without_comparisons() -> None:
    empty = SignTest(0, 0, 0)
    assert empty.p_value == 1.0 and empty.tie_rate == 1.0
    assert paired_metrics([], 0.05)[-1].metric == "paired/alpha"  # no eval size would do
