"""Promotion gates: each bound, on both sides of its threshold, with the numbers it reports;
a gate whose metric is missing fails, and one that cannot apply to the judge says so."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from alignment.evaluation import Metric
from alignment.gates import GateConfig, GateResult, check_gates, failed_reasons
from alignment.judge import Judgment
from alignment.labels import read_soft_label
from alignment.promotion import paired_metrics

ALL_OFF = {  # every gate, in check order (min_judge_accuracy is a condition, not a gate)
    "min_win_rate": None,
    "min_lc_win_rate": None,
    "promotion_alpha": None,
    "max_violation_increase": None,
    "max_degenerate_increase": None,
    "max_no_stop_increase": None,
    "max_length_growth": None,
    "max_length_shrink": None,
    "max_kl": None,
    "min_position_consistency": None,
}


def only(**gate: float) -> GateConfig:
    """A config with every gate off except the given one(s)."""
    return GateConfig(**{**ALL_OFF, **gate})


def metrics(*items: Metric) -> dict[str, Metric]:
    return {m.metric: m for m in items}


def single(gates: GateConfig, found: dict[str, Metric]) -> GateResult:
    results = check_gates(gates, found)
    assert len(results) == 1
    return results[0]


# --- defaults and switching gates off -------------------------------------------------------


def test_defaults() -> None:
    gates = GateConfig()
    assert gates.min_win_rate == 0.5
    assert gates.min_lc_win_rate is None
    assert gates.promotion_alpha == 0.05
    assert gates.min_judge_accuracy is None
    assert gates.max_violation_increase == 0.0
    assert gates.max_degenerate_increase == 0.05
    assert gates.max_no_stop_increase == 0.25
    assert gates.max_length_growth == 1.5
    assert gates.max_length_shrink == 0.5
    assert gates.max_kl is None
    assert gates.min_position_consistency == 0.5
    names = [r.gate for r in check_gates(gates, {})]
    assert names == [
        "min_win_rate",
        "promotion_alpha",
        "max_violation_increase",
        "max_degenerate_increase",
        "max_no_stop_increase",
        "max_length_growth",
        "max_length_shrink",
        "min_position_consistency",
    ]


# (not the violation gate: without violation metrics the constitution has no checks; below)
@pytest.mark.parametrize("gate", [g for g in ALL_OFF if g != "max_violation_increase"])
def test_every_gate_fails_when_its_metric_is_missing(gate: str) -> None:
    result = single(only(**{gate: 0.5}), {})
    assert not result.passed
    assert result.value is None
    assert "not measured" in result.message


def test_all_off_checks_nothing() -> None:
    assert check_gates(GateConfig(**ALL_OFF), {}) == []


@pytest.mark.parametrize("off", list(ALL_OFF))
def test_a_gate_set_to_none_is_absent(off: str) -> None:
    on = {key: 0.5 for key in ALL_OFF}
    on[off] = None
    names = {r.gate for r in check_gates(GateConfig(**on), {})}
    assert names == set(ALL_OFF) - {off}


# --- win rate -------------------------------------------------------------------------------


def win(ci_low: float, value: float = 0.7, n: int = 40) -> Metric:
    return Metric("win_rate", value, n, ci_low, 0.9)


def test_win_rate_uses_the_interval_low_end() -> None:
    # a point estimate far above the bound does not pass when the interval's low end is not
    result = single(only(min_win_rate=0.5), metrics(win(0.45, value=0.9)))
    assert not result.passed
    assert result.value == 0.45
    assert result.threshold == 0.5
    assert result.metric == "win_rate (ci_low)"


@pytest.mark.parametrize(("low", "passed"), [(0.51, True), (0.5, False), (0.49, False)])
def test_win_rate_must_be_strictly_above(low: float, passed: bool) -> None:
    assert single(only(min_win_rate=0.5), metrics(win(low))).passed is passed


def test_win_rate_message_names_the_gate_and_numbers() -> None:
    result = single(only(min_win_rate=0.5), metrics(win(0.4, value=0.625, n=32)))
    assert result.message == "min_win_rate failed: win rate 0.625, interval low 0.400 (n=32)"
    passed = single(only(min_win_rate=0.3), metrics(win(0.4, value=0.625, n=32)))
    assert passed.message == "min_win_rate passed: win rate 0.625, interval low 0.400 (n=32)"


def test_missing_win_rate_fails() -> None:
    result = single(only(min_win_rate=0.0), {})
    assert not result.passed
    assert result.value is None
    assert result.message.startswith("min_win_rate failed")


# --- length-controlled win rate and judge trust ---------------------------------------------


def lc(ci_low: float, value: float = 0.6, n: int = 40) -> Metric:
    return Metric("lc_win_rate", value, n, ci_low, 0.8)


@pytest.mark.parametrize(("low", "passed"), [(0.51, True), (0.5, False), (0.3, False)])
def test_lc_win_rate_interval_low_end_strictly_above(low: float, passed: bool) -> None:
    result = single(only(min_lc_win_rate=0.5), metrics(lc(low)))
    assert result.passed is passed
    assert result.value == low
    assert result.metric == "lc_win_rate (ci_low)"


def test_lc_win_rate_message() -> None:
    result = single(only(min_lc_win_rate=0.5), metrics(lc(0.45, value=0.55, n=64)))
    assert result.message == (
        "min_lc_win_rate failed: length-controlled win rate 0.550, interval low 0.450 (n=64)"
    )


def accuracy(value: float) -> Metric:
    return Metric("judge/accuracy", value, 100)


@pytest.mark.parametrize(
    ("gate", "found"), [("min_win_rate", win(0.6)), ("min_lc_win_rate", lc(0.6))]
)
def test_an_untrusted_judge_fails_the_win_rate_gates(gate: str, found: Metric) -> None:
    passing = {gate: 0.5}
    assert single(only(**passing), metrics(found)).passed  # no bound on the judge: passes
    trusted = only(**passing, min_judge_accuracy=0.7)
    assert single(trusted, metrics(found, accuracy(0.7))).passed
    low = single(trusted, metrics(found, accuracy(0.55)))
    assert not low.passed and low.value == 0.6
    assert low.message == f"{gate} failed: judge not trusted: gold accuracy 0.550 < 0.7"
    unmeasured = single(trusted, metrics(found))
    assert not unmeasured.passed
    assert unmeasured.message == f"{gate} failed: judge not trusted: judge accuracy not measured"


def test_an_untrusted_judge_fails_the_paired_test() -> None:
    found = metrics(*paired(10, 10, 10))  # p = 1/1024: passes on its own
    assert single(only(promotion_alpha=0.05), found).passed
    result = single(
        only(promotion_alpha=0.05, min_judge_accuracy=0.7), {**found, **metrics(accuracy(0.5))}
    )
    assert not result.passed and result.value == 1 / 1024
    assert result.message.startswith(
        "promotion_alpha failed: judge not trusted: gold accuracy 0.500 < 0.7; detecting"
    )


def test_judge_accuracy_leaves_the_other_gates_alone() -> None:
    gates = only(max_kl=30.0, min_judge_accuracy=0.9)
    assert single(gates, metrics(Metric("kl", 1.0, 8), accuracy(0.1))).passed


# --- the paired sign test -------------------------------------------------------------------


def paired(wins: int, n: int, comparisons: int) -> list[Metric]:
    """The eval's sign-test metrics as flows/evaluation.py stores them (the gate reads
    paired/wins and paired/n, whose n is every comparison asked)."""
    return [Metric("paired/wins", float(wins), n), Metric("paired/n", float(n), comparisons)]


@pytest.mark.parametrize(
    ("alpha", "passed"), [(0.05, True), (1 / 1024 + 1e-12, True), (1 / 1024, False)]
)
def test_paired_test_passes_only_strictly_below_alpha(alpha: float, passed: bool) -> None:
    result = single(only(promotion_alpha=alpha), metrics(*paired(10, 10, 10)))
    assert result.passed is passed
    assert result.value == 1 / 1024  # 10 wins of 10: P(X ≥ 10 | 10, 1/2)
    assert result.threshold == alpha
    assert result.metric == "paired/p_value"


def test_paired_test_message_and_numbers() -> None:
    # 30 wins, 10 losses, 24 ties of 64: p = P(X ≥ 30 | 40, 1/2) = 0.00111
    result = single(only(promotion_alpha=0.05), metrics(*paired(30, 40, 64)))
    assert result.passed
    assert result.message == (
        "promotion_alpha passed: sign test 30 wins of 40 decided comparisons (24 of 64 "
        "undecided), p = 0.00111 < α 0.05; detecting a 60% win rate (of decided comparisons) "
        "with 80% power at α 0.05 needs 253 prompts"  # ⌈158 / (1 − 24/64)⌉
    )
    assert result.numbers == {
        "wins": 30.0, "n": 40.0, "comparisons": 64.0, "tie_rate": 0.375,
        "p_value": pytest.approx(0.0011107, rel=1e-4), "alpha": 0.05, "prompts_needed": 253.0,
    }  # fmt: skip
    assert result.applicable
    rejected = single(only(promotion_alpha=0.05), metrics(*paired(24, 40, 64)))
    assert not rejected.passed and rejected.value == pytest.approx(0.1341, abs=1e-4)
    assert "p = 0.134 ≥ α 0.05" in rejected.message


def test_a_win_rate_interval_that_includes_one_half_is_not_promoted() -> None:
    # 20 wins, 12 losses of 32 decided: the interval of 20/32 includes 0.5, p = 0.108
    result = single(only(promotion_alpha=0.05), metrics(*paired(20, 32, 32)))
    assert not result.passed and result.value == pytest.approx(0.1077, abs=1e-4)


def test_all_ties_fail_the_paired_test() -> None:
    result = single(only(promotion_alpha=0.05), metrics(*paired(0, 0, 64)))
    assert not result.passed
    assert result.value == 1.0
    assert result.message == (
        "promotion_alpha failed: no decided comparison: all 64 tied or position-inconsistent; "
        "detecting a 60% win rate (of decided comparisons) with 80% power at α 0.05 needs "
        "no eval size (every comparison tied)"
    )
    assert result.numbers is not None and result.numbers["prompts_needed"] == math.inf
    assert result.as_dict()["numbers"]["prompts_needed"] is None  # JSON-safe


def always_a_judgment(i: int) -> Judgment:
    """A judge that answers "A" whatever it is shown: P1 = 0.9 (the candidate shown as (A)),
    P2 = 0.1 (the candidate shown as (B), and the judge still says A)."""
    said_a = {"A": math.log(0.9), "B": math.log(0.1)}
    label = read_soft_label(said_a, said_a)
    return Judgment(
        f"j{i}", f"p{i}", f"a{i}", f"b{i}", "x", "c", "judge", "pairwise", label.p_a_first,
        label.p_a_second, label.p_a, label.position_consistent, label.option_mass,
        label.status, None,
    )  # fmt: skip


def test_a_judge_that_always_says_a_fails_the_paired_test_not_passes_it() -> None:
    judgments = [always_a_judgment(i) for i in range(64)]
    assert all(j.position_consistent is False for j in judgments)
    found = metrics(*paired_metrics(judgments, 0.05))
    assert found["paired/n"].value == 0 and found["paired/tie_rate"].value == 1.0
    assert "paired/prompts_needed" not in found  # no eval size would do
    result = single(only(promotion_alpha=0.05), found)
    assert not result.passed and result.value == 1.0


# --- check violations -----------------------------------------------------------------------


def violations(rate: float, baseline: float, n: int = 20) -> dict[str, Metric]:
    return metrics(
        Metric("violation_rate", rate, n), Metric("baseline/violation_rate", baseline, n)
    )


@pytest.mark.parametrize(
    ("rate", "baseline", "increase", "passed"),
    [
        (0.25, 0.25, 0.0, True),  # equal to the incumbent: allowed
        (0.125, 0.25, 0.0, True),  # fewer violations
        (0.375, 0.25, 0.0, False),  # more violations with no slack
        (0.375, 0.25, 0.125, True),  # exactly at the allowed increase
        (0.5, 0.25, 0.125, False),  # beyond it
    ],
)
def test_violation_increase(rate: float, baseline: float, increase: float, passed: bool) -> None:
    result = single(only(max_violation_increase=increase), violations(rate, baseline))
    assert result.passed is passed
    assert result.value == pytest.approx(rate - baseline)
    assert result.threshold == increase
    assert result.metric == "violation_rate - baseline/violation_rate"


def test_violation_message() -> None:
    result = single(only(max_violation_increase=0.0), violations(0.5, 0.25))
    assert result.message == (
        "max_violation_increase failed: check-violation rate 0.500 vs incumbent 0.250"
    )


@pytest.mark.parametrize(
    "found",
    [
        {},
        metrics(Metric("violation_rate", 1.0, 5)),
        metrics(Metric("baseline/violation_rate", 0.0, 5)),
    ],
)
def test_no_checks_passes(found: dict[str, Metric]) -> None:
    result = single(only(max_violation_increase=0.0), found)
    assert result.passed
    assert result.value is None
    assert result.message == "max_violation_increase passed: no checks"


# --- degenerate and cut-off output ---------------------------------------------------------


@pytest.mark.parametrize(
    ("gate", "metric", "label"),
    [
        (
            "max_degenerate_increase",
            "degenerate_rate",
            "degenerate (empty, short or repetitive) rate",
        ),
        ("max_no_stop_increase", "degenerate/no_stop", "cut-off rate"),
    ],
)
@pytest.mark.parametrize(
    ("rate", "baseline", "passed"),
    [(0.125, 0.125, True), (0.0, 0.5, True), (0.25, 0.125, True), (0.375, 0.125, False)],
)
def test_output_rate_increase(
    gate: str, metric: str, label: str, rate: float, baseline: float, passed: bool
) -> None:
    found = metrics(Metric(metric, rate, 16), Metric(f"baseline/{metric}", baseline, 16))
    result = single(only(**{gate: 0.125}), found)
    assert result.passed is passed
    assert result.value == pytest.approx(rate - baseline)
    assert result.metric == f"{metric} - baseline/{metric}"
    verdict = "passed" if passed else "failed"
    assert result.message == f"{gate} {verdict}: {label} {rate:.3f} vs incumbent {baseline:.3f}"


@pytest.mark.parametrize("gate", ["max_degenerate_increase", "max_no_stop_increase"])
def test_output_rate_without_the_baseline_fails(gate: str) -> None:
    found = metrics(Metric("degenerate_rate", 0.0, 8), Metric("degenerate/no_stop", 0.0, 8))
    result = single(only(**{gate: 0.05}), found)
    assert not result.passed
    assert result.message.endswith("rate not measured")


# --- length growth --------------------------------------------------------------------------


def lengths(length: float, baseline: float) -> dict[str, Metric]:
    return metrics(Metric("length", length, 10), Metric("baseline/length", baseline, 10))


def check_length_gate(gate: str, bound: float, length: float, passed: bool) -> None:
    """The length gate's verdict, ratio and message for a candidate ``length`` vs 40 tokens."""
    result = single(only(**{gate: bound}), lengths(length, 40.0))
    assert result.passed is passed
    assert result.value == pytest.approx(length / 40.0)
    assert result.metric == "length / baseline/length"
    verdict = "passed" if passed else "failed"
    assert result.message == f"{gate} {verdict}: mean length {length:.1f} vs 40.0 tokens"


