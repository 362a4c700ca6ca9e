"""Evaluation arithmetic: Wilson intervals, win rates, violation rates, KL."""

from __future__ import annotations

import pytest

from alignment.constitution import from_dict
from alignment.evaluation import kl_estimate, violation_rates, wilson_interval, win_rate
from alignment.judge import Judgment


def judgment(
    p_a: float | None, status: str = "ok", mode: str = "pairwise", consistent: bool | None = True
) -> Judgment:
    return Judgment(
        "j", "p", "a", "b", "x", "c", "judge", mode, p_a, p_a, p_a, consistent, 0.9, status, None
    )


def test_wilson_interval_known_values():
    # 8 of 10 at 95 %: the textbook interval (0.490, 0.943)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(8, 10, confidence=0.99)[0] < wilson_interval(8, 10)[0]


def test_win_rate_counts_ties_as_half_and_skips_failed_judgments():
    js = [
        judgment(0.8),
        judgment(0.3),
        judgment(0.5, mode="checks"),
        judgment(None, status="refusal", consistent=None),
        judgment(0.9, consistent=False),
    ]
    metrics = {m.metric: m for m in win_rate(js)}
    assert metrics["win_rate"].value == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert metrics["win_rate"].n == 4
    assert metrics["win_rate"].ci_low < metrics["win_rate"].value < metrics["win_rate"].ci_high
    assert metrics["mean_p_win"].value == pytest.approx((0.8 + 0.3 + 0.5 + 0.9) / 4)
    assert metrics["judge_position_consistency"].value == pytest.approx(2 / 3)  # checks excluded
    assert metrics["judge_not_ok"].value == 1


def test_violation_rates_per_checked_principle_and_overall():
    constitution = from_dict(
        {
            "name": "t",
            "version": 1,
            "principles": [
                {
                    "id": "short",
                    "principle": "p",
                    "critique": "c",
                    "revision": "r",
                    "checks": [{"max_words": 3}],
                },
                {
                    "id": "polite",
                    "principle": "p",
                    "critique": "c",
                    "revision": "r",
                    "checks": [{"regex_must_not": "(?i)idiot"}],
                },
                {"id": "model", "principle": "p", "critique": "c", "revision": "r"},
            ],
        }
    )
    rates = {
        m.metric: m.value
        for m in violation_rates(
            constitution, ["ok", "one two three four", "idiot", "idiot one two three"], "x/"
        )
    }
    assert rates == {
        "x/violation_rate/short": 0.5,
        "x/violation_rate/polite": 0.5,
        "x/violation_rate": 0.75,
    }


def test_kl_estimate_is_the_mean_log_ratio():
    [kl] = kl_estimate([-1.0, -2.0], [-3.0, -2.5])
    assert kl.metric == "kl" and kl.value == pytest.approx(1.25) and kl.n == 2
