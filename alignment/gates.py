"""Promotion gates: may a trained candidate replace the incumbent policy?

Each gate reads eval metrics (see alignment/evaluation.py) of the candidate
against the incumbent and compares them with a configured bound; a gate set to
``null`` is off, and a gate whose metric was not measured fails (no evidence is
no promotion). A candidate is promoted only when every gate passes, and each
decision keeps its numbers, so a rejection can be explained from the store.

The judge gates (win rate, length-controlled win rate, the paired sign test of
alignment/promotion.py) can be fooled by a judge that prefers a position or a
length; the collapse gates (degenerate output, unfinished output, length
shrink, KL) do not ask the judge, so a candidate that stopped answering is
refused whatever the judge says.

A gate that cannot apply to the judge's mode (position consistency for a judge
that asks no A/B question) passes with ``applicable=False`` and says why,
rather than passing silently on a figure that is 1.0 by construction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from alignment.evaluation import Metric
from alignment.promotion import ALPHA, EFFECT, POWER, SignTest

# Judge modes (JudgeConfig.mode) that ask no A/B question: no option order, so no
# position bias to measure (the eval's judge/order_free metric is 1.0 for them).
ORDER_FREE_MODES = ("contrast", "likelihood")


def _share(default: float | None, description: str) -> Any:
    """A gate's bound on a share or a rate: between 0 and 1."""
    return Field(default, ge=0.0, le=1.0, description=description)


def _increase(default: float, rate: str, why: str = "") -> Any:
    """A gate's bound on how far the candidate's ``rate`` may exceed the incumbent's."""
    why = f" ({why})" if why else ""
    return Field(
        default, ge=0.0, description=f"{rate} may exceed the incumbent's by at most this{why}."
    )


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_win_rate: float | None = _share(
        0.5,
        "The lower end of the judge win rate's interval (candidate vs incumbent, "
        "both orders, position-inconsistent comparisons as ties) must be above this.",
    )
    min_lc_win_rate: float | None = _share(
        None,
        "The lower end of the length-controlled win rate's bootstrap interval "
        "must be above this (AlpacaEval-LC: the win rate at equal length).",
    )
    promotion_alpha: float | None = Field(
        ALPHA,
        gt=0.0,
        lt=1.0,
        description="The one-sided sign test of the candidate's decided comparisons (ties "
        "and position-inconsistent ones dropped) against the incumbent must give p < this: "
        "an incumbent-equal candidate is promoted at most this often.",
    )
    min_judge_accuracy: float | None = _share(
        None,
        "The judge gates (win rates, paired test) pass only if the judge's "
        "accuracy on the gold audit set (metric judge/accuracy) is at least this: an "
        "untrusted judge's win rate is noise.",
    )
    max_violation_increase: float | None = _increase(0.0, "Check-violation rate")
    max_degenerate_increase: float | None = _increase(
        0.05, "Share of empty, too short or repetitive responses"
    )
    max_no_stop_increase: float | None = _increase(
        0.25,
        "Share of responses cut off by the token budget",
        why="a candidate that no longer stops is rambling or looping",
    )
    max_length_growth: float | None = Field(
        1.5, gt=0.0, description="Mean response length may grow to at most this × the incumbent's."
    )
    max_length_shrink: float | None = Field(
        0.5,
        gt=0.0,
        description="Mean response length must stay at least this × the incumbent's "
        "(a collapsed candidate answers in a word or two).",
    )
    max_kl: float | None = Field(
        None,
        gt=0.0,
        description="KL(candidate ‖ incumbent) per eval response, exact over the vocabulary "
        "at the sampling temperature (nats), must be below this.",
    )
    min_position_consistency: float | None = _share(
        0.5,
        "The judge must agree with itself across both orders at least this often "
        "(a judge that does not is guessing, and its win rate means nothing). Not applicable "
        "to an order-free judge (contrast, likelihood).",
    )


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    message: str
    applicable: bool = True  # False: the gate cannot apply (it passes, and says why)
    numbers: dict[str, float | None] | None = None  # the figures behind the verdict

    def as_dict(self) -> dict:
        """JSON-safe: an unbounded number (e.g. growth from empty answers) becomes None."""
        row = asdict(self)
        if row["value"] is not None and not math.isfinite(row["value"]):
            row["value"] = None
        if row["numbers"] is not None:
            row["numbers"] = {
                k: v if v is None or math.isfinite(v) else None for k, v in row["numbers"].items()
            }
        return row