@pytest.mark.parametrize(
    ("length", "passed"), [(40.0, True), (60.0, True), (60.5, False), (90.0, False)]
)
def test_length_ratio_at_most_the_growth(length: float, passed: bool) -> None:
    check_length_gate("max_length_growth", 1.5, length, passed)


def test_length_message() -> None:
    result = single(only(max_length_growth=1.2), lengths(60.0, 40.0))
    assert result.message == "max_length_growth failed: mean length 60.0 vs 40.0 tokens"


def test_length_not_measured_fails() -> None:
    result = single(only(max_length_growth=1.2), metrics(Metric("length", 100.0, 3)))
    assert not result.passed  # no evidence is no promotion, as for every other gate
    assert result.value is None
    assert result.message == "max_length_growth failed: length not measured"


@pytest.mark.parametrize(
    ("length", "passed"), [(40.0, True), (20.0, True), (19.5, False), (2.1, False)]
)
def test_length_ratio_at_least_the_shrink(length: float, passed: bool) -> None:
    check_length_gate("max_length_shrink", 0.5, length, passed)


def test_length_shrink_not_measured_fails() -> None:
    result = single(only(max_length_shrink=0.5), metrics(Metric("baseline/length", 30.0, 3)))
    assert not result.passed
    assert result.message == "max_length_shrink failed: length not measured"