def check_gates(gates: GateConfig, metrics: Mapping[str, Metric]) -> list[GateResult]:
    """Every enabled gate, evaluated on the eval's metrics (keyed by metric name)."""
    results = []
    distrust = _judge_distrust(gates.min_judge_accuracy, metrics)
    if gates.min_win_rate is not None:
        results.append(
            _interval_gate("min_win_rate", "win rate", gates.min_win_rate, distrust, metrics)
        )
    if gates.min_lc_win_rate is not None:
        results.append(
            _interval_gate(
                "min_lc_win_rate", "length-controlled win rate", gates.min_lc_win_rate,
                distrust, metrics,
            )
        )  # fmt: skip
    if gates.promotion_alpha is not None:
        results.append(_paired_gate(gates.promotion_alpha, distrust, metrics))
    if gates.max_violation_increase is not None:
        results.append(_violation_gate(gates.max_violation_increase, metrics))
    if gates.max_degenerate_increase is not None:
        results.append(
            _increase_gate(
                "max_degenerate_increase", "degenerate_rate", "degenerate (empty, short or "
                "repetitive) rate", gates.max_degenerate_increase, metrics,
            )
        )  # fmt: skip
    if gates.max_no_stop_increase is not None:
        results.append(
            _increase_gate(
                "max_no_stop_increase", "degenerate/no_stop", "cut-off rate",
                gates.max_no_stop_increase, metrics,
            )
        )  # fmt: skip
    if gates.max_length_growth is not None:
        growth = _length_gate("max_length_growth", gates.max_length_growth, metrics, at_most=True)
        results.append(growth)
    if gates.max_length_shrink is not None:
        shrink = _length_gate("max_length_shrink", gates.max_length_shrink, metrics, at_most=False)
        results.append(shrink)
    if gates.max_kl is not None:
        kl = metrics.get("kl")
        value = kl.value if kl else None
        results.append(
            _result(
                "max_kl", "kl", value, gates.max_kl,
                value is not None and value < gates.max_kl,
                f"KL {value:.2f}" if value is not None else "KL not measured",
            )
        )  # fmt: skip
    if gates.min_position_consistency is not None:
        results.append(_consistency_gate(gates.min_position_consistency, metrics))
    return results


def _judge_distrust(bound: float | None, metrics: Mapping[str, Metric]) -> str | None:
    """Why the judge's verdicts may not promote anything, or None when they may."""
    if bound is None:
        return None
    accuracy = metrics.get("judge/accuracy")
    if accuracy is None:
        return "judge not trusted: judge accuracy not measured"
    if accuracy.value < bound:
        return f"judge not trusted: gold accuracy {accuracy.value:.3f} < {bound}"
    return None


def _interval_gate(
    gate: str, label: str, bound: float, distrust: str | None, metrics: Mapping[str, Metric]
) -> GateResult:
    """The lower end of the interval of metric ``gate`` (less ``min_``) must exceed the bound,
    and the judge behind it must be trusted."""
    name = gate.removeprefix("min_")
    found = metrics.get(name)
    low = found.ci_low if found is not None else None
    passed = distrust is None and low is not None and low > bound
    if found is None:
        detail = f"{label} not measured"
    else:
        detail = f"{label} {found.value:.3f}, interval low {_fmt(low)} (n={found.n})"
    return _result(gate, f"{name} (ci_low)", low, bound, passed, distrust or detail)


def _paired_gate(alpha: float, distrust: str | None, metrics: Mapping[str, Metric]) -> GateResult:
    """The sign test's p-value (alignment/promotion.py) must be below α, and the judge
    behind it trusted; the numbers say how many eval prompts a 60 % candidate needs."""
    wins, decided = metrics.get("paired/wins"), metrics.get("paired/n")
    if wins is None or decided is None:
        return _result(
            "promotion_alpha", "paired/p_value", None, alpha, False, "paired test not measured"
        )
    test = SignTest(round(wins.value), round(decided.value), decided.n)
    p, needed = test.p_value, test.prompts_needed(alpha)
    undecided = test.comparisons - test.n
    numbers = {
        "wins": float(test.wins), "n": float(test.n), "comparisons": float(test.comparisons),
        "tie_rate": test.tie_rate, "p_value": p, "alpha": alpha, "prompts_needed": needed,
    }  # fmt: skip
    if test.n == 0:
        detail = f"no decided comparison: all {test.comparisons} tied or position-inconsistent"
    else:
        verdict = "<" if p < alpha else "≥"
        detail = (
            f"sign test {test.wins} wins of {test.n} decided comparisons ({undecided} of "
            f"{test.comparisons} undecided), p = {p:.3g} {verdict} α {alpha}"
        )
    power = f"{EFFECT:.0%} win rate (of decided comparisons) with {POWER:.0%} power"
    size = f"{needed:.0f} prompts" if needed < math.inf else "no eval size (every comparison tied)"
    result = _result(
        "promotion_alpha", "paired/p_value", p, alpha, distrust is None and p < alpha,
        f"{distrust or detail}; detecting a {power} at α {alpha} needs {size}",
    )  # fmt: skip
    return replace(result, numbers=numbers)