# --- KL -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kl", "passed"), [(12.0, True), (29.99, True), (30.0, False), (31.0, False)]
)
def test_kl_strictly_below(kl: float, passed: bool) -> None:
    result = single(only(max_kl=30.0), metrics(Metric("kl", kl, 48)))
    assert result.passed is passed
    assert result.value == kl
    assert result.message == f"max_kl {'passed' if passed else 'failed'}: KL {kl:.2f}"


def test_kl_not_measured_fails() -> None:
    result = single(only(max_kl=30.0), {})
    assert not result.passed
    assert result.message == "max_kl failed: KL not measured"


# --- judge position consistency -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "passed"), [(0.75, True), (0.5, True), (0.49, False), (0.0, False)]
)
def test_position_consistency_at_least(value: float, passed: bool) -> None:
    found = metrics(Metric("judge_position_consistency", value, 40))
    result = single(only(min_position_consistency=0.5), found)
    assert result.passed is passed
    assert result.value == value


def test_position_consistency_message() -> None:
    found = metrics(Metric("judge_position_consistency", 0.25, 40))
    result = single(only(min_position_consistency=0.5), found)
    assert result.message == (
        "min_position_consistency failed: judge consistent in 25.0% of 40 model-judged comparisons"
    )


def test_position_consistency_not_measured_fails() -> None:
    result = single(only(min_position_consistency=0.5), {})
    assert not result.passed
    assert result.message == "min_position_consistency failed: not measured"