def _consistency_gate(bound: float, metrics: Mapping[str, Metric]) -> GateResult:
    """The judge's position consistency, where the judge has an option order to be
    consistent about: an order-free mode, or an eval decided by checks alone, has none."""
    gate, metric = "min_position_consistency", "judge_position_consistency"
    consistency, order_free = metrics.get(metric), metrics.get("judge/order_free")
    if order_free is not None and order_free.value == 1.0:
        why = "the judge's mode (contrast, likelihood) asks no A/B question, so has no option order"
        return _not_applicable(gate, metric, bound, why)
    if consistency is not None and consistency.n == 0:
        why = "no model-judged comparison to be consistent in"
        return _not_applicable(gate, metric, bound, why)
    value = consistency.value if consistency else None
    return _result(
        gate, metric, value, bound, value is not None and value >= bound,
        f"judge consistent in {value:.1%} of {consistency.n} model-judged comparisons"
        if consistency else "not measured",
    )  # fmt: skip


def _not_applicable(gate: str, metric: str, threshold: float, why: str) -> GateResult:
    """Passes (it cannot refuse anything) but says so: value None, applicable False."""
    return GateResult(gate, metric, None, threshold, True, f"{gate} not applicable: {why}", False)


def _increase_gate(
    gate: str, metric: str, label: str, max_increase: float, metrics: Mapping[str, Metric]
) -> GateResult:
    """Candidate's rate − the incumbent's (``baseline/<metric>``) must be at most the bound."""
    rate, baseline = metrics.get(metric), metrics.get(f"baseline/{metric}")
    if rate is None or baseline is None:
        return _result(
            gate, f"{metric} - baseline/{metric}", None, max_increase, False,
            f"{label} not measured",
        )  # fmt: skip
    return _result(
        gate,
        f"{metric} - baseline/{metric}",
        rate.value - baseline.value,
        max_increase,
        rate.value <= baseline.value + max_increase,
        f"{label} {rate.value:.3f} vs incumbent {baseline.value:.3f}",
    )


def _violation_gate(max_increase: float, metrics: Mapping[str, Metric]) -> GateResult:
    rate, baseline = metrics.get("violation_rate"), metrics.get("baseline/violation_rate")
    if rate is None or baseline is None:  # the constitution has no checked principles
        return _result(
            "max_violation_increase", "violation_rate", None, max_increase, True, "no checks"
        )
    return _increase_gate(
        "max_violation_increase", "violation_rate", "check-violation rate", max_increase, metrics
    )


def _length_gate(
    gate: str, bound: float, metrics: Mapping[str, Metric], at_most: bool
) -> GateResult:
    """The candidate's mean length over the incumbent's must be at most (growth) or at least
    (shrink) the bound."""
    ratio, detail = _length_ratio(metrics)
    passed = ratio is not None and (ratio <= bound if at_most else ratio >= bound)
    return _result(gate, "length / baseline/length", ratio, bound, passed, detail)


def _length_ratio(metrics: Mapping[str, Metric]) -> tuple[float | None, str]:
    length, baseline = metrics.get("length"), metrics.get("baseline/length")
    if length is None or baseline is None:
        return None, "length not measured"
    detail = f"mean length {length.value:.1f} vs {baseline.value:.1f} tokens"
    return _ratio(length.value, baseline.value), detail


def _result(
    gate: str, metric: str, value: float | None, threshold: float, passed: bool, detail: str
) -> GateResult:
    verdict = "passed" if passed else "failed"
    return GateResult(gate, metric, value, threshold, passed, f"{gate} {verdict}: {detail}")


def _ratio(value: float, baseline: float) -> float:
    if baseline:
        return value / baseline
    return 1.0 if not value else float("inf")  # from empty answers to any text: unbounded


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def failed_reasons(results: list[GateResult]) -> list[str]:
    return [r.message for r in results if not r.passed]