def test_position_consistency_is_not_applicable_to_an_order_free_judge() -> None:
    # contrast and likelihood judgments are position-consistent by construction: 1.0
    found = metrics(
        Metric("judge_position_consistency", 1.0, 40), Metric("judge/order_free", 1.0, 40)
    )
    result = single(only(min_position_consistency=0.5), found)
    assert result.passed and not result.applicable
    assert result.value is None  # 1.0 by construction is no measurement
    assert result.message == (
        "min_position_consistency not applicable: the judge's mode (contrast, likelihood) "
        "asks no A/B question, so has no option order"
    )
    assert failed_reasons([result]) == []
    assert result.as_dict()["applicable"] is False


def test_position_consistency_applies_to_a_judge_with_an_option_order() -> None:
    found = metrics(
        Metric("judge_position_consistency", 0.25, 40), Metric("judge/order_free", 0.0, 40)
    )
    result = single(only(min_position_consistency=0.5), found)
    assert not result.passed and result.applicable and result.value == 0.25


def test_position_consistency_without_model_judged_comparisons_is_not_applicable() -> None:
    found = metrics(Metric("judge_position_consistency", 1.0, 0))  # checks decided every one
    result = single(only(min_position_consistency=0.5), found)
    assert result.passed and not result.applicable
    assert result.message == (
        "min_position_consistency not applicable: no model-judged comparison to be consistent in"
    )


# --- together -------------------------------------------------------------------------------


def test_failed_reasons_lists_only_failures_in_order() -> None:
    gates = GateConfig(max_kl=30.0)
    found = metrics(
        win(0.3),  # fails
        *paired(30, 40, 64),  # passes
        Metric("violation_rate", 0.0, 10),
        Metric("baseline/violation_rate", 0.1, 10),  # passes
        *outputs_stop(),  # passes, and then the degenerate rate is raised:
        Metric("degenerate_rate", 0.3, 10),
        Metric("baseline/degenerate_rate", 0.1, 10),  # +0.2 > 0.05: fails
        Metric("length", 100.0, 10),
        Metric("baseline/length", 50.0, 10),  # ratio 2.0 > 1.5: fails; ≥ 0.5: passes
        Metric("kl", 5.0, 10),  # passes
        Metric("judge_position_consistency", 0.9, 10),  # passes
    )
    results = check_gates(gates, found)
    assert [(r.gate, r.passed) for r in results] == [
        ("min_win_rate", False),
        ("promotion_alpha", True),
        ("max_violation_increase", True),
        ("max_degenerate_increase", False),
        ("max_no_stop_increase", True),
        ("max_length_growth", False),
        ("max_length_shrink", True),
        ("max_kl", True),
        ("min_position_consistency", True),
    ]
    assert failed_reasons(results) == [
        "min_win_rate failed: win rate 0.700, interval low 0.300 (n=40)",
        "max_degenerate_increase failed: degenerate (empty, short or repetitive) rate 0.300 "
        "vs incumbent 0.100",
        "max_length_growth failed: mean length 100.0 vs 50.0 tokens",
    ]


def outputs_stop() -> list[Metric]:
    """Neither side's answers are degenerate or cut off."""
    return [
        Metric(name, 0.0, 10)
        for name in (
            "degenerate_rate",
            "baseline/degenerate_rate",
            "degenerate/no_stop",
            "baseline/degenerate/no_stop",
        )
    ]


def test_all_passing_has_no_reasons() -> None:
    found = metrics(
        win(0.6),
        *paired(30, 40, 64),
        *outputs_stop(),
        Metric("length", 50.0, 10),
        Metric("baseline/length", 50.0, 10),
        Metric("judge_position_consistency", 1.0, 10),
    )
    results = check_gates(GateConfig(), found)
    assert all(r.passed for r in results)
    assert failed_reasons(results) == []


def test_as_dict_keeps_the_numbers() -> None:
    result = single(only(max_kl=30.0), metrics(Metric("kl", 12.5, 8)))
    assert result.as_dict() == {
        "gate": "max_kl",
        "metric": "kl",
        "value": 12.5,
        "threshold": 30.0,
        "passed": True,
        "message": "max_kl passed: KL 12.50",
        "applicable": True,
        "numbers": None,
    }


# --- config validation ----------------------------------------------------------------------


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="min_win_rat"):
        GateConfig(min_win_rat=0.5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "bad",
    [
        {"min_win_rate": 1.5},
        {"min_win_rate": -0.1},
        {"max_violation_increase": -0.01},
        {"max_length_growth": 0.0},
        {"max_length_growth": -1.0},
        {"max_kl": 0.0},
        {"min_lc_win_rate": 1.5},
        {"min_judge_accuracy": -0.1},
        {"max_degenerate_increase": -0.01},
        {"max_no_stop_increase": -0.01},
        {"max_length_shrink": 0.0},
        {"min_position_consistency": 1.01},
        {"min_position_consistency": -0.5},
        {"promotion_alpha": 0.0},
        {"promotion_alpha": 1.0},
        {"promotion_alpha": -0.05},
    ],
)
def test_out_of_range_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        GateConfig(**bad)


@pytest.mark.parametrize(
    "edge",
    [
        {"min_win_rate": 0.0},
        {"min_win_rate": 1.0},
        {"max_violation_increase": 0.0},
        {"min_position_consistency": 1.0},
    ],
)
def test_range_edges_are_allowed(edge: dict[str, float]) -> None:
    assert GateConfig(**edge).model_dump()[next(iter(edge))] == next(iter(edge.values()))


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        GateConfig().min_win_rate = 0.1  # type: ignore[misc]
